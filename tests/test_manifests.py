"""Split assignment, manifest assembly and the aspect-ratio histogram."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pytest

from model.aspect_bins import aspect_bin, aspect_bin_labels
from tasks.core.schemas import IMAGE_SCHEMA
from tasks.ingest.histogram import analysis_bin_counts, fine_histogram
from tasks.ingest.labels import parse_labels_text
from tasks.ingest.manifests import MANIFEST_SCHEMA, build_manifests, hash_split, split_from_files


def test_hash_split_fractions_and_stability():
    ids = np.arange(1, 200_001, dtype=np.int64) * 7
    split = hash_split(ids, seed=0)
    shares = {s: float(np.mean(split == s)) for s in ("train", "val", "test")}
    assert abs(shares["train"] - 0.92) < 0.003 and abs(shares["val"] - 0.04) < 0.002
    # An image's split depends on (id, seed) only: subsets and supersets agree.
    subset = ids[::3]
    np.testing.assert_array_equal(hash_split(subset, seed=0), split[::3])
    np.testing.assert_array_equal(hash_split(ids[::-1], seed=0), split[::-1])
    assert np.mean(hash_split(ids, seed=1) != split) > 0.1  # the seed matters
    with pytest.raises(ValueError):
        hash_split(ids, 0, (0.5, 0.5, 0.5))


def test_split_files_from_the_authors_lists(data_dir):
    assignment = split_from_files({"val": str(data_dir / "AVA_val_labels.txt"),
                                   "test": str(data_dir / "AVA_test_labels.txt")})
    assert sum(1 for s in assignment.values() if s == "val") == 10220
    assert sum(1 for s in assignment.values() if s == "test") == 10220
    with pytest.raises(ValueError, match="both"):
        split_from_files({"val": str(data_dir / "AVA_val_labels.txt"), "test": str(data_dir / "AVA_val_labels.txt")})


def _images(rows):
    return pa.Table.from_pylist([{
        "image_id": i, "uri": f"/x/{i}.jpg", "source_uri": f"/src/{i}.jpg", "width": w, "height": h,
        "raw_width": w, "raw_height": h, "orientation": 1, "format": "JPEG", "bytes": 10,
        "checksum": hashlib.md5(str(i).encode()).hexdigest(), "verified": "header"} for i, w, h in rows],
        schema=IMAGE_SCHEMA)


def test_build_manifests_columns_and_counts(tmp_path):
    text = "".join(f"{k} {100 + k} 0 0 1 2 3 4 3 2 1 {k} 1 0 5\n" for k in range(1, 41)) + "41 999 bad\n"
    parsed = parse_labels_text(text)
    images = _images([(100 + k, 400, 100 + 10 * k) for k in range(1, 40)])  # image 140 never fetched
    fetch_rejected = pa.table({"image_id": pa.array([], pa.int64()), "uri": pa.array([], pa.string()),
                               "stage": pa.array([], pa.string()), "reason": pa.array([], pa.string())})
    m = build_manifests(parsed.labels, images, [parsed.rejected, fetch_rejected], seed=3)
    table = pa.concat_tables(m.splits.values())
    assert table.schema == MANIFEST_SCHEMA
    assert sum(m.counts().values()) == 39 and m.rejected_by_stage() == {"fetch": 1, "parse": 1}
    assert m.rejected.column("line_number").to_pylist() == [40, 41]
    rows = {r["image_id"]: r for r in table.to_pylist()}
    r = rows[105]
    assert (r["width"], r["height"], r["aspect_ratio"]) == (400, 150, 150 / 400)
    assert r["aspect_bin"] == aspect_bin(150 / 400) == "0.0-0.4"
    assert r["rating_counts"] == [0, 0, 1, 2, 3, 4, 3, 2, 1, 5] and r["n_ratings"] == 21
    assert r["score_mean"] == pytest.approx(sum((i + 1) * c for i, c in enumerate(r["rating_counts"])) / 21)
    assert r["semantic_tags"] == [1] and r["challenge_id"] == 5
    assert r["split"] == hash_split(np.array([105]), 3)[0]
    # With files: ids in no list go to train when no train list is given.
    (tmp_path / "val.txt").write_text("101\n102\n")
    m2 = build_manifests(parsed.labels, images, [parsed.rejected], split_files={"val": str(tmp_path / "val.txt")})
    assert m2.counts() == {"train": 37, "val": 2, "test": 0}
    (tmp_path / "train.txt").write_text("103\n")
    m3 = build_manifests(parsed.labels, images, [parsed.rejected],
                         split_files={"val": str(tmp_path / "val.txt"), "train": str(tmp_path / "train.txt")})
    assert m3.counts() == {"train": 1, "val": 2, "test": 0}
    assert m3.rejected_by_stage()["label"] == 36  # listed nowhere: rejected, not lost


def test_fine_histogram_bins_and_overflow():
    ratios = np.array([0.0, 0.049, 0.05, 0.65, 0.6667, 0.70, 0.75, 2.49, 2.5, 7.0, np.nan])
    h = fine_histogram(ratios).to_pydict()
    assert len(h["lo"]) == 51 and h["hi"][-1] == float("inf")
    counts = dict(zip(np.round(h["lo"], 2), h["count"], strict=True))
    assert counts[0.0] == 2 and counts[0.05] == 1 and counts[0.65] == 2 and counts[0.7] == 1
    assert counts[0.75] == 1 and counts[2.45] == 1 and counts[2.5] == 2
    assert sum(h["count"]) == 10


def test_analysis_bins_agree_with_model_metrics():
    rng = np.random.default_rng(0)
    ratios = rng.uniform(0.1, 2.5, 5000)
    table = analysis_bin_counts(ratios).to_pydict()
    assert table["bin"] == aspect_bin_labels()
    expected = [sum(1 for r in ratios if aspect_bin(r) == b) for b in table["bin"]]
    assert table["count"] == expected
