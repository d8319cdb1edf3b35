"""The aspect-ratio bins of METHOD.md's analysis (height / width): their edges, labels and lookup.

Shared by ingest (each manifest row's ``aspect_bin``), the numpy metrics (``model.metrics``), the
DuckDB queries (``sql/``, ``tasks.analysis.sql``) and the command lines (``--bins``). Plain Python on
purpose: ``mpemd sql`` imports this and neither numpy nor pyarrow, and starts faster.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Sequence

# METHOD.md's analysis bins (height / width): (0, 0.4) kept apart, then the paper's seven.
ASPECT_BIN_EDGES: tuple[float, ...] = (0.0, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6, math.inf)
TYPICAL_ASPECT_BIN = "0.6-0.8"


def format_edges(edges: Sequence[float]) -> str:
    """Bin edges as the text ``--bins`` and ``bin_edges`` take: ``"0,0.4,...,inf"``."""
    return ",".join("inf" if math.isinf(e) else f"{e:g}" for e in edges)


def parse_edges(text: str) -> list[float]:
    """``"0,0.5,1,inf"`` -> floats (aspect-ratio bin edges, as ``--bins`` and ``bin_edges`` write them)."""
    return [float(v) for v in text.split(",") if v.strip()]


def aspect_bin_labels(edges: Sequence[float] = ASPECT_BIN_EDGES) -> list[str]:
    """``["0.0-0.4", "0.4-0.6", …, "1.6-inf"]`` for half-open bins ``[lo, hi)``."""
    def fmt(v: float) -> str:
        return "inf" if math.isinf(v) else f"{v:.1f}" if round(v, 1) == v else f"{v:g}"
    return [f"{fmt(lo)}-{fmt(hi)}" for lo, hi in itertools.pairwise(edges)]


def aspect_bin(aspect_ratio: float, edges: Sequence[float] = ASPECT_BIN_EDGES) -> str | None:
    """The label of the bin ``[lo, hi)`` holding ``aspect_ratio`` (height / width), or None."""
    if aspect_ratio is None or not math.isfinite(aspect_ratio) or aspect_ratio < edges[0]:
        return None
    index = bisect.bisect_right(edges, aspect_ratio) - 1
    if index >= len(edges) - 1:
        return None
    return aspect_bin_labels(edges)[index]
