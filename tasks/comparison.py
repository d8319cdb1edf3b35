"""The NIMA-vs-MPEMD comparison as people read it: the per-aspect-bin table and the overall metrics.

Inputs are the rows that ``analyze-errors`` returns (``compare_models.sql`` and
``errors_by_aspect_bin.sql``); the output is Markdown, printed by ``reproduce`` and ``make demo``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

OVERALL_METRICS = ("n", "mse", "mae", "lcc", "srcc", "accuracy")


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
    lines += ["", "## Overall", "", "| model | n | MSE | MAE | LCC | SRCC | accuracy |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in overall:
        lines.append(" | ".join([f"| {row['model']}", *(_fmt(row.get(k)) for k in OVERALL_METRICS)]) + " |")
    if report:
        lines += ["", f"Report: {report}"]
    return "\n".join(lines) + "\n"
