"""``AVA.txt`` -> a label table, strictly and fast, with every bad line kept as a rejected row.

One line per image, space separated (METHOD.md):
``index image_id c1 .. c10 semantic_tag_1 semantic_tag_2 challenge_id``.

Good lines are found with one compiled regular expression per line and then converted in bulk by
pandas' C parser (255,530 lines in about half a second). Only the few lines that fail the regular
expression are examined field by field, to say exactly what is wrong with them. The file goes
through in blocks of ``BLOCK_LINES`` lines, each kept as compact columns, so neither every line as
a Python string nor an n x 15 array of them is ever held (issue 22). Rules:

- blank lines (and trailing whitespace, CRLF endings) are skipped silently: they hold no image;
- a wrong field count, a non-integer or negative field -> ``rejected``, stage ``parse``;
- a repeated image id -> ``rejected`` (stage ``parse``) for every occurrence after the first;
- counts that sum to 0 -> ``rejected``, stage ``label`` (the line is well formed but has no label).

Line numbers are 1-based lines of the file as stored.
"""

from __future__ import annotations

import io
import itertools
import re
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from model.metrics import RATINGS
from tasks.core import storage
from tasks.core.schemas import LABEL_SCHEMA, REJECTED_SCHEMA

N_FIELDS = 15
FIELD_NAMES: tuple[str, ...] = (
    "index", "image_id", *(f"c{i}" for i in range(1, 11)), "semantic_tag_1", "semantic_tag_2", "challenge_id",
)
# At most 18 digits, so every accepted value fits int64 without overflow.
_GOOD_LINE = re.compile(r"[ \t]*\d{1,18}(?:[ \t]+\d{1,18}){14}[ \t]*")
_INT = re.compile(r"[+-]?\d+")
# Label lines parsed at once: their Python strings and pandas' token buffers (~0.3 KB a line) stay
# this size; what the whole file keeps is ~80 bytes a well-formed line (``_Columns``).
BLOCK_LINES = 65_536

@dataclass(frozen=True)
class LabelTable:
    """Parsed labels (``LABEL_SCHEMA``) and rejected lines (``REJECTED_SCHEMA``)."""

    labels: pa.Table
    rejected: pa.Table
    n_lines: int  # non-blank lines read: len(labels) + len(rejected)

    def summary(self) -> dict[str, int]:
        stages = self.rejected.column("stage").to_pylist()
        return {"lines": self.n_lines, "labelled": self.labels.num_rows,
                **{f"rejected_{s}": stages.count(s) for s in sorted(set(stages))}}


def _diagnose(line: str) -> tuple[int | None, str]:
    """Why a line failed the fast check: (image id if readable, reason)."""
    fields = line.split()
    image_id = int(fields[1]) if len(fields) > 1 and fields[1].isdigit() and len(fields[1]) <= 18 else None
    if len(fields) != N_FIELDS:
        return image_id, f"expected {N_FIELDS} fields, got {len(fields)}"
    for name, value in zip(FIELD_NAMES, fields, strict=True):
        if not _INT.fullmatch(value):
            return image_id, f"field {name} is not an integer: {value[:40]!r}"
        if value.startswith("-") and int(value) != 0:
            return image_id, f"field {name} is negative: {value}"
        if len(value.lstrip("+-")) > 18:
            return image_id, f"field {name} is out of range: {value[:40]}"
    # Only signs ("+5", "-0") are left; they are unusual enough to refuse rather than guess.
    return image_id, "signed integer field (expected plain digits)"


class _Rejections:
    """Rejected lines as they are found, a ``REJECTED_SCHEMA`` table at the end."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.columns: dict[str, list] = {name: [] for name in REJECTED_SCHEMA.names}

    def add(self, image_id: int | None, stage: str, reason: str, line_number: int) -> None:
        for name, value in zip(REJECTED_SCHEMA.names, (image_id, self.uri, stage, reason, line_number), strict=True):
            self.columns[name].append(value)

    def table(self) -> pa.Table:
        return pa.table(self.columns, schema=REJECTED_SCHEMA).sort_by("line_number")


def _well_formed(lines: list[str], first_line: int, rejected: _Rejections) -> tuple[np.ndarray, np.ndarray, int]:
    """The values (n, 15) and 1-based line numbers of one block's lines that pass the fast check
    (``lines[0]`` is line ``first_line``); every other non-blank line is rejected with its diagnosis.
    Also the count of non-blank lines."""
    good_idx = array("q")  # 8 bytes per line, not a Python int
    n_lines = 0
    match = _GOOD_LINE.fullmatch
    for i, line in enumerate(lines):
        if match(line):
            good_idx.append(i)
            n_lines += 1
        elif line.strip():
            n_lines += 1
            image_id, reason = _diagnose(line)
            rejected.add(image_id, "parse", reason, first_line + i)
    if not good_idx:
        return np.empty((0, N_FIELDS), dtype=np.int64), np.empty(0, dtype=np.int64), n_lines
    # Bytes, not io.StringIO: its buffer holds 4 bytes per character.
    body = "\n".join([lines[i] for i in good_idx]).encode()
    values = pd.read_csv(io.BytesIO(body), sep=r"\s+", header=None, dtype=np.int64, engine="c").to_numpy()
    return values, np.frombuffer(good_idx, dtype=np.int64) + first_line, n_lines


class _Columns:
    """The well-formed lines of every block, kept as compact columns (about 80 bytes a line) in
    arrays sized once for the whole file, so the blocks are never concatenated."""

    def __init__(self, capacity: int) -> None:
        self.n = 0
        self.image_id = np.empty(capacity, dtype=np.int64)
        self.line_number = np.empty(capacity, dtype=np.int64)
        self.counts = np.empty((capacity, 10), dtype=np.int32)  # rows with bigger counts are rejected
        self.too_big = np.empty(capacity, dtype=bool)  # a count past int32: kept exact here
        self.no_votes = np.empty(capacity, dtype=bool)
        self.tags = np.empty((capacity, 2), dtype=np.int64)  # int64: a tag is dropped only if it is 0
        self.challenge = np.empty(capacity, dtype=np.int32)

    def add(self, values: np.ndarray, line_numbers: np.ndarray) -> None:
        at = slice(self.n, self.n + len(values))
        counts = values[:, 2:12]
        self.image_id[at], self.line_number[at] = values[:, 1], line_numbers
        self.too_big[at] = (counts > np.iinfo(np.int32).max).any(axis=1)
        self.no_votes[at] = counts.sum(axis=1) == 0
        self.counts[at] = counts  # wraps only on too_big rows, which never become labels
        self.tags[at] = values[:, 12:14]
        self.challenge[at] = np.clip(values[:, 14], 0, np.iinfo(np.int32).max)
        self.n += len(values)

    def trim(self) -> None:
        for name in ("image_id", "line_number", "counts", "too_big", "no_votes", "tags", "challenge"):
            setattr(self, name, getattr(self, name)[:self.n])


def _usable(cols: _Columns, rejected: _Rejections) -> np.ndarray:
    """Which well-formed lines become labels: not a repeated image id (the first occurrence wins and
    later ones name its line), counts that fit int32, at least one vote."""
    image_ids, line_numbers = cols.image_id, cols.line_number
    keep = np.ones(cols.n, dtype=bool)
    _, first_pos, inverse = np.unique(image_ids, return_index=True, return_inverse=True)
    dup = np.flatnonzero(first_pos[inverse] != np.arange(cols.n))
    for j in dup:
        first_line = int(line_numbers[first_pos[inverse[j]]])
        rejected.add(int(image_ids[j]), "parse", f"duplicate image_id (first on line {first_line})",
                     int(line_numbers[j]))
    keep[dup] = False
    too_big = cols.too_big & keep
    for j in np.flatnonzero(too_big):
        rejected.add(int(image_ids[j]), "parse", "vote count exceeds int32", int(line_numbers[j]))
    keep &= ~too_big
    no_votes = cols.no_votes & keep
    for j in np.flatnonzero(no_votes):
        rejected.add(int(image_ids[j]), "label", "no votes (rating counts sum to 0)", int(line_numbers[j]))
    return keep & ~no_votes


def _label_table(cols: _Columns, keep: np.ndarray) -> pa.Table:
    """``LABEL_SCHEMA`` rows of usable lines: votes, their mean and standard deviation, tags, challenge."""
    counts = cols.counts[keep]
    totals = counts.sum(axis=1)
    dist = counts / totals[:, None]
    # One product over every row, as before blocks: BLAS rounds a row differently by where it falls
    # in the call (measured: blocks of 3 or 65,537 rows differ in the last bit), and the manifests
    # must not change. The rest is per row, so it goes a block at a time (no n x 10 temporaries).
    mean = dist @ RATINGS
    std = np.empty(len(dist), dtype=np.float64)
    for start in range(0, len(dist), BLOCK_LINES):
        d, m = dist[start:start + BLOCK_LINES], mean[start:start + BLOCK_LINES]
        std[start:start + BLOCK_LINES] = np.sqrt(np.maximum((d * (RATINGS[None, :] - m[:, None]) ** 2).sum(axis=1), 0.0))
    del dist
    return pa.table({
        "image_id": pa.array(cols.image_id[keep], pa.int64()),
        "line_number": pa.array(cols.line_number[keep], pa.int64()),
        "rating_counts": pa.FixedSizeListArray.from_arrays(pa.array(counts.ravel()), 10),
        "n_ratings": pa.array(totals.astype(np.int32)),
        "score_mean": pa.array(mean, pa.float64()),
        "score_std": pa.array(std, pa.float64()),
        "semantic_tags": _nonzero_lists(cols.tags[keep]),
        "challenge_id": pa.array(cols.challenge[keep]),
    }, schema=LABEL_SCHEMA)


def _nonzero_lists(tags: np.ndarray) -> pa.ListArray:
    """Per row, its non-zero tags in order (0 means no tag), built from offsets, not Python lists."""
    present = tags != 0
    offsets = np.concatenate([[0], np.cumsum(present.sum(axis=1))]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(tags[present].astype(np.int32)),
                                    type=pa.list_(pa.int32()))


def _parse_blocks(blocks: Iterable[list[str]], capacity: int, uri: str) -> LabelTable:
    """Lines a block at a time (each block's lines follow the previous block's) -> labels and rejected."""
    rejected = _Rejections(uri)
    cols = _Columns(capacity)
    first_line, n_lines = 1, 0
    for lines in blocks:
        values, line_numbers, n_good = _well_formed(lines, first_line, rejected)
        cols.add(values, line_numbers)
        first_line, n_lines = first_line + len(lines), n_lines + n_good
    cols.trim()
    keep = _usable(cols, rejected)
    return LabelTable(labels=_label_table(cols, keep), rejected=rejected.table(), n_lines=n_lines)


def _byte_blocks(data: bytes, block_lines: int) -> Iterator[list[str]]:
    """The file's lines, ``block_lines`` at a time, decoded as the whole file would be: a block ends
    after a newline byte, which no multi-byte UTF-8 character contains."""
    stream = io.BytesIO(data)  # shares ``data``'s buffer: no copy
    while raw := list(itertools.islice(stream, block_lines)):
        ends_with_newline = raw[-1].endswith(b"\n")
        # CRLF files read like LF files; any other stray control character fails the line check.
        lines = b"".join(raw).decode("utf-8", errors="replace").replace("\r\n", "\n").split("\n")
        if ends_with_newline:
            lines.pop()  # the empty text after the block's last newline is not a line
        yield lines


def parse_labels_bytes(data: bytes, uri: str = "", block_lines: int = BLOCK_LINES) -> LabelTable:
    """Parse an ``AVA.txt``-format file's bytes ``block_lines`` lines at a time, so only a block of
    lines is ever held as Python strings. ``uri`` is recorded on rejected rows."""
    if block_lines < 1:
        raise ValueError(f"block_lines must be >= 1, got {block_lines}")
    return _parse_blocks(_byte_blocks(data, block_lines), data.count(b"\n") + 1, uri)


def parse_labels_text(text: str, uri: str = "", block_lines: int = BLOCK_LINES) -> LabelTable:
    """Parse the contents of an ``AVA.txt``-format file. ``uri`` is recorded on rejected rows."""
    if block_lines < 1:
        raise ValueError(f"block_lines must be >= 1, got {block_lines}")
    # CRLF files read like LF files; any other stray control character fails the line check.
    lines = text.replace("\r\n", "\n").split("\n")
    blocks = (lines[start:start + block_lines] for start in range(0, len(lines), block_lines))
    return _parse_blocks(blocks, len(lines), uri)


def parse_labels(url: str) -> LabelTable:
    """Parse an ``AVA.txt``-format file at any fsspec URL."""
    return parse_labels_bytes(storage.read_bytes(url), uri=url)


def read_names(url: str) -> dict[int, str]:
    """AVA's ``tags.txt`` / ``challenges.txt``: ``<id> <name...>`` per line -> {id: name}."""
    names: dict[int, str] = {}
    for line in storage.read_bytes(url).decode("utf-8", errors="replace").splitlines():
        head, _, name = line.strip().partition(" ")
        if head.isdigit():
            names[int(head)] = name.strip()
    return names


def join_names(labels: pa.Table, tag_names: dict[int, str] | None = None,
               challenge_names: dict[int, str] | None = None) -> pa.Table:
    """Add ``semantic_tag_names`` (list<string>) and/or ``challenge_name`` (string) columns."""
    if tag_names is not None:
        names = [[tag_names.get(t, "") for t in row] for row in labels.column("semantic_tags").to_pylist()]
        labels = labels.append_column("semantic_tag_names", pa.array(names, pa.list_(pa.string())))
    if challenge_names is not None:
        names = [challenge_names.get(c) for c in labels.column("challenge_id").to_pylist()]
        labels = labels.append_column("challenge_name", pa.array(names, pa.string()))
    return labels
