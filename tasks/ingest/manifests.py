"""Labels + verified images -> ``{root}/manifests/{train,val,test,rejected}.parquet`` (DESIGN.md).

Split: 92 / 4 / 4 from a seeded 64-bit hash of each image id (splitmix64), so an image's split
never depends on which other images exist: adding or removing images moves nobody. Or from
user-given id lists (``split_files``: one id per line, or AVA-format lines whose second field is
the id); when no ``train`` list is given, every image not listed elsewhere is ``train`` (the
paper authors' way: they publish val and test lists), otherwise unlisted images are rejected.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from model.aspect_bins import ASPECT_BIN_EDGES, aspect_bin_labels
from tasks.core import storage
from tasks.core.schemas import MANIFEST_SCHEMA, REJECTED_SCHEMA
from tasks.ingest.settings import DEFAULT_FRACTIONS

SPLITS: tuple[str, ...] = ("train", "val", "test")
# Joined manifest rows built at once: what bounds the memory of the manifest stage, whatever the
# number of images (a block costs ~0.5 KB a row, and writing a row group several times that:
# 65,536-row blocks added ~140 MB at 3x10^5 images, 16,384 ~65 MB; docs/performance.md).
BLOCK_ROWS = 16_384

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return (z ^ (z >> np.uint64(31))) & _M64


def split_fraction(image_ids: np.ndarray, seed: int) -> np.ndarray:
    """A uniform number in [0, 1) per image id, fixed by (id, seed) alone."""
    ids = np.asarray(image_ids, dtype=np.int64).astype(np.uint64)
    mixed = _splitmix64(ids ^ _splitmix64(np.full(ids.shape, seed, dtype=np.uint64)))
    return (mixed >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _check_fractions(fractions: tuple[float, float, float]) -> None:
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")


def hash_split(image_ids: np.ndarray, seed: int,
               fractions: tuple[float, float, float] = DEFAULT_FRACTIONS) -> np.ndarray:
    """``train``/``val``/``test`` per id by its seeded hash (object array of str)."""
    _check_fractions(fractions)
    u = split_fraction(image_ids, seed)
    edges = np.cumsum(fractions)[:2]
    return np.asarray(SPLITS, dtype=object)[np.searchsorted(edges, u, side="right")]


def read_id_list(url: str) -> list[int]:
    """Ids from a split file: one per line, or AVA-format lines (second field)."""
    ids = []
    for line in storage.read_bytes(url).decode("utf-8", errors="replace").splitlines():
        fields = line.split()
        if not fields:
            continue
        token = fields[0] if len(fields) == 1 else fields[1]
        if not token.isdigit():
            raise ValueError(f"{url}: not an image id: {line[:60]!r}")
        ids.append(int(token))
    return ids


def split_from_files(split_files: dict[str, str]) -> dict[int, str]:
    """{image id: split} from ``{"val": url, "test": url, ...}``; an id in two lists is an error."""
    unknown = set(split_files) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split names {sorted(unknown)}; use {SPLITS}")
    assignment: dict[int, str] = {}
    for split, url in split_files.items():
        for image_id in read_id_list(url):
            if assignment.get(image_id, split) != split:
                raise ValueError(f"image {image_id} is in both the {assignment[image_id]} and {split} lists")
            assignment[image_id] = split
    return assignment


@dataclass(frozen=True)
class Manifests:
    splits: dict[str, pa.Table]  # MANIFEST_SCHEMA
    rejected: pa.Table  # REJECTED_SCHEMA

    def counts(self) -> dict[str, int]:
        return {name: t.num_rows for name, t in self.splits.items()}

    def rejected_by_stage(self) -> dict[str, int]:
        return rejected_by_stage(self.rejected)


def rejected_by_stage(rejected: pa.Table) -> dict[str, int]:
    """Rejected rows per stage, stages in name order."""
    stages = rejected.column("stage").to_pylist()
    return {s: stages.count(s) for s in sorted(set(stages))}


class ManifestJoin:
    """Labels (``tasks.ingest.labels.LABEL_SCHEMA``) joined with verified images
    (``tasks.core.schemas.IMAGE_SCHEMA``) and split, a block of rows at a time.

    ``blocks`` yields each block's rows per split in image id order, so the blocks of a split,
    one after another, are that split's manifest; only a block of joined rows is ever built.
    ``rejected`` (after ``blocks``) holds the earlier stages' rejected rows (with or without
    ``line_number``) and those found here: a label whose image was neither verified nor rejected,
    and, with split files, an image in no list; so count in == count out.
    """

    def __init__(self, labels: pa.Table, images: pa.Table, rejected: list[pa.Table], *, seed: int = 0,
                 fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
                 split_files: dict[str, str] | None = None) -> None:
        self.labels, self.images, self.earlier = labels, images, rejected
        self.seed, self.fractions = seed, fractions
        self.assignment = split_from_files(split_files) if split_files else None
        self.default = None if split_files and "train" in split_files else "train"
        if self.assignment is None:
            _check_fractions(fractions)
        self.label_rows, self.image_rows = _join_rows(labels, images)  # in image_id order
        self.unlisted: list[pa.Table] = []

    def blocks(self, block_rows: int) -> Iterator[dict[str, pa.Table]]:
        """``{split: MANIFEST_SCHEMA rows}`` of ``block_rows`` joined rows at a time."""
        for start in range(0, len(self.label_rows), block_rows):
            stop = start + block_rows
            table = self._manifest_rows(_joined(self.labels, self.images, self.label_rows[start:stop],
                                                self.image_rows[start:stop]))
            yield {name: table.filter(pc.equal(table.column("split"), name)) for name in SPLITS}

    def _manifest_rows(self, joined: pa.Table) -> pa.Table:
        ids = joined.column("image_id").to_numpy()
        if self.assignment is not None:
            split = np.array([self.assignment.get(int(i), self.default) for i in ids], dtype=object)
            unlisted = np.array([s is None for s in split], dtype=bool)
            if unlisted.any():
                lost = joined.filter(pa.array(unlisted))
                self.unlisted.append(pa.table({
                    "image_id": lost.column("image_id"), "uri": lost.column("uri"),
                    "stage": pa.array(["label"] * lost.num_rows, pa.string()),
                    "reason": pa.array(["not in any split file"] * lost.num_rows, pa.string()),
                    "line_number": lost.column("line_number"),
                }, schema=REJECTED_SCHEMA))
                joined, split = joined.filter(pa.array(~unlisted)), split[~unlisted]
        else:
            split = hash_split(ids, self.seed, self.fractions)
        width = joined.column("width").to_numpy().astype(np.float64)
        height = joined.column("height").to_numpy().astype(np.float64)
        ratio = height / width
        joined = joined.append_column("split", pa.array(split, pa.string()))
        joined = joined.append_column("aspect_ratio", pa.array(ratio, pa.float64()))
        joined = joined.append_column("aspect_bin", aspect_bins(ratio))
        return joined.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA)

    def rejected(self) -> pa.Table:
        """Every rejected row (``REJECTED_SCHEMA``) in line order; call after ``blocks`` has run."""
        # Labels that never reached an image row and were not rejected by fetch: say so. Column
        # operations, not a dict and a set of every id (about 0.2 KB per label line at 10^6).
        labels, extra = self.labels, list(self.unlisted)
        label_ids = pd.Index(labels.column("image_id").to_numpy())
        label_lines = labels.column("line_number").to_numpy()
        earlier = [_conform(t, label_ids, label_lines) for t in self.earlier]
        seen = np.concatenate([self.images.column("image_id").to_numpy(),
                               *(t.column("image_id").to_numpy(zero_copy_only=False) for t in earlier)])
        lost = ~np.isin(label_ids.to_numpy(), seen)
        if lost.any():
            n_lost = int(lost.sum())
            extra.append(pa.table({
                "image_id": pa.array(label_ids.to_numpy()[lost], pa.int64()),
                "uri": pa.nulls(n_lost, pa.string()),
                "stage": pa.array(["fetch"] * n_lost, pa.string()),
                "reason": pa.array(["image was not fetched"] * n_lost, pa.string()),
                "line_number": pa.array(label_lines[lost], pa.int64()),
            }, schema=REJECTED_SCHEMA))
        if not earlier and not extra:
            return REJECTED_SCHEMA.empty_table()
        return pa.concat_tables([*earlier, *extra]).sort_by([("line_number", "ascending")])


def build_manifests(labels: pa.Table, images: pa.Table, rejected: list[pa.Table], *, seed: int = 0,
                    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
                    split_files: dict[str, str] | None = None, block_rows: int = BLOCK_ROWS) -> Manifests:
    """Every manifest in memory (``ManifestJoin``'s blocks put together); ingest writes them block by
    block instead (``tasks.ingest.manifest_files``)."""
    join = ManifestJoin(labels, images, rejected, seed=seed, fractions=fractions, split_files=split_files)
    parts: dict[str, list[pa.Table]] = {name: [] for name in SPLITS}
    for block in join.blocks(block_rows):
        for name, rows in block.items():
            parts[name].append(rows)
    splits = {name: pa.concat_tables(parts[name]) if parts[name] else MANIFEST_SCHEMA.empty_table()
              for name in SPLITS}
    return Manifests(splits=splits, rejected=join.rejected())


def _join_rows(labels: pa.Table, images: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(label row, image row) of every image id on both sides, sorted by id (8 bytes each per row)."""
    label_ids = pd.Index(labels.column("image_id").to_numpy())
    image_ids = images.column("image_id").to_numpy()
    pos = label_ids.get_indexer(image_ids)
    rows = np.flatnonzero(pos >= 0)
    rows = rows[np.argsort(image_ids[rows], kind="stable")]
    return pos[rows], rows


def _joined(labels: pa.Table, images: pa.Table, label_rows: np.ndarray, image_rows: np.ndarray) -> pa.Table:
    """Those rows of labels with their image facts (Arrow's own join refuses list columns)."""
    left = labels.take(pa.array(label_rows))
    right = images.take(pa.array(image_rows))
    for name in right.column_names:
        if name not in left.column_names and name != "verified":
            left = left.append_column(name, right.column(name))
    return left


def aspect_bins(ratio: np.ndarray) -> pa.Array:
    """``model.aspect_bins.aspect_bin`` of every ratio, as one string array (null outside the bins)."""
    edges = np.asarray(ASPECT_BIN_EDGES, dtype=np.float64)
    index = np.searchsorted(edges, ratio, side="right") - 1  # bisect_right, as aspect_bin
    inside = np.isfinite(ratio) & (ratio >= edges[0]) & (index < len(edges) - 1)
    labels = pa.array(aspect_bin_labels(ASPECT_BIN_EDGES), pa.string())
    return labels.take(pa.array(np.where(inside, index, 0), mask=~inside))


def _conform(table: pa.Table, label_ids: pd.Index, label_lines: np.ndarray) -> pa.Table:
    """Any rejected table -> ``REJECTED_SCHEMA`` (line numbers looked up when absent)."""
    if "line_number" not in table.column_names:
        at = label_ids.get_indexer(table.column("image_id").to_numpy(zero_copy_only=False))
        lines = pa.array(label_lines[np.maximum(at, 0)], pa.int64(), mask=at < 0)
        table = table.append_column("line_number", lines)
    return table.select(REJECTED_SCHEMA.names).cast(REJECTED_SCHEMA)


def manifest_urls(root: str) -> dict[str, str]:
    return {name: storage.join(root, "manifests", f"{name}.parquet") for name in (*SPLITS, "rejected")}


def read_manifest_table(root: str, split: str) -> pa.Table:
    """One split of the ingest manifests (or ``rejected``) as an Arrow table; training reads its
    columns as arrays through ``tasks.training.datasets.read_manifest``."""
    return storage.read_parquet(manifest_urls(root)[split])
