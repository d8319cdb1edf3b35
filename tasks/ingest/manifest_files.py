"""``{root}/manifests/{train,val,test,rejected}.parquet`` written a block of rows at a time.

``ManifestJoin`` yields each block's rows per split in image id order; each split's rows are
appended to its own Parquet file (a row group per ``ROW_GROUP_ROWS`` rows or more), so the stage
holds the labels, the verified images and a block, never every manifest at once (issue 22: 1.07 KB
per label line at the peak before). The files read back as the in-memory ``build_manifests`` would
write them: same rows, same order. Each appears whole or not at all (``storage.atomic_local_file``).
"""

from __future__ import annotations

from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.core import storage
from tasks.core.schemas import MANIFEST_SCHEMA
from tasks.ingest.manifests import BLOCK_ROWS, SPLITS, ManifestJoin, manifest_urls, rejected_by_stage

# Rows of a split written as one row group: small splits (val, test: 4% of a block) wait for this
# many, so they are not hundreds of tiny row groups; the wait is bounded by this number, not by the
# dataset, and so is the Parquet writer's encoding memory (dictionaries, compression) per group.
ROW_GROUP_ROWS = 16_384
COMPRESSION = "zstd"  # as storage.write_parquet_atomic writes every other table


@dataclass(frozen=True)
class WrittenManifests:
    """What the manifest stage reports and the histogram needs, without the manifests' rows."""

    paths: dict[str, str]
    counts: dict[str, int]
    rejected: pa.Table  # REJECTED_SCHEMA, every rejected row in line order
    aspect_ratio: np.ndarray  # of every usable image, train then val then test rows
    aspect_bins: dict[str | None, int]  # usable images per aspect bin, in bin order

    def rejected_by_stage(self) -> dict[str, int]:
        return rejected_by_stage(self.rejected)


class _SplitFile:
    """One split's Parquet file: rows appended in order, written a row group at a time."""

    def __init__(self, path: str) -> None:
        self.writer = pq.ParquetWriter(path, MANIFEST_SCHEMA, compression=COMPRESSION)
        self.pending: list[pa.Table] = []
        self.n_pending = self.n_rows = 0
        self.ratios: list[np.ndarray] = []
        self.bins: Counter = Counter()

    def append(self, rows: pa.Table) -> None:
        self.ratios.append(rows.column("aspect_ratio").to_numpy())
        for entry in pc.value_counts(rows.column("aspect_bin")).to_pylist():
            self.bins[entry["values"]] += entry["counts"]
        self.pending.append(rows)
        self.n_pending += rows.num_rows
        self.n_rows += rows.num_rows
        if self.n_pending >= ROW_GROUP_ROWS:
            self.flush()

    def flush(self) -> None:
        if self.n_pending:
            self.writer.write_table(pa.concat_tables(self.pending), row_group_size=self.n_pending)
        self.pending, self.n_pending = [], 0

    def close(self) -> None:
        self.flush()
        self.writer.close()


def write_manifests(join: ManifestJoin, root: str, block_rows: int = BLOCK_ROWS) -> WrittenManifests:
    """Write every split of ``join`` block by block, then the rejected rows; returns their URLs (train,
    val, test, rejected), the counts and what the histogram and the summary need."""
    urls = manifest_urls(root)
    with ExitStack() as stack:
        files = {name: _SplitFile(stack.enter_context(storage.atomic_local_file(urls[name]))) for name in SPLITS}
        for split_file in files.values():  # closed before its file is moved into place, or on an error
            stack.callback(split_file.writer.close)
        for block in join.blocks(block_rows):
            for name, rows in block.items():
                files[name].append(rows)
            del block
        for split_file in files.values():
            split_file.close()
    # The split files are in place; the rejected rows need every block seen (unlisted images).
    rejected = join.rejected()
    storage.write_parquet_atomic(rejected, urls["rejected"])
    bins: Counter = sum((f.bins for f in files.values()), Counter())
    ratios = [r for name in SPLITS for r in files[name].ratios]
    return WrittenManifests(
        paths=urls, counts={name: files[name].n_rows for name in SPLITS}, rejected=rejected,
        aspect_ratio=np.concatenate(ratios) if ratios else np.empty(0, dtype=np.float64),
        aspect_bins=dict(sorted(bins.items())),
    )
