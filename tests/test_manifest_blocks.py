"""Manifests built and written a block of rows at a time equal the manifests of one block (issue 22)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.core import storage
from tasks.ingest import manifest_files
from tasks.ingest.labels import parse_labels_text
from tasks.ingest.manifest_files import write_manifests
from tasks.ingest.manifests import SPLITS, ManifestJoin, build_manifests, manifest_urls
from tests.test_manifests import _images

IDS = [91, 12, 57, 34, 7, 88, 23, 45, 66, 3, 79, 18, 50, 29, 61, 95, 40, 2, 73, 14]


def _inputs(tmp_path):
    """Labels in no id order, a bad line, images in another order, one label never fetched, one
    rejected by fetch, and split lists that leave some images unlisted."""
    text = "".join(f"{n} {i} 0 1 2 3 4 3 2 1 0 {n % 3} {n % 5} 0 {n}\n" for n, i in enumerate(IDS, 1)) + "21 bad\n"
    parsed = parse_labels_text(text)
    fetched = [i for i in IDS if i not in (45, 61)]
    images = _images([(i, 100 + 7 * i, 60 + 11 * i) for i in reversed(fetched)])
    fetch_rejected = pa.table({"image_id": pa.array([61], pa.int64()), "uri": ["/src/61.jpg"], "stage": ["decode"],
                               "reason": ["broken"]})
    (tmp_path / "val.txt").write_text("12\n57\n3\n")
    (tmp_path / "train.txt").write_text("\n".join(["91", "34", "7", "88", "23", "66", "79", "18", "50"]) + "\n")
    return parsed, images, [parsed.rejected, fetch_rejected]


@pytest.mark.parametrize("split_files", [False, True])
@pytest.mark.parametrize("block_rows", [1, 3, 7])
def test_blocks_of_rows_give_the_manifests_of_one_block(tmp_path, block_rows, split_files):
    parsed, images, rejected = _inputs(tmp_path)
    files = {"val": str(tmp_path / "val.txt"), "train": str(tmp_path / "train.txt")} if split_files else None
    kwargs = {"seed": 1, "fractions": (0.5, 0.25, 0.25), "split_files": files}
    whole = build_manifests(parsed.labels, images, rejected, block_rows=10**6, **kwargs)
    assert sum(whole.counts().values()) + whole.rejected.num_rows == parsed.n_lines == 21
    blocks = build_manifests(parsed.labels, images, rejected, block_rows=block_rows, **kwargs)
    for name in SPLITS:
        assert blocks.splits[name].equals(whole.splits[name])
    assert blocks.rejected.equals(whole.rejected)


def test_manifest_files_written_by_blocks_read_back_as_one_block(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest_files, "ROW_GROUP_ROWS", 2)  # several row groups per file
    parsed, images, rejected = _inputs(tmp_path)
    files = {"val": str(tmp_path / "val.txt")}
    whole = build_manifests(parsed.labels, images, rejected, seed=2, split_files=files)
    root = str(tmp_path / "root")
    join = ManifestJoin(parsed.labels, images, rejected, seed=2, split_files=files)
    written = write_manifests(join, root, block_rows=3)
    assert written.paths == manifest_urls(root)
    for name in SPLITS:
        table = storage.read_parquet(written.paths[name])
        assert table.equals(whole.splits[name]) and table.schema == whole.splits[name].schema
    assert pq.ParquetFile(written.paths["train"]).num_row_groups > 1
    assert storage.read_parquet(written.paths["rejected"]).equals(whole.rejected)
    assert written.counts == whole.counts() and written.rejected_by_stage() == whole.rejected_by_stage()
    usable = pa.concat_tables(list(whole.splits.values()))
    np.testing.assert_array_equal(written.aspect_ratio, usable.column("aspect_ratio").to_numpy())
    assert written.aspect_bins == dict(sorted(Counter(usable.column("aspect_bin").to_pylist()).items()))
    assert sorted(p.name for p in (tmp_path / "root" / "manifests").iterdir()) == [
        "rejected.parquet", "test.parquet", "train.parquet", "val.parquet"]  # no temporary file left


def test_a_failed_write_leaves_no_manifest_and_no_temporary_file(tmp_path):
    parsed, images, rejected = _inputs(tmp_path)
    join = ManifestJoin(parsed.labels, images, rejected)

    def broken_blocks(block_rows):
        yield from ManifestJoin.blocks(join, block_rows)
        raise OSError("disk full")

    join.blocks = broken_blocks
    with pytest.raises(OSError, match="disk full"):
        write_manifests(join, str(tmp_path / "root"), block_rows=2)
    assert list((tmp_path / "root" / "manifests").iterdir()) == []
