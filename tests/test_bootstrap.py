"""The paired bootstrap: resample statistics equal their direct computation, intervals cover the truth,
resampling is paired, and verdicts follow the intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from tasks.analysis.bootstrap import (
    NOT_SIGNIFICANT,
    Interval,
    _statistics,
    _weighted_ranks,
    paired_bootstrap,
    resample_weights,
)

BINS = ("0.0-0.6", "0.6-0.8", "0.8-1.2", "1.2-inf")
TYPICAL = "0.6-0.8"


def synthetic(n: int, seed: int, typical_gain: float = 0.1, unusual_gain: float = 0.3, noise: float = 0.8):
    """true scores, a baseline and a candidate sharing most of their error (a paired design)."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(BINS, size=n, p=[0.2, 0.4, 0.2, 0.2])
    true = rng.normal(5.5, 0.7, n)
    shared = rng.normal(0, noise, n)
    gain = np.where(labels == TYPICAL, typical_gain, unusual_gain)
    baseline = true + shared + np.sign(shared) * gain
    candidate = true + shared + rng.normal(0, 0.05, n)
    return true, baseline, candidate, labels


def test_resample_rows_are_draws_of_n_images_and_reproducible():
    blocks = list(resample_weights(37, 600, seed=3))
    weights = np.concatenate(blocks)
    assert weights.shape == (600, 37) and len(blocks) == 3
    assert (weights.sum(axis=1) == 37).all()
    assert np.array_equal(weights, np.concatenate(list(resample_weights(37, 600, seed=3))))
    assert not np.array_equal(weights, np.concatenate(list(resample_weights(37, 600, seed=4))))


def test_resampled_statistics_equal_their_direct_computation_on_the_drawn_images():
    true, a, b, _ = synthetic(60, seed=1)
    true = np.round(true, 1)  # ties in the ranks, as AVA's mean scores have
    weights = next(resample_weights(60, 5, seed=2))
    got = _statistics(weights, true, a, b)
    for row in range(5):
        drawn = np.repeat(np.arange(60), weights[row].astype(int))
        t, x, y = true[drawn], a[drawn], b[drawn]
        assert got["mae_decrease"][row] == pytest.approx(np.mean(np.abs(x - t)) - np.mean(np.abs(y - t)))
        assert got["mse_decrease"][row] == pytest.approx(np.mean((x - t) ** 2) - np.mean((y - t) ** 2))
        assert got["lcc_gain"][row] == pytest.approx(stats.pearsonr(y, t)[0] - stats.pearsonr(x, t)[0])
        assert got["srcc_gain"][row] == pytest.approx(stats.spearmanr(y, t)[0] - stats.spearmanr(x, t)[0])
        ranks = _weighted_ranks(weights[row:row + 1], true)[0]
        np.testing.assert_allclose(ranks[drawn], stats.rankdata(t))


def test_identical_predictions_give_zero_width_intervals_because_resampling_is_paired():
    true, a, _, labels = synthetic(200, seed=5)
    result = paired_bootstrap(true, a, a.copy(), labels, typical_bin=TYPICAL, n_resamples=500)
    for _, interval in result.bins.values():
        assert (interval.lo, interval.hi) == (0.0, 0.0) and interval.verdict == NOT_SIGNIFICANT
    assert result.overall["srcc_gain"].hi == 0.0 and not result.overall["lcc_gain"].significant


def test_paired_interval_is_much_narrower_than_an_unpaired_one():
    true, a, b, labels = synthetic(300, seed=6)
    paired = paired_bootstrap(true, a, b, labels, typical_bin=TYPICAL, n_resamples=1000).overall["mae_decrease"]
    rng = np.random.default_rng(0)
    unpaired = [np.mean(np.abs(a - true)[rng.integers(0, 300, 300)]) - np.mean(np.abs(b - true)[rng.integers(0, 300, 300)])
                for _ in range(1000)]
    lo, hi = np.percentile(unpaired, [2.5, 97.5])
    assert paired.hi - paired.lo < 0.5 * (hi - lo)


def test_intervals_cover_the_population_value_about_95_percent_of_the_time():
    # The population MAE decrease, from one very large sample of the same design.
    true, a, b, labels = synthetic(400_000, seed=99)
    truth = np.mean(np.abs(a - true)) - np.mean(np.abs(b - true))
    truth_typical = np.mean((np.abs(a - true) - np.abs(b - true))[labels == TYPICAL])
    covered = covered_typical = 0
    trials = 120
    for seed in range(trials):
        true, a, b, labels = synthetic(150, seed=seed, noise=1.0)
        result = paired_bootstrap(true, a, b, labels, typical_bin=TYPICAL, n_resamples=400, seed=seed)
        covered += result.overall["mae_decrease"].lo <= truth <= result.overall["mae_decrease"].hi
        covered_typical += result.typical.lo <= truth_typical <= result.typical.hi
    assert 0.87 <= covered / trials <= 1.0
    assert 0.85 <= covered_typical / trials <= 1.0


def test_a_clear_gain_is_significant_with_ratio_and_largest_bin():
    true, a, b, labels = synthetic(1500, seed=7, typical_gain=0.2, unusual_gain=0.5)
    result = paired_bootstrap(true, a, b, labels, typical_bin=TYPICAL, n_resamples=1000)
    assert result.typical.significant and result.typical.lo > 0
    assert result.overall["mae_decrease"].verdict == "significant, favours the candidate"
    assert result.unusual_minus_typical.lo > 0
    ratio = result.unusual_over_typical
    assert ratio is not None and ratio.lo < ratio.estimate < ratio.hi
    assert ratio.estimate == pytest.approx(result.unusual.estimate / result.typical.estimate)
    assert result.largest_bin_ratio is not None and result.largest_bin_ratio[0] != TYPICAL
    assert not result.notes
    rows = {(r["statistic"], r["bin"]) for r in result.rows()}
    assert ("unusual_over_typical", None) in rows and ("largest_bin_ratio", result.largest_bin_ratio[0]) in rows


def test_no_ratio_when_the_typical_decrease_may_be_zero():
    true, a, b, labels = synthetic(400, seed=8, typical_gain=0.0, unusual_gain=0.4)
    result = paired_bootstrap(true, a, b, labels, typical_bin=TYPICAL, n_resamples=800)
    assert result.typical.verdict == NOT_SIGNIFICANT
    assert result.unusual_over_typical is None and result.largest_bin_ratio is None
    assert any("not significantly different from zero" in note for note in result.notes)
    assert result.unusual.significant  # the pooled unusual decrease itself is still reported
    assert "unusual_over_typical" not in {r["statistic"] for r in result.rows()}


def test_a_worse_candidate_is_significant_for_the_baseline():
    true, a, b, labels = synthetic(800, seed=9, typical_gain=0.3, unusual_gain=0.3)
    result = paired_bootstrap(true, b, a, labels, typical_bin=TYPICAL, n_resamples=500)  # swapped
    assert result.overall["mae_decrease"].verdict == "significant, favours the baseline"
    assert result.largest_bin_ratio is None


def test_interval_verdicts_and_input_checks():
    assert Interval(0.1, 0.01, 0.2).verdict.startswith("significant")
    assert Interval(0.1, -0.01, 0.2).verdict == NOT_SIGNIFICANT
    assert Interval(0.1, 0.0, 0.2).verdict == NOT_SIGNIFICANT  # touching zero includes it
    assert Interval(math.nan, math.nan, math.nan).verdict == NOT_SIGNIFICANT
    with pytest.raises(ValueError):
        paired_bootstrap([1.0, 2.0], [1.0], [1.0, 2.0], ["a", "a"], typical_bin="a")
    with pytest.raises(ValueError):
        paired_bootstrap([1.0, np.nan], [1.0, 2.0], [1.0, 2.0], ["a", "a"], typical_bin="a")
