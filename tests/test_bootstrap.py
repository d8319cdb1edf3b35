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
    _group_means,
    _interval,
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


def _percentile_loop(samples: list[float], level: float) -> tuple[float, float]:
    """The percentile step by hand: linear interpolation between the order statistics."""
    ordered = sorted(samples)
    ends = []
    for q in ((1 - level) / 2, 1 - (1 - level) / 2):
        pos = q * (len(ordered) - 1)
        low = math.floor(pos)
        high = min(low + 1, len(ordered) - 1)
        ends.append(ordered[low] + (pos - low) * (ordered[high] - ordered[low]))
    return ends[0], ends[1]


def test_per_bin_and_pooled_intervals_equal_a_plain_loop_over_the_same_resamples():
    """Reference: draw the images of each resample (same seed), take the MAE decrease per bin, in the
    typical bin and pooled over the others with plain boolean masks, then the percentile step by hand."""
    true, a, b, labels = synthetic(90, seed=11)
    labels = labels.astype(object)
    labels[:4] = None  # images outside every bin: in no bin and not in the pooled unusual group
    result = paired_bootstrap(true, a, b, labels, typical_bin=TYPICAL, n_resamples=300, seed=5, bin_order=BINS)
    weights = np.concatenate(list(resample_weights(90, 300, seed=5)))
    decrease = np.abs(a - true) - np.abs(b - true)
    names = np.array(["" if x is None else x for x in labels])
    groups = {**{x: names == x for x in BINS}, "typical": names == TYPICAL,
              "unusual": (names != TYPICAL) & (names != "")}
    samples: dict[str, list[float]] = {k: [] for k in groups}
    for row in weights:
        drawn = np.repeat(np.arange(90), row.astype(int))
        for key, mask in groups.items():
            chosen = drawn[mask[drawn]]
            samples[key].append(float(decrease[chosen].mean()) if chosen.size else math.nan)
    got = {**{x: result.bins[x][1] for x in BINS}, "typical": result.typical, "unusual": result.unusual}
    for key, interval in got.items():
        assert interval.estimate == pytest.approx(decrease[groups[key]].mean()), key
        finite = [v for v in samples[key] if not math.isnan(v)]
        assert (interval.lo, interval.hi) == pytest.approx(_percentile_loop(finite, 0.95), abs=1e-12), key
    gap = [u - t for u, t in zip(samples["unusual"], samples["typical"], strict=True)]
    assert (result.unusual_minus_typical.lo, result.unusual_minus_typical.hi) == pytest.approx(
        _percentile_loop(gap, 0.95), abs=1e-12)


def _coverage(trials: int, n: int, level: float = 0.95, n_resamples: int = 400) -> dict[str, tuple[float, float]]:
    """Share of intervals below / above the population value, over ``trials`` samples of ``n`` images:
    per bin, the pooled typical and unusual decreases and their difference (the statistics and
    percentile step of ``paired_bootstrap``, vectorised over the resamples)."""
    big = synthetic(400_000, seed=99, noise=1.0)
    truth = _population(big)
    misses = {k: [0, 0] for k in truth}
    for trial in range(trials):
        true, a, b, labels = synthetic(n, seed=1000 + trial, noise=1.0)
        masks = _masks(labels)
        decrease = np.abs(a - true) - np.abs(b - true)
        matrix = np.stack(list(masks.values()), axis=1).astype(float)
        draws = _group_means(next(resample_weights(n, n_resamples, seed=trial)), decrease, matrix)
        observed = _group_means(np.ones((1, n)), decrease, matrix)[0]
        columns = {k: draws[:, i] for i, k in enumerate(masks)}
        columns["gap"] = columns["unusual"] - columns["typical"]
        estimates = {**{k: observed[i] for i, k in enumerate(masks)}, "gap": observed[-1] - observed[-2]}
        for key, value in truth.items():
            interval = _interval(estimates[key], columns[key], level)
            misses[key][0] += value < interval.lo
            misses[key][1] += value > interval.hi
    return {k: (low / trials, high / trials) for k, (low, high) in misses.items()}


def _masks(labels: np.ndarray) -> dict[str, np.ndarray]:
    return {**{x: labels == x for x in BINS}, "typical": labels == TYPICAL, "unusual": labels != TYPICAL}


def _population(sample: tuple) -> dict[str, float]:
    true, a, b, labels = sample
    decrease = np.abs(a - true) - np.abs(b - true)
    out = {k: float(decrease[m].mean()) for k, m in _masks(labels).items()}
    return {**out, "gap": out["unusual"] - out["typical"]}


def test_intervals_cover_the_population_value_95_percent_of_the_time_on_both_sides():
    """1,000 samples of 300 images: coverage in [0.93, 0.97] (binomial s.e. 0.007 at 0.95, so a 90%
    interval labelled 95% fails), and neither end misses more than 4.5% of the time."""
    for key, (low, high) in _coverage(1000, 300).items():
        assert 0.93 <= 1 - low - high <= 0.97, (key, low, high)
        assert low <= 0.045 and high <= 0.045, (key, low, high)


def test_the_largest_bin_ratio_is_not_inflated_by_picking_the_bin():
    """Every bin's decrease is the same (true ratio 1): picking the largest on the data gives a median
    well above 1; re-picking inside each resample and measuring on the images it left out does not."""
    picked, ours = [], []
    for trial in range(40):
        rng = np.random.default_rng(200 + trial)
        labels = rng.choice(BINS, size=2000, p=[0.2, 0.4, 0.2, 0.2])
        true = rng.normal(5.5, 0.7, 2000)
        # errors of 1.5 +- 0.3: each image's MAE decrease is 0.08 + noise (sd 0.42) in every bin
        a, b = true + 1.58 + rng.normal(0, 0.3, 2000), true + 1.5 + rng.normal(0, 0.3, 2000)
        result = paired_bootstrap(true, a, b, labels, typical_bin=TYPICAL, n_resamples=150, seed=trial)
        assert result.largest_bin_ratio is not None and result.typical.lo > 0
        others = [i.estimate for x, (_, i) in result.bins.items() if x not in (TYPICAL, "all")]
        picked.append(max(others) / result.typical.estimate)
        ours.append(result.largest_bin_ratio[1].estimate)
    assert np.median(picked) > 1.15  # the selection effect the statistic must not have
    assert 0.9 <= np.median(ours) <= 1.1


def test_two_level_resamples_draw_seeds_then_their_images():
    groups = np.repeat(["s0", "s1", "s2"], [5, 7, 9])
    weights = np.concatenate(list(resample_weights(21, 600, seed=1, groups=groups)))
    sizes = {"s0": 5, "s1": 7, "s2": 9}
    for row in weights:
        times = {g: row[groups == g].sum() / size for g, size in sizes.items()}
        assert all(float(t).is_integer() for t in times.values()) and sum(times.values()) == 3
    drawn_twice = [row for row in weights if row[groups == "s0"].sum() == 10]
    assert drawn_twice and any(r[groups == "s0"].max() >= 2 for r in drawn_twice)
    assert (weights[:, groups == "s2"].sum(axis=1) == 0).mean() == pytest.approx((2 / 3) ** 3, abs=0.06)


def test_two_level_intervals_carry_the_variation_between_seeds():
    """Three training seeds whose gains differ: the two-level interval is wider than the images-only one."""
    parts = [synthetic(300, seed=s, typical_gain=g, unusual_gain=g) for s, g in ((1, 0.0), (2, 0.15), (3, 0.3))]
    true, a, b, labels = (np.concatenate([p[i] for p in parts]) for i in range(4))
    seeds = np.repeat([0, 1, 2], 300)
    images = paired_bootstrap(true, a, b, labels, typical_bin=TYPICAL, n_resamples=500)
    both = paired_bootstrap(true, a, b, labels, typical_bin=TYPICAL, n_resamples=500, groups=seeds)
    assert both.n_groups == 3 and images.n_groups == 1
    assert both.overall["mae_decrease"].estimate == images.overall["mae_decrease"].estimate
    width = {k: r.overall["mae_decrease"].hi - r.overall["mae_decrease"].lo for k, r in (("i", images), ("b", both))}
    assert width["b"] > 1.5 * width["i"]


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
