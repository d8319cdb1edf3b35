"""Labels + verified images -> ``{root}/manifests/{train,val,test,rejected}.parquet`` (DESIGN.md).

Split: 92 / 4 / 4 from a seeded 64-bit hash of each image id (splitmix64), so an image's split
never depends on which other images exist: adding or removing images moves nobody. Or from
user-given id lists (``split_files``: one id per line, or AVA-format lines whose second field is
the id); when no ``train`` list is given, every image not listed elsewhere is ``train`` (the
paper authors' way: they publish val and test lists), otherwise unlisted images are rejected.
"""

from __future__ import annotations

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


def hash_split(image_ids: np.ndarray, seed: int,
               fractions: tuple[float, float, float] = DEFAULT_FRACTIONS) -> np.ndarray:
    """``train``/``val``/``test`` per id by its seeded hash (object array of str)."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
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
        stages = self.rejected.column("stage").to_pylist()
        return {s: stages.count(s) for s in sorted(set(stages))}


def build_manifests(labels: pa.Table, images: pa.Table, rejected: list[pa.Table], *, seed: int = 0,
                    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
                    split_files: dict[str, str] | None = None) -> Manifests:
    """Join labels (``tasks.ingest.labels.LABEL_SCHEMA``) with verified images (``tasks.core.schemas.IMAGE_SCHEMA``).

    ``rejected`` holds earlier stages' rejected tables (with or without ``line_number``); a label
    whose image was neither verified nor rejected is rejected here, so count in == count out.
    """
    joined = _inner_join(labels, images)  # in image_id order
    ids = joined.column("image_id").to_numpy()
    extra_rejected = []
    if split_files:
        assignment = split_from_files(split_files)
        default = None if "train" in split_files else "train"
        split = np.array([assignment.get(int(i), default) for i in ids], dtype=object)
        unlisted = np.array([s is None for s in split], dtype=bool)
        if unlisted.any():
            lost = joined.filter(pa.array(unlisted))
            extra_rejected.append(pa.table({
                "image_id": lost.column("image_id"), "uri": lost.column("uri"),
                "stage": pa.array(["label"] * lost.num_rows, pa.string()),
                "reason": pa.array(["not in any split file"] * lost.num_rows, pa.string()),
                "line_number": lost.column("line_number"),
            }, schema=REJECTED_SCHEMA))
            joined, split = joined.filter(pa.array(~unlisted)), split[~unlisted]
    else:
        split = hash_split(ids, seed, fractions)

    width = joined.column("width").to_numpy().astype(np.float64)
    height = joined.column("height").to_numpy().astype(np.float64)
    ratio = height / width
    joined = joined.append_column("split", pa.array(split, pa.string()))
    joined = joined.append_column("aspect_ratio", pa.array(ratio, pa.float64()))
    joined = joined.append_column("aspect_bin", aspect_bins(ratio))
    table = joined.select(MANIFEST_SCHEMA.names).cast(MANIFEST_SCHEMA)
    del joined  # each full-width copy costs ~0.3 KB per image: hold one at a time

    # Labels that never reached an image row and were not rejected by fetch: say so. Column
    # operations, not a dict and a set of every id (about 0.2 KB per label line at 10^6).
    label_ids = pd.Index(labels.column("image_id").to_numpy())
    label_lines = labels.column("line_number").to_numpy()
    earlier = [_conform(t, label_ids, label_lines) for t in rejected]
    seen = np.concatenate([images.column("image_id").to_numpy(),
                           *(t.column("image_id").to_numpy(zero_copy_only=False) for t in earlier)])
    lost = ~np.isin(label_ids.to_numpy(), seen)
    if lost.any():
        n_lost = int(lost.sum())
        extra_rejected.append(pa.table({
            "image_id": pa.array(label_ids.to_numpy()[lost], pa.int64()),
            "uri": pa.nulls(n_lost, pa.string()),
            "stage": pa.array(["fetch"] * n_lost, pa.string()),
            "reason": pa.array(["image was not fetched"] * n_lost, pa.string()),
            "line_number": pa.array(label_lines[lost], pa.int64()),
        }, schema=REJECTED_SCHEMA))
    all_rejected = pa.concat_tables([*earlier, *extra_rejected]) if earlier or extra_rejected \
        else REJECTED_SCHEMA.empty_table()
    splits = {name: table.filter(pc.equal(table.column("split"), name)) for name in SPLITS}
    del table
    return Manifests(splits=splits, rejected=all_rejected.sort_by([("line_number", "ascending")]))


def _inner_join(labels: pa.Table, images: pa.Table) -> pa.Table:
    """Labels with their image facts, by id, sorted by id (Arrow's own join refuses list columns).
    One ``take`` per side in sorted order, not a join then a sort: one copy of the rows, not two."""
    label_ids = pd.Index(labels.column("image_id").to_numpy())
    image_ids = images.column("image_id").to_numpy()
    pos = label_ids.get_indexer(image_ids)
    rows = np.flatnonzero(pos >= 0)
    rows = rows[np.argsort(image_ids[rows], kind="stable")]
    left = labels.take(pa.array(pos[rows]))
    right = images.take(pa.array(rows))
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


def write_manifests(manifests: Manifests, root: str) -> dict[str, str]:
    """Write the four Parquet files atomically; returns their URLs."""
    urls = manifest_urls(root)
    for name in SPLITS:
        storage.write_parquet_atomic(manifests.splits[name], urls[name])
    storage.write_parquet_atomic(manifests.rejected, urls["rejected"])
    return urls


def read_manifest_table(root: str, split: str) -> pa.Table:
    """One split of the ingest manifests (or ``rejected``) as an Arrow table; training reads its
    columns as arrays through ``tasks.training.datasets.read_manifest``."""
    return storage.read_parquet(manifest_urls(root)[split])
