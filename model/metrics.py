"""Score metrics of METHOD.md and the per-aspect-ratio-bin error table.

Inputs are array-likes (numpy or torch). Degenerate inputs never raise: a correlation over fewer
than two points, or over a constant vector, is NaN ("undefined"), and so is any metric of an
empty bin. "Constant" means constant within float32 resolution: model outputs are float32, and a
spread of a few ulps is rounding (it differs between CPUs and batch sizes), not a signal to correlate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from model.aspect_bins import ASPECT_BIN_EDGES, aspect_bin_labels
from model.thresholds import CONSTANT_RTOL, HIGH_SCORE_THRESHOLD

NUM_BINS = 10
RATINGS = np.arange(1, NUM_BINS + 1, dtype=np.float64)


def _np(x: object) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()  # type: ignore[union-attr]
    return np.asarray(x, dtype=np.float64)


def score_from_dist(dist: object) -> np.ndarray:
    """Mean rating ``sum_i i * p_i`` of (…, 10) distributions."""
    return _np(dist) @ RATINGS


def std_from_dist(dist: object) -> np.ndarray:
    """Rating standard deviation ``sqrt(sum_i (i - s)^2 p_i)``."""
    d = _np(dist)
    mean = d @ RATINGS
    return np.sqrt(np.maximum(((RATINGS - mean[..., None]) ** 2 * d).sum(-1), 0.0))


def normalize_counts(counts: object) -> np.ndarray:
    """Vote counts (…, 10) -> distributions; rows with no votes become NaN."""
    c = _np(counts)
    total = c.sum(-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, c / np.where(total > 0, total, 1), np.nan)


def emd_np(p: object, q: object, r: float = 2.0) -> np.ndarray:
    """NumPy twin of ``model.losses.emd`` for evaluation."""
    diff = np.cumsum(_np(p) - _np(q), axis=-1)
    return (np.abs(diff) ** r).mean(-1) ** (1.0 / r)


def is_constant(x: object) -> bool:
    """True when all values are equal within float32 resolution (``CONSTANT_RTOL`` of their scale)."""
    a = _np(x).ravel()
    if a.size == 0:
        return True
    scale = max(1.0, float(np.abs(a).max()))
    return float(a.max() - a.min()) <= CONSTANT_RTOL * scale


def pearson(x: object, y: object) -> float:
    """Pearson's LCC; NaN for fewer than 2 points or a constant side."""
    a, b = _np(x).ravel(), _np(y).ravel()
    # Test constancy before centring: a constant like 0.1 leaves rounding noise after it.
    if a.size < 2 or is_constant(a) or is_constant(b):
        return math.nan
    a, b = a - a.mean(), b - b.mean()
    denom = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum() / denom) if denom > 0 else math.nan


def rankdata(x: object) -> np.ndarray:
    """Ranks from 1, ties given their average rank (as scipy's ``rankdata``)."""
    a = _np(x).ravel()
    order = np.argsort(a, kind="mergesort")
    sorted_a = a[order]
    ranks = np.empty(a.size, dtype=np.float64)
    start = 0
    while start < a.size:
        end = start
        while end + 1 < a.size and sorted_a[end + 1] == sorted_a[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    return ranks


def spearman(x: object, y: object) -> float:
    """Spearman's SRCC: Pearson's LCC of the ranks."""
    a, b = _np(x).ravel(), _np(y).ravel()
    # Ranks would turn float32 rounding noise of a constant vector into a full spread.
    if a.size < 2 or is_constant(a) or is_constant(b):
        return math.nan
    return pearson(rankdata(a), rankdata(b))


def regression_metrics(pred_score: object, true_score: object) -> dict[str, float]:
    """n, MSE, MAE, RMSE, LCC, SRCC and binary accuracy at 5 for two score vectors."""
    p, t = _np(pred_score).ravel(), _np(true_score).ravel()
    n = int(p.size)
    if n == 0:
        return {"n": 0, "mse": math.nan, "mae": math.nan, "rmse": math.nan, "lcc": math.nan,
                "srcc": math.nan, "accuracy": math.nan}
    err = p - t
    mse = float(np.mean(err ** 2))
    return {
        "n": n,
        "mse": mse,
        "mae": float(np.mean(np.abs(err))),
        "rmse": math.sqrt(mse),
        "lcc": pearson(p, t),
        "srcc": spearman(p, t),
        "accuracy": float(np.mean((p > HIGH_SCORE_THRESHOLD) == (t > HIGH_SCORE_THRESHOLD))),
    }


def distribution_metrics(pred_dist: object, true_dist: object) -> dict[str, float]:
    """All METHOD.md metrics from (n, 10) predicted and ground-truth distributions."""
    pd_, td = _np(pred_dist), _np(true_dist)
    out = regression_metrics(score_from_dist(pd_), score_from_dist(td))
    empty = pd_.shape[0] == 0
    out["emd2"] = math.nan if empty else float(emd_np(pd_, td, 2.0).mean())
    out["emd1"] = math.nan if empty else float(emd_np(pd_, td, 1.0).mean())
    out["std_lcc"] = pearson(std_from_dist(pd_), std_from_dist(td))
    return out


def aspect_bin_table(aspect_ratio: object, pred_score: object, true_score: object,
                     edges: Sequence[float] = ASPECT_BIN_EDGES) -> list[dict[str, object]]:
    """One row per bin: ``bin, lo, hi, n, mae, mse, rmse, lcc, srcc, accuracy``; empty bins kept (n=0)."""
    ar, p, t = _np(aspect_ratio).ravel(), _np(pred_score).ravel(), _np(true_score).ravel()
    rows = []
    for label, lo, hi in zip(aspect_bin_labels(edges), edges[:-1], edges[1:], strict=True):
        mask = (ar >= lo) & (ar < hi)
        rows.append({"bin": label, "lo": float(lo), "hi": float(hi), **regression_metrics(p[mask], t[mask])})
    return rows
