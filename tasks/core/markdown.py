"""The one Markdown table renderer: reports, run summaries, flow artifacts and benchmark tables.

``table(headers, rows)`` writes a GitHub table; each value goes through ``cell`` (undefined as ``-``,
floats to ``digits`` places, ``|`` escaped), so a string a caller formatted itself passes unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

UNDEFINED = "-"


def cell(value: Any, digits: int = 4) -> str:
    """One table cell: None / NaN / pandas NA as ``-``, a float to ``digits`` places, ``|`` escaped."""
    if value is None or type(value).__name__ == "NAType":  # pandas.NA, without importing pandas
        return UNDEFINED
    if isinstance(value, float | np.floating):
        if math.isnan(value):
            return UNDEFINED
        return ("-inf" if value < 0 else "inf") if math.isinf(value) else f"{value:.{digits}f}"
    return str(value).replace("|", "\\|")


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]], *, digits: int = 4,
          align: str | None = None) -> str:
    """A GitHub Markdown table, no trailing newline; ``align`` has one letter a column, ``l`` or ``r``
    (default: all left)."""
    marks = [" ---: " if a == "r" else " --- " for a in (align or "l" * len(headers))]
    if len(marks) != len(headers):
        raise ValueError(f"align has {len(marks)} letters for {len(headers)} columns")
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(marks) + "|"]
    lines += ["| " + " | ".join(cell(v, digits) for v in row) + " |" for row in rows]
    return "\n".join(lines)
