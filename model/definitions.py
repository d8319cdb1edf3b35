"""What the numpy metrics (``model.metrics``) and the DuckDB queries (``sql/``, ``tasks.analysis.sql``) share: the
aspect-ratio bins of METHOD.md's analysis and the tolerance of "constant".

Plain Python on purpose: ``mpemd sql`` imports this and neither numpy nor pyarrow (~0.08 s of every
call). ``model.metrics`` re-exports every name, so either import works.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

# METHOD.md's analysis bins (height / width): (0, 0.4) kept apart, then the paper's seven.
ASPECT_BIN_EDGES: tuple[float, ...] = (0.0, 0.4, 0.6, 0.8, 1.0, 1.2, 1.4, 1.6, math.inf)
TYPICAL_ASPECT_BIN = "0.6-0.8"
HIGH_SCORE_THRESHOLD = 5.0
# Relative spread under which a vector counts as constant: a few float32 ulps (eps = 1.19e-7).
CONSTANT_RTOL = 1e-6


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
