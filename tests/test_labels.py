"""AVA.txt parsing: the real val labels, and every kind of broken line."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.core import storage
from tasks.ingest.labels import (
    LABEL_SCHEMA,
    REJECTED_SCHEMA,
    join_names,
    parse_labels,
    parse_labels_bytes,
    parse_labels_text,
    read_names,
)

GOOD = "1 100 0 1 2 3 4 5 4 3 2 1 15 0 7\n"


def test_real_val_labels_match_numpy(data_dir):
    path = str(data_dir / "AVA_val_labels.txt")
    parsed = parse_labels(path)
    raw = np.loadtxt(path, dtype=np.int64)
    assert parsed.labels.schema == LABEL_SCHEMA
    assert parsed.n_lines == len(raw) == parsed.labels.num_rows == 10220
    assert parsed.rejected.num_rows == 0
    t = parsed.labels
    np.testing.assert_array_equal(t.column("image_id").to_numpy(), raw[:, 1])
    counts = np.array(t.column("rating_counts").to_pylist())
    np.testing.assert_array_equal(counts, raw[:, 2:12])
    n = raw[:, 2:12].sum(1)
    mean = (raw[:, 2:12] * np.arange(1, 11)).sum(1) / n
    std = np.sqrt((raw[:, 2:12] * (np.arange(1, 11) - mean[:, None]) ** 2).sum(1) / n)
    np.testing.assert_allclose(t.column("score_mean").to_numpy(), mean)
    np.testing.assert_allclose(t.column("score_std").to_numpy(), std)
    np.testing.assert_array_equal(t.column("n_ratings").to_numpy(), n)
    tags = t.column("semantic_tags").to_pylist()
    assert all(row == [int(x) for x in r[12:14] if x] for row, r in zip(tags, raw, strict=True))
    np.testing.assert_array_equal(t.column("challenge_id").to_numpy(), raw[:, 14])
    assert t.column("line_number").to_pylist() == list(range(1, 10221))


@pytest.mark.parametrize(("line", "stage", "reason"), [
    ("2 101 1 2 3\n", "parse", "expected 15 fields, got 5"),
    ("2 101 1 2 3 4 5 6 7 8 9 10 0 0 1 99\n", "parse", "expected 15 fields, got 16"),
    ("2 101 1 2 x 4 5 6 7 8 9 10 0 0 1\n", "parse", "field c3 is not an integer: 'x'"),
    ("2 101 1 2 3.5 4 5 6 7 8 9 10 0 0 1\n", "parse", "field c3 is not an integer"),
    ("2 101 1 -2 3 4 5 6 7 8 9 10 0 0 1\n", "parse", "field c2 is negative: -2"),
    ("2 101 0 0 0 0 0 0 0 0 0 0 0 0 1\n", "label", "no votes"),
    ("2 100 1 1 1 1 1 1 1 1 1 1 0 0 1\n", "parse", "duplicate image_id (first on line 1)"),
    ("2 101 1 2 3 4 5 6 7 8 9 99999999999999999999 0 0 1\n", "parse", "out of range"),
    ("2 101 1 2 3 4 5 6 7 8 9 99999999999 0 0 1\n", "parse", "exceeds int32"),
])
def test_each_broken_line_is_rejected_and_the_rest_goes_on(line, stage, reason):
    parsed = parse_labels_text(GOOD + line + "3 102 0 0 1 1 1 1 1 0 0 0 0 0 8\n", uri="mem://AVA.txt")
    assert parsed.labels.column("image_id").to_pylist() == [100, 102]
    assert parsed.labels.column("line_number").to_pylist() == [1, 3]
    assert parsed.rejected.schema == REJECTED_SCHEMA
    [row] = parsed.rejected.to_pylist()
    assert row["stage"] == stage and reason in row["reason"], row
    assert row["line_number"] == 2 and row["uri"] == "mem://AVA.txt"
    assert parsed.n_lines == 3 == parsed.labels.num_rows + parsed.rejected.num_rows


def test_crlf_blank_lines_and_whitespace():
    text = "\r\n" + GOOD.replace("\n", "\r\n") + "   \n\t2  101 0 0 1 1 1 1 1 0 0 0 0 0 8  \r\n\n"
    parsed = parse_labels_text(text)
    assert parsed.labels.column("image_id").to_pylist() == [100, 101]
    assert parsed.labels.column("line_number").to_pylist() == [2, 4]
    assert parsed.rejected.num_rows == 0 and parsed.n_lines == 2


def test_empty_file_and_garbage_only():
    assert parse_labels_text("").labels.num_rows == 0
    parsed = parse_labels_text("<html>not labels</html>\n\x00\x01\n")
    assert parsed.labels.num_rows == 0
    assert parsed.rejected.column("line_number").to_pylist() == [1, 2]


def test_tag_and_challenge_names(tmp_path):
    storage.write_text_atomic(str(tmp_path / "tags.txt"), "15 Nature\n1 Abstract\n")
    storage.write_text_atomic(str(tmp_path / "challenges.txt"), "7 Seven Deadly Sins\n")
    labels = parse_labels_text(GOOD).labels
    joined = join_names(labels, read_names(str(tmp_path / "tags.txt")), read_names(str(tmp_path / "challenges.txt")))
    assert joined.column("semantic_tag_names").to_pylist() == [["Nature"]]
    assert joined.column("challenge_name").to_pylist() == ["Seven Deadly Sins"]


BLOCK_TEXT = (
    "\r\n" + GOOD.replace("\n", "\r\n")  # CRLF and a blank first line
    + "2 101 1 2 3\n"  # too few fields
    + "3 102 0 0 1 1 1 1 1 0 0 0 0 0 8\n"
    + "4 100 1 1 1 1 1 1 1 1 1 1 0 0 1\n"  # repeats line 2's id, in a later block when blocks are small
    + "   \n\t5  103 0 0 1 1 1 1 1 0 0 0 0 0 8  \r\n"
    + "6 104 0 0 0 0 0 0 0 0 0 0 0 0 1\n"  # no votes
    + "7 105 1 2 3 4 5 6 7 8 9 99999999999 4294967296 0 1\n"  # count past int32
    + "8 106 1 2 3 4 5 6 7 8 9 10 4294967296 3 99999999999\n"  # a tag that is 0 as int32 only
    + "9 102 5 5 5 5 5 5 5 5 5 5 0 0 0\n"  # a second repeat
    + "<html>\x00</html>\n"
    + "10 107 3 1 4 1 5 9 2 6 5 3 5 8 9\r"  # last line: no newline, a stray CR
)


@pytest.mark.parametrize("block_lines", [1, 2, 3, 5])
def test_blocks_of_lines_give_the_table_of_one_block(block_lines):
    whole = parse_labels_text(BLOCK_TEXT, uri="u", block_lines=10**6)
    assert whole.labels.column("image_id").to_pylist() == [100, 102, 103, 106]
    assert whole.rejected.num_rows == 7 and whole.n_lines == 11
    data = BLOCK_TEXT.encode() + b"11 108 \xff\xfe 1\n"  # bytes that are not UTF-8 read as U+FFFD
    whole_bytes = parse_labels_text(data.decode("utf-8", errors="replace"), uri="u", block_lines=10**6)
    for parsed, expected in ((parse_labels_text(BLOCK_TEXT, uri="u", block_lines=block_lines), whole),
                             (parse_labels_bytes(BLOCK_TEXT.encode(), uri="u", block_lines=block_lines), whole),
                             (parse_labels_bytes(data, uri="u", block_lines=block_lines), whole_bytes)):
        assert parsed.labels.equals(expected.labels)
        assert parsed.rejected.equals(expected.rejected)
        assert parsed.n_lines == expected.n_lines
