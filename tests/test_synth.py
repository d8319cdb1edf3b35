"""The synthetic AVA: format, label statistics, aspect ratios, determinism, the generative rule."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from model.aspect_bins import aspect_bin, aspect_bin_labels
from tasks.core import storage
from tasks.ingest.labels import parse_labels
from tasks.ingest.synth import (
    draw_params,
    latent_z,
    rating_probabilities,
    render_image,
    synthesize_ava,
    tags_and_challenge,
    vote_counts,
)


@pytest.fixture(scope="module")
def params():
    return [draw_params(7, i) for i in range(3000)]


def test_label_statistics_match_real_ava(params, data_dir):
    counts = np.array([vote_counts(p) for p in params])
    n = counts.sum(1)
    mean = (counts * np.arange(1, 11)).sum(1) / n
    std = np.sqrt((counts * (np.arange(1, 11) - mean[:, None]) ** 2).sum(1) / n)
    real = np.loadtxt(data_dir / "AVA_val_labels.txt", dtype=np.int64)[:, 2:12]
    real_n = real.sum(1)
    real_mean = (real * np.arange(1, 11)).sum(1) / real_n
    assert n.min() >= 78 and n.max() <= 649
    assert abs(n.mean() - real_n.mean()) < 8 and abs(n.std() - real_n.std()) < 8
    assert abs(mean.mean() - real_mean.mean()) < 0.06
    assert abs(mean.std() - real_mean.std()) < 0.06
    assert abs(std.mean() - 1.43) < 0.06
    # Votes carry the latent score: their mean tracks it closely.
    assert np.corrcoef(mean, [p.latent_score for p in params])[0, 1] > 0.95


def test_rating_probabilities_are_a_distribution():
    for score, sd in [(1.0, 0.8), (5.4, 1.43), (9.5, 2.3)]:
        p = rating_probabilities(score, sd)
        assert p.shape == (10,) and np.all(p >= 0) and p.sum() == pytest.approx(1.0)
    p = rating_probabilities(5.4, 1.43)
    assert (p * np.arange(1, 11)).sum() == pytest.approx(5.4, abs=0.01)


def test_every_analysis_bin_and_avas_peaks(params):
    bins = [aspect_bin(p.aspect_ratio) for p in params[:2000]]
    for label in aspect_bin_labels():
        assert bins.count(label) >= 40, (label, bins.count(label))
    ratios = np.array([p.aspect_ratio for p in params])
    assert np.mean((ratios >= 0.65) & (ratios < 0.70)) > 0.25  # the 2:3 peak
    assert np.mean((ratios >= 0.70) & (ratios < 0.80)) > 0.10  # the 3:4 peak
    assert all(384 <= max(p.width, p.height) <= 512 for p in params)


def test_latent_rule_weights():
    # Round, sharp, contrasty beats stretched, blurred, flat; each term moves the latent the right way.
    assert latent_z(0.0, 1.0, 1.0, 0.0) > 1.5 > -1.5 > latent_z(0.9, 0.0, 0.0, 0.0)
    assert latent_z(0.0, 0.5, 0.5, 0.0) > latent_z(0.5, 0.5, 0.5, 0.0)
    assert latent_z(0.3, 0.9, 0.5, 0.0) > latent_z(0.3, 0.1, 0.5, 0.0)
    zs = [latent_z(p.elongation, p.sharpness, p.contrast, p.noise) for p in (draw_params(1, i) for i in range(2000))]
    assert abs(np.mean(zs)) < 0.08 and abs(np.std(zs) - 1.0) < 0.08


def test_rendered_geometry_and_sharpness_follow_the_parameters():
    base = draw_params(3, 0)
    h, w = base.height, base.width
    img = render_image(base)
    assert img.shape == (h, w, 3) and img.dtype == np.uint8

    def high_freq(p):
        grey = render_image(p).astype(np.float64).mean(-1)
        return float(np.abs(np.diff(grey, axis=1)).mean())

    from dataclasses import replace
    sharp, blurred = replace(base, sharpness=1.0), replace(base, sharpness=0.0)
    assert high_freq(sharp) > 3 * high_freq(blurred)


def test_tags_follow_the_real_file():
    draws = [tags_and_challenge(0, i) for i in range(3000)]
    t1 = np.array([d[0] for d in draws])
    t2 = np.array([d[1] for d in draws])
    assert abs(np.mean(t1 == 0) - 0.229) < 0.03 and abs(np.mean(t2 == 0) - 0.418) < 0.04
    assert np.all(t2[t1 == 0] == 0) and not np.any((t1 == t2) & (t1 > 0))
    assert all(1 <= d[2] <= 1450 for d in draws)


def test_synthesize_writes_ava_format_deterministically(tmp_path):
    a = synthesize_ava(str(tmp_path / "a"), 12, seed=5, workers=1)
    synthesize_ava(str(tmp_path / "b"), 12, seed=5, workers=1)
    synthesize_ava(str(tmp_path / "c"), 6, seed=6, workers=1)
    text_a = (tmp_path / "a" / "AVA.txt").read_text()
    assert text_a == (tmp_path / "b" / "AVA.txt").read_text()
    assert text_a != (tmp_path / "c" / "AVA.txt").read_text()
    parsed = parse_labels(a["labels"])
    assert parsed.rejected.num_rows == 0 and parsed.labels.num_rows == 12
    ids = parsed.labels.column("image_id").to_pylist()
    for image_id in ids:
        data = (tmp_path / "a" / "images" / f"{image_id}.jpg").read_bytes()
        assert data == (tmp_path / "b" / "images" / f"{image_id}.jpg").read_bytes()
        assert data[:2] == b"\xff\xd8"
    side = pq.read_table(a["params"]).to_pylist()
    assert [r["image_id"] for r in side] == ids
    assert parsed.labels.column("n_ratings").to_pylist() == [r["n_votes"] for r in side]
    # A prefix of a larger set is the smaller set.
    synthesize_ava(str(tmp_path / "d"), 6, seed=5, workers=1)
    assert storage.read_bytes(str(tmp_path / "d" / "AVA.txt")).decode().splitlines() == text_a.splitlines()[:6]
    assert draw_params(5, 3) == [draw_params(5, i) for i in range(5)][3]
