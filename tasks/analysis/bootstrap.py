"""Paired bootstrap over test images: how sure is a difference between two prediction sets?

Both sets predict the same images, so each resample draws images (with replacement, ``seed`` fixed)
and recomputes every statistic for both sets on that same draw: the pairing cancels the variation
that the two sets share. A resample is a count per image (``weights``, shape (B, n)); every
statistic is then a weighted sum, so 2,000 resamples of a few thousand images take well under a
second. Intervals are percentile intervals at ``level``.

With several training seeds (``groups``: each image's seed), a resample is two-level: draw the seeds
with replacement, then the images of each drawn seed, so the intervals carry the variation between
training runs as well as between images.

Signs: every statistic is an improvement of ``b`` (candidate) over ``a`` (baseline), so > 0 favours
the candidate: MAE/MSE decreases ``a - b``, LCC/SRCC gains ``b - a``.

- per bin (and ``all``): the MAE decrease;
- ``typical``: the decrease in the typical bin; ``unusual``: pooled over every image outside it (one
  ratio of pooled sums, never a mean of per-bin or per-seed ratios); ``unusual_minus_typical``;
- ``unusual_over_typical``: their ratio, reported only when the typical decrease's interval excludes
  zero (a denominator that may be zero makes the ratio meaningless);
- ``largest_bin_ratio``: how many times the typical decrease the largest bin's decrease is (bins of
  >= ``min_n`` images), only when the typical decrease is significantly positive. Picking the largest
  of several noisy ratios on the data inflates it (every bin at a true ratio of 1 gives a median
  pick of ~1.7), so the bin is re-picked inside each resample, on the images drawn, and its ratio is
  measured on the images that resample left out: the estimate is the median of those out-of-sample
  ratios, the interval their percentiles, and the bin named is the one picked most often;
- overall ``mae_decrease``, ``mse_decrease``, ``lcc_gain``, ``srcc_gain``.

A verdict is "not significant" whenever its interval includes zero.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

DEFAULT_RESAMPLES = 2000
DEFAULT_SEED = 0
DEFAULT_LEVEL = 0.95
NOT_SIGNIFICANT = "not significant"
HEADLINE_MIN_N = 10  # fewest images of a bin in the largest-bin ratio (the headline)


@dataclass(frozen=True)
class Interval:
    """A statistic on the data and its bootstrap percentile interval."""

    estimate: float
    lo: float
    hi: float

    @property
    def significant(self) -> bool:
        """The interval excludes zero (an undefined interval never is)."""
        return not (math.isnan(self.lo) or math.isnan(self.hi)) and (self.lo > 0 or self.hi < 0)

    @property
    def verdict(self) -> str:
        if not self.significant:
            return NOT_SIGNIFICANT
        return "significant, favours the candidate" if self.lo > 0 else "significant, favours the baseline"

    def as_row(self) -> dict[str, Any]:
        return {**asdict(self), "significant": self.significant, "verdict": self.verdict}


@dataclass(frozen=True)
class BootstrapResult:
    """Every interval of one baseline-vs-candidate comparison (see the module docstring)."""

    n: int
    n_resamples: int
    seed: int
    level: float
    typical_bin: str
    bins: dict[str, tuple[int, Interval]]  # bin -> (images, MAE decrease); ``all`` last
    overall: dict[str, Interval]  # mae_decrease, mse_decrease, lcc_gain, srcc_gain
    typical: Interval
    unusual: Interval
    unusual_minus_typical: Interval
    unusual_over_typical: Interval | None  # None: the typical decrease is not significantly non-zero
    largest_bin_ratio: tuple[str, Interval] | None  # None: typical not significantly positive
    notes: list[str] = field(default_factory=list)
    largest_bin_share: float | None = None  # of resamples that picked the named bin
    min_n: int = HEADLINE_MIN_N  # fewest images of a bin in the largest-bin ratio
    n_groups: int = 1  # training seeds resampled (two-level bootstrap when > 1)

    def rows(self) -> list[dict[str, Any]]:
        """One flat row per statistic (for tables, Parquet and JSON)."""
        out = [{"statistic": "mae_decrease", "bin": b, "n": n, **i.as_row()} for b, (n, i) in self.bins.items()]
        out += [{"statistic": k, "bin": "all", "n": self.n, **i.as_row()} for k, i in self.overall.items()
                if k != "mae_decrease"]
        pooled = {"typical": self.typical, "unusual": self.unusual, "unusual_minus_typical": self.unusual_minus_typical}
        if self.unusual_over_typical is not None:
            pooled["unusual_over_typical"] = self.unusual_over_typical
        out += [{"statistic": k, "bin": None, "n": None, **i.as_row()} for k, i in pooled.items()]
        if self.largest_bin_ratio is not None:
            bin_label, interval = self.largest_bin_ratio
            out.append({"statistic": "largest_bin_ratio", "bin": bin_label, "n": self.bins[bin_label][0],
                        **interval.as_row()})
        return out


CHUNK = 250  # resamples per block: memory is O(CHUNK x n) whatever n_resamples is


def _draw_counts(rng: np.random.Generator, rows: int, n: int, repeats: np.ndarray | None = None) -> np.ndarray:
    """(rows, n) counts of n draws with replacement from n items per row; ``repeats`` (rows,): how many
    such independent sets of draws each row sums (0 leaves the row empty)."""
    sets = 1 if repeats is None else int(repeats.max(initial=0))
    if sets == 0:
        return np.zeros((rows, n))
    draws = rng.integers(0, n, size=(rows * sets, n))
    offsets = (np.arange(rows * sets) * n)[:, None]
    counts = np.bincount((draws + offsets).ravel(), minlength=rows * sets * n).reshape(rows, sets, n)
    if repeats is not None:
        counts = counts * (np.arange(sets)[None, :] < repeats[:, None])[:, :, None]
    return counts.sum(axis=1).astype(float)


def resample_weights(n: int, n_resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                     groups: Sequence[Any] | None = None) -> Iterator[np.ndarray]:
    """Blocks of (<= CHUNK, n) counts: how often each image is drawn in each resample (rows sum to n).
    The same ``seed`` gives the same resamples on every machine (numpy's PCG64).

    ``groups`` (one label per image, e.g. its training seed): two levels, the groups drawn with
    replacement, then each drawn group's images (a group drawn twice contributes two independent
    draws of its images)."""
    rng = np.random.default_rng(seed)
    members = None
    if groups is not None:
        labels = np.asarray(groups)
        if labels.shape != (n,):
            raise ValueError(f"groups must give one label per image ({n}), got shape {labels.shape}")
        members = [np.flatnonzero(labels == g) for g in dict.fromkeys(labels.tolist())]
    for start in range(0, n_resamples, CHUNK):
        rows = min(CHUNK, n_resamples - start)
        if members is None:
            yield _draw_counts(rng, rows, n)
            continue
        picks = rng.integers(0, len(members), size=(rows, len(members)))
        times = np.stack([(picks == g).sum(axis=1) for g in range(len(members))], axis=1)  # (rows, G)
        weights = np.zeros((rows, n))
        for g, index in enumerate(members):
            weights[:, index] = _draw_counts(rng, rows, index.size, times[:, g])
        yield weights


def _interval(estimate: float, samples: np.ndarray, level: float) -> Interval:
    finite = samples[np.isfinite(samples)]
    if math.isnan(estimate) or finite.size < 0.5 * samples.size:  # mostly undefined resamples
        return Interval(float(estimate), math.nan, math.nan)
    tail = (1.0 - level) / 2.0 * 100.0
    lo, hi = np.percentile(finite, [tail, 100.0 - tail])
    return Interval(float(estimate), float(lo), float(hi))


def _weighted_corr(weights: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per resample, Pearson correlation with frequency weights; ``x``/``y`` (n,) or (B, n)."""
    total = weights.sum(axis=1)
    if x.ndim == 1 and y.ndim == 1:  # one matrix product for every moment
        sx, sy, sxx, syy, sxy = (weights @ np.stack([x, y, x * x, y * y, x * y], axis=1)).T
        cov = sxy - sx * sy / total
        var = (sxx - sx * sx / total) * (syy - sy * sy / total)
    else:
        mx = (weights * x).sum(axis=1, keepdims=True) / total[:, None]
        my = (weights * y).sum(axis=1, keepdims=True) / total[:, None]
        dx, dy = x - mx, y - my
        cov = (weights * dx * dy).sum(axis=1)
        var = (weights * dx * dx).sum(axis=1) * (weights * dy * dy).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(var > 0, cov / np.sqrt(np.where(var > 0, var, 1.0)), np.nan)


def _weighted_ranks(weights: np.ndarray, values: np.ndarray) -> np.ndarray:
    """(B, n) average ranks (ties averaged, as scipy's rankdata) of each image within each resample."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    group = np.empty(values.size, dtype=int)
    group[order] = np.cumsum(np.r_[True, ordered[1:] != ordered[:-1]]) - 1
    per_group = np.add.reduceat(weights[:, order], starts, axis=1)  # (B, G): draws of each distinct value
    rank_of_group = np.cumsum(per_group, axis=1) - (per_group - 1.0) / 2.0
    return rank_of_group[:, group]


def _group_means(weights: np.ndarray, values: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """(B, K): per resample, the mean of ``values`` over the drawn images of each mask column (n, K)."""
    counts = weights @ masks
    sums = weights @ (values[:, None] * masks)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.where(counts > 0, counts, 1.0), np.nan)


def _statistics(weights: np.ndarray, true: np.ndarray, a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    everything = np.ones((true.size, 1))
    mae = _group_means(weights, np.abs(a - true) - np.abs(b - true), everything)[:, 0]
    mse = _group_means(weights, (a - true) ** 2 - (b - true) ** 2, everything)[:, 0]
    lcc = _weighted_corr(weights, b, true) - _weighted_corr(weights, a, true)
    rt, ra, rb = (_weighted_ranks(weights, v) for v in (true, a, b))
    srcc = _weighted_corr(weights, rb, rt) - _weighted_corr(weights, ra, rt)
    return {"mae_decrease": mae, "mse_decrease": mse, "lcc_gain": lcc, "srcc_gain": srcc}


def _block(weights: np.ndarray, t: np.ndarray, a: np.ndarray, b: np.ndarray,
           masks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every statistic for each resample (row) of ``weights``; masks name image groups. ``oob:<mask>``:
    the same MAE decrease over the images the resample left out (for the largest-bin ratio)."""
    decrease = np.abs(a - t) - np.abs(b - t)
    matrix = np.stack([m.astype(float) for m in masks.values()], axis=1)
    means = _group_means(weights, decrease, matrix)
    left_out = _group_means((weights == 0).astype(float), decrease, matrix)
    out = {name: means[:, k] for k, name in enumerate(masks)}
    out.update({f"oob:{name}": left_out[:, k] for k, name in enumerate(masks)})
    out.update(_statistics(weights, t, a, b))
    return out


def _checked(true: Sequence[float], baseline: Sequence[float], candidate: Sequence[float],
             bins: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    t, a, b = (np.asarray(v, dtype=float) for v in (true, baseline, candidate))
    labels = np.asarray([str(x) if x is not None else "" for x in bins], dtype=object)
    if not (t.shape == a.shape == b.shape == labels.shape) or t.ndim != 1 or t.size < 2:
        raise ValueError("true, baseline, candidate and bins must be equal-length sequences of >= 2 images")
    if not (np.isfinite(t).all() and np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("scores must be finite (drop unscored images before the bootstrap)")
    return t, a, b, labels


def _largest_bin(draws: dict[str, np.ndarray], bins: Sequence[str], level: float
                 ) -> tuple[str, Interval, float] | None:
    """Re-pick the bin of the largest ratio in each resample (images drawn); measure it on the images
    left out. Returns the bin picked most often, the interval of the out-of-sample ratios (estimate:
    their median) and the share of resamples that picked that bin."""
    with np.errstate(invalid="ignore", divide="ignore"):
        picked = np.stack([draws[f"bin:{x}"] / draws["typical"] for x in bins], axis=1)  # (B, K)
        measured = np.stack([draws[f"oob:bin:{x}"] / draws["oob:typical"] for x in bins], axis=1)
    usable = np.isfinite(picked).any(axis=1)
    if not usable.any():
        return None
    choice = np.nanargmax(np.where(np.isfinite(picked[usable]), picked[usable], -np.inf), axis=1)
    values = measured[usable][np.arange(choice.size), choice]
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return None
    counts = np.bincount(choice, minlength=len(bins))
    interval = _interval(float(np.median(finite)), values, level)
    return bins[int(counts.argmax())], interval, float(counts.max() / choice.size)


def _ratios(observed: dict[str, float], draws: dict[str, np.ndarray], per_bin: dict[str, tuple[int, Interval]],
            typical: Interval, typical_bin: str, min_n: int, level: float
            ) -> tuple[Interval | None, tuple[str, Interval, float] | None, list[str]]:
    """The unusual/typical ratio and the largest bin ratio where they mean something, else notes why not."""
    notes: list[str] = []
    ratio = largest = None
    with np.errstate(invalid="ignore", divide="ignore"):
        if typical.significant:
            ratio = _interval(observed["unusual"] / observed["typical"], draws["unusual"] / draws["typical"], level)
        else:
            notes.append(f"no unusual/typical ratio: the MAE decrease in the typical bin {typical_bin} is not "
                         "significantly different from zero, so a ratio to it is undefined")
    eligible = [x for x, (count, _) in per_bin.items() if x not in (typical_bin, "all") and count >= min_n]
    if typical.significant and typical.lo > 0 and eligible:
        largest = _largest_bin(draws, eligible, level)
    elif typical.significant and typical.lo > 0:
        notes.append(f"no largest-bin ratio: no bin other than {typical_bin} has {min_n} test images or more")
    else:
        notes.append(f"no largest-bin ratio: the MAE decrease in the typical bin {typical_bin} is not "
                     "significantly positive")
    return ratio, largest, notes


def paired_bootstrap(true: Sequence[float], baseline: Sequence[float], candidate: Sequence[float],
                     bins: Sequence[str | None], *, typical_bin: str, n_resamples: int = DEFAULT_RESAMPLES,
                     seed: int = DEFAULT_SEED, level: float = DEFAULT_LEVEL, min_n: int = HEADLINE_MIN_N,
                     min_interval_n: int = 5, bin_order: Sequence[str] | None = None,
                     groups: Sequence[Any] | None = None) -> BootstrapResult:
    """Intervals for ``candidate`` against ``baseline`` on the same images (one entry per image);
    ``bins`` labels each image's aspect-ratio bin (None: outside every bin). ``min_n``: fewest images of
    a bin in the largest-bin ratio; ``min_interval_n``: a bin of fewer images gets no interval;
    ``groups``: each image's training seed, for a two-level bootstrap (seeds, then images)."""
    t, a, b, labels = _checked(true, baseline, candidate, bins)
    if n_resamples < 1 or not 0 < level < 1:
        raise ValueError("n_resamples must be >= 1 and level in (0, 1)")
    n = t.size
    order = list(bin_order) if bin_order is not None else sorted({x for x in labels if x})
    masks = {f"bin:{x}": labels == x for x in order}
    masks["typical"] = labels == typical_bin
    masks["unusual"] = (labels != typical_bin) & (labels != "")
    observed = {k: float(v[0]) for k, v in _block(np.ones((1, n)), t, a, b, masks).items()}
    blocks = [_block(w, t, a, b, masks) for w in resample_weights(n, n_resamples, seed, groups)]
    draws = {k: np.concatenate([blk[k] for blk in blocks]) for k in blocks[0]}

    def interval(key: str) -> Interval:
        return _interval(observed[key], draws[key], level)

    per_bin = {}
    for x in order:
        size, bin_interval = int(masks[f"bin:{x}"].sum()), interval(f"bin:{x}")
        if size < min_interval_n:  # a bootstrap cannot judge a bin of a few images
            bin_interval = Interval(bin_interval.estimate, math.nan, math.nan)
        per_bin[x] = (size, bin_interval)
    overall = {k: interval(k) for k in ("mae_decrease", "mse_decrease", "lcc_gain", "srcc_gain")}
    per_bin["all"] = (n, overall["mae_decrease"])
    typical, unusual = interval("typical"), interval("unusual")
    gap = _interval(observed["unusual"] - observed["typical"], draws["unusual"] - draws["typical"], level)
    ratio, largest, notes = _ratios(observed, draws, per_bin, typical, typical_bin, min_n, level)
    n_groups = 1 if groups is None else len(set(np.asarray(groups).tolist()))
    return BootstrapResult(n=n, n_resamples=n_resamples, seed=seed, level=level, typical_bin=typical_bin,
                           bins=per_bin, overall=overall, typical=typical, unusual=unusual,
                           unusual_minus_typical=gap, unusual_over_typical=ratio,
                           largest_bin_ratio=None if largest is None else largest[:2], notes=notes,
                           largest_bin_share=None if largest is None else largest[2], min_n=min_n,
                           n_groups=n_groups)
