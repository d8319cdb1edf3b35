"""The aspect-ratio histogram of a dataset, like the paper's Figure 4, and the METHOD.md bin counts.

Aspect ratio = height / width as displayed. Fine bins are 0.05 wide from 0 to 2.5 (AVA's 2:3 and
3:4 peaks fall in 0.65-0.70 and 0.75-0.80); ratios of 2.5 or more are counted in one overflow row
(``lo=2.5, hi=inf``) so nothing is dropped. Outputs: a Parquet table, a PNG and a Markdown summary.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pyarrow as pa
from matplotlib.figure import Figure

from model.aspect_bins import ASPECT_BIN_EDGES, aspect_bin_labels
from tasks.core import markdown, storage

BIN_WIDTH = 0.05
MAX_RATIO = 2.5


def fine_histogram(aspect_ratio: np.ndarray, width: float = BIN_WIDTH, top: float = MAX_RATIO) -> pa.Table:
    """Rows ``lo, hi, count, fraction`` for [0, top) in ``width`` steps, then ``[top, inf)``."""
    ratio = np.asarray(aspect_ratio, dtype=np.float64)
    ratio = ratio[np.isfinite(ratio)]
    n_bins = round(top / width)
    edges = np.round(np.arange(n_bins + 1) * width, 10)
    # Integer bin index (floor) rather than np.histogram, so 0.65 lands in [0.65, 0.70) exactly.
    index = np.floor(np.round(ratio / width, 9)).astype(np.int64)
    counts = np.bincount(np.clip(index, 0, n_bins), minlength=n_bins + 1)
    lo = np.append(edges[:-1], top)
    hi = np.append(edges[1:], math.inf)
    total = max(int(counts.sum()), 1)
    return pa.table({"lo": lo, "hi": hi, "count": counts.astype(np.int64), "fraction": counts / total})


def analysis_bin_counts(aspect_ratio: np.ndarray, edges: tuple[float, ...] = ASPECT_BIN_EDGES) -> pa.Table:
    """Rows ``bin, lo, hi, count, fraction`` over METHOD.md's analysis bins (``model.metrics``)."""
    ratio = np.asarray(aspect_ratio, dtype=np.float64)
    counts = [int(((ratio >= lo) & (ratio < hi)).sum()) for lo, hi in itertools.pairwise(edges)]
    total = max(sum(counts), 1)
    return pa.table({"bin": aspect_bin_labels(edges), "lo": list(edges[:-1]), "hi": list(edges[1:]),
                     "count": pa.array(counts, pa.int64()), "fraction": [c / total for c in counts]})


def histogram_png(fine: pa.Table, title: str = "Aspect ratio (height / width)") -> bytes:
    fig = Figure(figsize=(8, 3.6), dpi=110)
    ax = fig.add_subplot()
    lo = fine.column("lo").to_numpy()[:-1]
    counts = fine.column("count").to_numpy()
    ax.bar(lo, counts[:-1], width=BIN_WIDTH, align="edge", color="#4c72b0", edgecolor="white", linewidth=0.4)
    for ratio, name in ((2 / 3, "2:3"), (3 / 4, "3:4"), (1.0, "1:1"), (4 / 3, "4:3"), (1.5, "3:2")):
        ax.axvline(ratio, color="#c44e52", linestyle=":", linewidth=0.8)
        ax.text(ratio, ax.get_ylim()[1] * 0.97, name, rotation=90, va="top", ha="right", fontsize=7,
                color="#c44e52")
    overflow = int(counts[-1])
    ax.set_xlim(0, MAX_RATIO)
    ax.set_xlabel("height / width (0.05-wide bins; dotted lines: h:w ratios)" + (f"; {overflow} images >= 2.5 not shown" if overflow else ""))
    ax.set_ylabel("images")
    ax.set_title(f"{title}, n = {int(counts.sum())}")
    from tasks.core.plots import figure_png  # the one figure -> PNG; imported late, as run_report does

    return figure_png(fig)


def histogram_markdown(fine: pa.Table, bins: pa.Table) -> str:
    n = int(np.sum(fine.column("count").to_numpy()))
    rows = [(r["bin"], r["count"], f"{100 * r['fraction']:.1f}%") for r in bins.to_pylist()]
    peaks = sorted(fine.to_pylist(), key=lambda r: -r["count"])[:3]
    peak_text = ", ".join(f"[{p['lo']:.2f}, {p['hi']:.2f}): {p['count']}" for p in peaks if p["count"])
    return (f"# Aspect-ratio histogram\n\n{n} images. Largest 0.05-wide bins: {peak_text or 'none'}.\n\n"
            "Images per METHOD.md analysis bin:\n\n"
            + markdown.table(["bin (height/width)", "images", "share"], rows, align="lrr") + "\n")


def write_histogram(aspect_ratio: np.ndarray, root: str) -> dict[str, str]:
    """Write ``{root}/stats/aspect_ratio_histogram.{parquet,png,md}`` and the bin counts Parquet."""
    fine = fine_histogram(aspect_ratio)
    bins = analysis_bin_counts(aspect_ratio)
    stats = storage.join(root, "stats")
    urls = {
        "histogram": storage.join(stats, "aspect_ratio_histogram.parquet"),
        "png": storage.join(stats, "aspect_ratio_histogram.png"),
        "markdown": storage.join(stats, "aspect_ratio_histogram.md"),
        "bins": storage.join(stats, "aspect_ratio_bins.parquet"),
    }
    storage.write_parquet_atomic(fine, urls["histogram"])
    storage.write_parquet_atomic(bins, urls["bins"])
    storage.write_bytes_atomic(urls["png"], histogram_png(fine))
    storage.write_text_atomic(urls["markdown"], histogram_markdown(fine, bins))
    return urls
