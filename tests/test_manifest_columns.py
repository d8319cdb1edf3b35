"""The manifest columns computed for every row at once (issue 22) equal the per-row definitions."""

from __future__ import annotations

import numpy as np

from model.aspect_bins import ASPECT_BIN_EDGES, aspect_bin
from tasks.ingest.labels import parse_labels_text
from tasks.ingest.manifests import SPLITS, aspect_bins, build_manifests
from tests.test_manifests import _images


def test_aspect_bins_equal_aspect_bin_on_edges_and_between():
    finite = [e for e in ASPECT_BIN_EDGES if np.isfinite(e)]
    ratios = np.array([*finite, *np.nextafter(finite, -np.inf), *np.nextafter(finite, np.inf), 2 / 3, 0.75, 1.0,
                       -1.0, np.inf, -np.inf, np.nan, *np.random.default_rng(0).uniform(0, 3, 1000)])
    assert aspect_bins(ratios).to_pylist() == [aspect_bin(r) for r in ratios]


def test_manifest_rows_are_in_id_order_whatever_order_the_images_come_in():
    ids = [9, 2, 7, 4, 11, 5, 3, 8]
    text = "".join(f"{n} {i} 0 0 0 1 2 3 0 0 0 0 0 0 0\n" for n, i in enumerate(ids, 1))
    labels = parse_labels_text(text).labels
    images = _images([(i, 100 + i, 80) for i in reversed(ids)])
    manifests = build_manifests(labels, images, [], fractions=(0.5, 0.25, 0.25))
    for name in SPLITS:
        got = manifests.splits[name].column("image_id").to_pylist()
        assert got == sorted(got)
    assert sorted(i for t in manifests.splits.values() for i in t.column("image_id").to_pylist()) == sorted(ids)
