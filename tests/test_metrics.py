"""Score metrics against scipy/numpy, aspect bins, and NaN (never an exception) for degenerate input."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import stats

from model.aspect_bins import ASPECT_BIN_EDGES, aspect_bin, aspect_bin_labels
from model.metrics import (
    aspect_bin_table,
    distribution_metrics,
    emd_np,
    normalize_counts,
    pearson,
    rankdata,
    regression_metrics,
    score_from_dist,
    spearman,
    std_from_dist,
)

RATINGS = np.arange(1, 11, dtype=np.float64)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20190616)


def random_dists(rng: np.random.Generator, n: int) -> np.ndarray:
    d = rng.gamma(1.0, size=(n, 10))
    return d / d.sum(1, keepdims=True)


# ---- distributions -> score / std -----------------------------------------------------------------

def test_score_and_std_from_dist(rng):
    d = random_dists(rng, 50)
    expected_mean = np.array([np.average(RATINGS, weights=row) for row in d])
    expected_std = np.array([math.sqrt(np.cov(RATINGS, aweights=row, bias=True)) for row in d])
    np.testing.assert_allclose(score_from_dist(d), expected_mean, rtol=1e-12)
    np.testing.assert_allclose(std_from_dist(d), expected_std, rtol=1e-10)
    # torch input, one-hot (std exactly 0, no NaN from a tiny negative variance)
    one_hot = torch.zeros(10)
    one_hot[6] = 1.0
    assert float(score_from_dist(one_hot)) == pytest.approx(7.0)
    assert float(std_from_dist(one_hot)) == 0.0


def test_ava_label_lines_give_known_scores(data_dir):
    """AVA's first val line, by hand: counts -> distribution -> mean and std."""
    line = (data_dir / "AVA_val_labels.txt").read_text().splitlines()[0].split()
    counts = np.array([int(c) for c in line[2:12]], dtype=np.float64)
    dist = normalize_counts(counts)
    votes = np.repeat(RATINGS, counts.astype(int))  # one entry per voter
    assert float(score_from_dist(dist)) == pytest.approx(votes.mean(), rel=1e-12)
    assert float(std_from_dist(dist)) == pytest.approx(votes.std(), rel=1e-10)


def test_normalize_counts_marks_unlabelled_rows_nan():
    counts = np.array([[1, 2, 3, 4, 0, 0, 0, 0, 0, 0], [0] * 10])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no divide-by-zero warnings leak out
        d = normalize_counts(counts)
    np.testing.assert_allclose(d[0], np.array([1, 2, 3, 4, 0, 0, 0, 0, 0, 0]) / 10)
    assert np.isnan(d[1]).all()


def test_emd_np_matches_torch_emd(rng):
    from model.losses import emd

    p, q = random_dists(rng, 20), random_dists(rng, 20)
    for r in (1.0, 2.0):
        np.testing.assert_allclose(emd_np(p, q, r), emd(torch.from_numpy(p), torch.from_numpy(q), r=r).numpy(),
                                   rtol=1e-12)


# ---- correlations and regression metrics vs scipy -------------------------------------------------

@pytest.mark.parametrize("n", [2, 3, 10, 500])
def test_pearson_and_spearman_match_scipy(rng, n):
    x = rng.normal(5, 1, n)
    y = 0.6 * x + rng.normal(0, 0.5, n)
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y).statistic, abs=1e-12)
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)


def test_spearman_with_ties_matches_scipy(rng):
    # AVA-like scores rounded to one decimal: many ties on both sides
    x = np.round(rng.normal(5.4, 0.7, 300), 1)
    y = np.round(x + rng.normal(0, 0.4, 300), 1)
    assert len(np.unique(x)) < 100
    np.testing.assert_array_equal(rankdata(x), stats.rankdata(x))
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    ints = rng.integers(0, 4, 50)
    np.testing.assert_array_equal(rankdata(ints), stats.rankdata(ints))


def test_regression_metrics_match_numpy_and_scipy(rng):
    t = rng.normal(5.4, 0.75, 400)
    p = t + rng.normal(0, 0.5, 400)
    m = regression_metrics(p, t)
    assert m["n"] == 400
    assert m["mse"] == pytest.approx(np.mean((p - t) ** 2), rel=1e-12)
    assert m["mae"] == pytest.approx(np.mean(np.abs(p - t)), rel=1e-12)
    assert m["rmse"] == pytest.approx(math.sqrt(np.mean((p - t) ** 2)), rel=1e-12)
    assert m["lcc"] == pytest.approx(stats.pearsonr(p, t).statistic, abs=1e-12)
    assert m["srcc"] == pytest.approx(stats.spearmanr(p, t).statistic, abs=1e-12)
    assert m["accuracy"] == pytest.approx(np.mean((p > 5) == (t > 5)))


def test_accuracy_threshold_is_strictly_above_five():
    # score > 5 is "high": 5.0 itself is low
    m = regression_metrics([5.0, 5.01, 4.9, 6.0], [5.01, 5.0, 4.0, 5.5])
    assert m["accuracy"] == pytest.approx(0.5)  # pairs 1, 2 disagree; 3, 4 agree


def test_distribution_metrics(rng):
    true = random_dists(rng, 60)
    pred = 0.7 * true + 0.3 * random_dists(rng, 60)
    m = distribution_metrics(torch.from_numpy(pred), true)
    s_pred, s_true = pred @ RATINGS, true @ RATINGS
    assert m["mse"] == pytest.approx(np.mean((s_pred - s_true) ** 2), rel=1e-12)
    assert m["lcc"] == pytest.approx(stats.pearsonr(s_pred, s_true).statistic, abs=1e-12)
    cdf_gap = np.cumsum(pred, 1) - np.cumsum(true, 1)
    assert m["emd2"] == pytest.approx(np.mean(np.sqrt(np.mean(cdf_gap ** 2, 1))), rel=1e-12)
    assert m["emd1"] == pytest.approx(np.mean(np.mean(np.abs(cdf_gap), 1)), rel=1e-12)
    std_pred = np.sqrt(((RATINGS - s_pred[:, None]) ** 2 * pred).sum(1))
    std_true = np.sqrt(((RATINGS - s_true[:, None]) ** 2 * true).sum(1))
    assert m["std_lcc"] == pytest.approx(stats.pearsonr(std_pred, std_true).statistic, abs=1e-12)


# ---- degenerate input: NaN, no exception, no warning ---------------------------------------------

@pytest.mark.parametrize("constant", [5.3, 0.1, 1 / 3, 6.123456789])
def test_constant_predictions_give_nan_correlations(constant):
    # 0.1 * 7 averages to 0.10000000000000002: centring must not leave noise that looks like signal
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = regression_metrics(np.full(7, constant), np.arange(7.0))
    assert math.isnan(m["lcc"]) and math.isnan(m["srcc"])
    assert m["mae"] == pytest.approx(np.mean(np.abs(constant - np.arange(7.0))))
    assert math.isnan(pearson(np.arange(7.0), np.full(7, constant)))


def test_float32_rounding_noise_is_constant_but_a_small_real_spread_is_not(rng):
    # A constant model output computed in different batch shapes differs by a few float32 ulps.
    noisy = (np.float32(5.3) + rng.integers(-3, 4, 50) * np.spacing(np.float32(5.3))).astype(np.float64)
    truth = rng.normal(5.4, 0.7, 50)
    assert math.isnan(pearson(noisy, truth)) and math.isnan(spearman(noisy, truth))
    spread = 5.3 + rng.normal(0, 1e-3, 50)
    assert not math.isnan(pearson(spread, truth)) and not math.isnan(spearman(spread, truth))


@pytest.mark.parametrize("n", [0, 1])
def test_tiny_inputs_give_nan_not_exceptions(n):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = regression_metrics(np.full(n, 5.5), np.full(n, 6.0))
        d = distribution_metrics(np.full((n, 10), 0.1), np.full((n, 10), 0.1))
    assert m["n"] == n
    assert math.isnan(m["lcc"]) and math.isnan(m["srcc"]) and math.isnan(d["std_lcc"])
    if n == 0:
        assert all(math.isnan(m[k]) for k in ("mse", "mae", "rmse", "accuracy"))
        assert math.isnan(d["emd2"]) and math.isnan(d["emd1"])
    else:
        assert m["mae"] == pytest.approx(0.5) and m["accuracy"] == 1.0


# ---- aspect-ratio bins --------------------------------------------------------------------------

def test_default_bins_are_methods():
    assert aspect_bin_labels() == ["0.0-0.4", "0.4-0.6", "0.6-0.8", "0.8-1.0", "1.0-1.2", "1.2-1.4",
                                   "1.4-1.6", "1.6-inf"]
    assert ASPECT_BIN_EDGES[0] == 0.0 and math.isinf(ASPECT_BIN_EDGES[-1])


@pytest.mark.parametrize("ratio, label", [
    (0.2, "0.0-0.4"), (0.4, "0.4-0.6"), (0.5999, "0.4-0.6"), (2 / 3, "0.6-0.8"), (0.75, "0.6-0.8"),
    (0.8, "0.8-1.0"), (1.0, "1.0-1.2"), (1.5, "1.4-1.6"), (1.6, "1.6-inf"), (12.0, "1.6-inf"),
    (800 / 1000, "0.8-1.0"), (1200 / 2000, "0.6-0.8"),
])
def test_aspect_bin_half_open(ratio, label):
    assert aspect_bin(ratio) == label


@pytest.mark.parametrize("ratio", [-1.0, math.nan, math.inf])
def test_aspect_bin_outside_is_none(ratio):
    assert aspect_bin(ratio) is None


def test_aspect_bins_are_configurable():
    edges = (0.0, 0.75, 1.0, math.inf)
    assert aspect_bin_labels(edges) == ["0.0-0.75", "0.75-1.0", "1.0-inf"]
    assert aspect_bin(0.8, edges) == "0.75-1.0"
    rows = aspect_bin_table([0.5, 0.9, 2.0], [5, 5, 5], [5, 6, 7], edges=edges)
    assert [(r["bin"], r["n"], r["mae"]) for r in rows] == [("0.0-0.75", 1, 0.0), ("0.75-1.0", 1, 1.0),
                                                          ("1.0-inf", 1, 2.0)]


def test_aspect_bin_table_hand_made_example():
    # bin 0.6-0.8: three images, errors +1, -1, 0 ; bin 1.0-1.2: one image, error 0.5 ; 1.6-inf: two
    ratio = [0.66, 0.75, 0.7, 1.0, 1.7, 3.0]
    true = [5.0, 6.0, 4.0, 5.5, 3.0, 7.0]
    pred = [6.0, 5.0, 4.0, 6.0, 4.0, 8.0]
    rows = {r["bin"]: r for r in aspect_bin_table(ratio, pred, true)}
    assert list(rows) == aspect_bin_labels()  # every bin kept, in order
    typical = rows["0.6-0.8"]
    assert typical["n"] == 3
    assert typical["mae"] == pytest.approx(2 / 3)
    assert typical["mse"] == pytest.approx(2 / 3)
    assert typical["rmse"] == pytest.approx(math.sqrt(2 / 3))
    # pred (6, 5, 4) vs true (5, 6, 4): centred (1, 0, -1) . (0, 1, -1) = 1; norms sqrt(2), sqrt(2)
    assert typical["lcc"] == pytest.approx(0.5)
    assert typical["srcc"] == pytest.approx(0.5)
    assert typical["accuracy"] == pytest.approx(1 / 3)  # 6>5 vs 5: no; 5 vs 6: no; 4 vs 4: yes
    single = rows["1.0-1.2"]
    assert single["n"] == 1 and single["mae"] == pytest.approx(0.5) and math.isnan(single["lcc"])
    wide = rows["1.6-inf"]
    assert wide["n"] == 2 and wide["mae"] == pytest.approx(1.0) and wide["lcc"] == pytest.approx(1.0)
    empty = rows["0.4-0.6"]
    assert empty["n"] == 0 and math.isnan(empty["mae"]) and math.isnan(empty["lcc"])
    assert (rows["0.6-0.8"]["lo"], rows["0.6-0.8"]["hi"]) == (0.6, 0.8)
    assert sum(r["n"] for r in rows.values()) == len(ratio)


def test_authors_bins_map_onto_ours(data_dir):
    """The authors' test-split bins (``0.4_0.6`` ... ``1.6``) are our labels; each bin's lower edge
    falls in it (half-open ``[lo, hi)``), and the table counts them as the authors did."""
    import csv
    from collections import Counter

    with (data_dir / "AVA_test_aspect_bins.csv").open() as f:
        authors = [row["aspect_bin"] for row in csv.DictReader(f)]
    ours = [label.replace("_", "-") if "_" in label else f"{label}-inf" for label in authors]
    assert set(ours) <= set(aspect_bin_labels())
    lower_edges = np.array([float(label.split("-")[0]) for label in ours])
    assert [aspect_bin(r) for r in lower_edges[:50]] == ours[:50]
    rows = aspect_bin_table(lower_edges, np.full(len(ours), 5.5), np.full(len(ours), 5.0))
    counts = Counter(ours)
    assert {r["bin"]: r["n"] for r in rows if r["n"]} == dict(counts)
    assert max(counts, key=counts.get) == "0.6-0.8"  # AVA peaks at 2:3 and 3:4 landscape photos
