"""The NIMA-vs-MPEMD comparison as people read it: the per-aspect-bin table and the overall metrics.

Inputs are the rows that ``analyze-errors`` returns (``compare_models.sql`` and
``errors_by_aspect_bin.sql``); the output is Markdown, printed by ``reproduce`` and ``make demo``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

OVERALL_METRICS = ("n", "mse", "mae", "lcc", "srcc", "accuracy")
TYPICAL_BIN = "0.6-0.8"
EXTREME_BINS = ("0.0-0.4", "0.4-0.6", "1.6-inf")  # panoramas and tall images
MIN_BIN_N = 10  # bins with fewer images are too noisy for the largest-ratio statistic


def _fmt(value: Any, digits: int = 3, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
    return str(value)


def overall_rows(errors: Mapping[str, Sequence[Mapping[str, Any]]]) -> list[dict[str, Any]]:
    """One row per model label: the ``all`` row of its per-bin error table."""
    rows = []
    for label, table in errors.items():
        everything = next((r for r in table if r.get("bin") == "all"), None)
        if everything is not None:
            rows.append({"model": label, **{k: everything.get(k) for k in OVERALL_METRICS}})
    return rows


def pooled_decrease(comparison: Sequence[Mapping[str, Any]], bins: Sequence[str]) -> float:
    """MAE decrease (NIMA - MPEMD) over all images of ``bins`` together: the n-weighted mean of the
    per-bin decreases, which is exactly the decrease of the pooled MAE."""
    rows = [r for r in comparison if r["bin"] in bins and r.get("n") and r.get("mae_decrease") is not None]
    n = sum(r["n"] for r in rows)
    return sum(r["n"] * r["mae_decrease"] for r in rows) / n if n else math.nan


def headline_stats(comparison: Sequence[Mapping[str, Any]], typical: str = TYPICAL_BIN) -> dict[str, Any]:
    """The seed's statistic three ways: decrease in the typical bin, pooled over every other bin, pooled
    over the extreme bins, and the largest per-bin ratio to the typical decrease (bins of >= 10 images)."""
    bins = [r["bin"] for r in comparison if r["bin"] not in ("all", typical)]
    typical_decrease = pooled_decrease(comparison, [typical])
    unusual = pooled_decrease(comparison, bins)
    extreme = pooled_decrease(comparison, EXTREME_BINS)
    ratios = [(r["decrease_vs_typical"], r["bin"]) for r in comparison
              if r["bin"] in bins and (r.get("n") or 0) >= MIN_BIN_N and r.get("decrease_vs_typical") is not None]
    best = max(ratios) if ratios else (math.nan, None)

    def ratio(x: float) -> float:
        return x / typical_decrease if typical_decrease and not math.isnan(typical_decrease) else math.nan

    return {"typical_decrease": typical_decrease, "unusual_decrease": unusual, "unusual_ratio": ratio(unusual),
            "extreme_decrease": extreme, "extreme_ratio": ratio(extreme), "max_ratio": best[0],
            "max_ratio_bin": best[1]}


def comparison_markdown(comparison: Sequence[Mapping[str, Any]], overall: Sequence[Mapping[str, Any]],
                        report: str | None = None) -> str:
    """Markdown: per-bin n / NIMA MAE / MPEMD MAE / decrease / x typical, then overall metrics."""
    lines = [
        "## MAE per aspect-ratio bin (height / width), test split",
        "",
        "| bin | n | NIMA MAE | MPEMD MAE | decrease | relative | × typical (0.6-0.8) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in comparison:
        lines.append(
            f"| {row['bin']} | {row.get('n', 0)} | {_fmt(row.get('nima_mae'))} | {_fmt(row.get('mpemd_mae'))} "
            f"| {_fmt(row.get('mae_decrease'), signed=True)} | {_fmt(row.get('relative_decrease'), 3, True)} "
            f"| {_fmt(row.get('decrease_vs_typical'), 2)} |"
        )
    stats = headline_stats(comparison)
    lines += [
        "",
        f"MAE decrease of MPEMD vs NIMA: typical bin {TYPICAL_BIN} {_fmt(stats['typical_decrease'], signed=True)}; "
        f"every other bin pooled {_fmt(stats['unusual_decrease'], signed=True)} "
        f"({_fmt(stats['unusual_ratio'], 2)}× typical); extreme bins (<0.6, >=1.6) pooled "
        f"{_fmt(stats['extreme_decrease'], signed=True)} ({_fmt(stats['extreme_ratio'], 2)}× typical); "
        f"largest bin ratio {_fmt(stats['max_ratio'], 2)}× in {stats['max_ratio_bin']} (bins of >= {MIN_BIN_N} "
        "images; the paper reports up to 7.9×).",
    ]
    lines += ["", "## Overall", "", "| model | n | MSE | MAE | LCC | SRCC | accuracy |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in overall:
        lines.append(" | ".join([f"| {row['model']}", *(_fmt(row.get(k)) for k in OVERALL_METRICS)]) + " |")
    if report:
        lines += ["", f"Report: {report}"]
    return "\n".join(lines) + "\n"
