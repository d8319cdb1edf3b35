"""``AVA.txt`` -> a label table, strictly and fast, with every bad line kept as a rejected row.

One line per image, space separated (METHOD.md):
``index image_id c1 .. c10 semantic_tag_1 semantic_tag_2 challenge_id``.

Good lines are found with one compiled regular expression per line and then converted in bulk by
pandas' C parser (255,530 lines in about half a second). Only the few lines that fail the regular
expression are examined field by field, to say exactly what is wrong with them. Rules:

- blank lines (and trailing whitespace, CRLF endings) are skipped silently: they hold no image;
- a wrong field count, a non-integer or negative field -> ``rejected``, stage ``parse``;
- a repeated image id -> ``rejected`` (stage ``parse``) for every occurrence after the first;
- counts that sum to 0 -> ``rejected``, stage ``label`` (the line is well formed but has no label).

Line numbers are 1-based lines of the file as stored.
"""

from __future__ import annotations

import io
import re
from array import array
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
# Lines handed to pandas' C parser at once: its token buffers (~0.3 KB a line) stay this size.
_PARSE_CHUNK = 65_536

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


def _well_formed(lines: list[str], rejected: _Rejections) -> tuple[np.ndarray, np.ndarray, int]:
    """The values (n, 15) and 1-based line numbers of the lines that pass the fast check; every other
    non-blank line is rejected with its diagnosis. Also the count of non-blank lines."""
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
            rejected.add(image_id, "parse", reason, i + 1)
    values = np.empty((len(good_idx), N_FIELDS), dtype=np.int64)
    for start in range(0, len(good_idx), _PARSE_CHUNK):
        chunk = good_idx[start:start + _PARSE_CHUNK]
        # Bytes, not io.StringIO: its buffer holds 4 bytes per character.
        body = "\n".join([lines[i] for i in chunk]).encode()
        values[start:start + len(chunk)] = pd.read_csv(io.BytesIO(body), sep=r"\s+", header=None, dtype=np.int64,
                                                       engine="c").to_numpy()
    return values, np.frombuffer(good_idx, dtype=np.int64) + 1, n_lines


def _usable(values: np.ndarray, line_numbers: np.ndarray, rejected: _Rejections) -> np.ndarray:
    """Which well-formed lines become labels: not a repeated image id (the first occurrence wins and
    later ones name its line), counts that fit int32, at least one vote."""
    image_ids, counts = values[:, 1], values[:, 2:12]
    keep = np.ones(len(values), dtype=bool)
    _, first_pos, inverse = np.unique(image_ids, return_index=True, return_inverse=True)
    dup = np.flatnonzero(first_pos[inverse] != np.arange(len(values)))
    for j in dup:
        first_line = int(line_numbers[first_pos[inverse[j]]])
        rejected.add(int(image_ids[j]), "parse", f"duplicate image_id (first on line {first_line})",
                     int(line_numbers[j]))
    keep[dup] = False
    too_big = (counts > np.iinfo(np.int32).max).any(axis=1) & keep
    for j in np.flatnonzero(too_big):
        rejected.add(int(image_ids[j]), "parse", "vote count exceeds int32", int(line_numbers[j]))
    keep &= ~too_big
    no_votes = (counts.sum(axis=1) == 0) & keep
    for j in np.flatnonzero(no_votes):
        rejected.add(int(image_ids[j]), "label", "no votes (rating counts sum to 0)", int(line_numbers[j]))
    return keep & ~no_votes


def _label_table(values: np.ndarray, line_numbers: np.ndarray) -> pa.Table:
    """``LABEL_SCHEMA`` rows of usable lines: votes, their mean and standard deviation, tags, challenge."""
    counts = values[:, 2:12]
    totals = counts.sum(axis=1)
    dist = counts / totals[:, None]
    mean = dist @ RATINGS
    std = np.sqrt(np.maximum((dist * (RATINGS[None, :] - mean[:, None]) ** 2).sum(axis=1), 0.0))
    tags = values[:, 12:14]
    return pa.table({
        "image_id": pa.array(values[:, 1], pa.int64()),
        "line_number": pa.array(line_numbers, pa.int64()),
        "rating_counts": pa.FixedSizeListArray.from_arrays(pa.array(counts.ravel().astype(np.int32)), 10),
        "n_ratings": pa.array(totals.astype(np.int32)),
        "score_mean": pa.array(mean, pa.float64()),
        "score_std": pa.array(std, pa.float64()),
        "semantic_tags": _nonzero_lists(tags),
        "challenge_id": pa.array(np.clip(values[:, 14], 0, np.iinfo(np.int32).max).astype(np.int32)),
    }, schema=LABEL_SCHEMA)


def _nonzero_lists(tags: np.ndarray) -> pa.ListArray:
    """Per row, its non-zero tags in order (0 means no tag), built from offsets, not Python lists."""
    present = tags != 0
    offsets = np.concatenate([[0], np.cumsum(present.sum(axis=1))]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(tags[present].astype(np.int32)),
                                    type=pa.list_(pa.int32()))


def parse_labels_text(text: str, uri: str = "") -> LabelTable:
    """Parse the contents of an ``AVA.txt``-format file. ``uri`` is recorded on rejected rows."""
    # CRLF files read like LF files; any other stray control character fails the line check.
    lines = text.replace("\r\n", "\n").split("\n")
    rejected = _Rejections(uri)
    values, line_numbers, n_lines = _well_formed(lines, rejected)
    keep = _usable(values, line_numbers, rejected)
    return LabelTable(labels=_label_table(values[keep], line_numbers[keep]), rejected=rejected.table(),
                      n_lines=n_lines)


def parse_labels(url: str) -> LabelTable:
    """Parse an ``AVA.txt``-format file at any fsspec URL."""
    text = storage.read_bytes(url).decode("utf-8", errors="replace")
    return parse_labels_text(text, uri=url)


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
