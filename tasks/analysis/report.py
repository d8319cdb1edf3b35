"""The error-analysis report: Markdown tables and PNG plots from the ``sql/`` query results.

``render_plots`` and ``render_markdown`` turn an ``ErrorTables`` (pandas frames from
``tasks.analysis.sql.run_query_df``) into PNG bytes and Markdown text; ``write_report`` stores them under
``{root}/reports/<name>/``: the PNGs first, ``report.md`` last, each write atomic, so a
``report.md`` that exists always has its plots beside it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from model.aspect_bins import TYPICAL_ASPECT_BIN
from tasks.analysis.bootstrap import HEADLINE_MIN_N, BootstrapResult
from tasks.analysis.comparison import PAPER_DECREASE_RATIO, Pair, headline_markdown, interval_text
from tasks.core import markdown, storage
from tasks.core.plots import figure_png

NIMA_COLOR, MPEMD_COLOR, TRUE_COLOR = "#8c8c8c", "#c44e52", "#4c72b0"
PLOT_FILES = {
    "aspect_ratio_histogram": "aspect_ratio_histogram.png",
    "mae_by_bin": "mae_by_bin.png",
    "predicted_vs_true": "predicted_vs_true.png",
    "score_histogram": "score_histogram.png",
}
__all__ = ["PAPER_DECREASE_RATIO"]  # re-exported: flows/analyze_errors.py prints it beside the headline


@dataclass
class ErrorTables:
    """What a report is made of: each frame is one query's answer."""

    labels: tuple[str, str]  # (baseline, MPEMD) as the report names them
    comparison: pd.DataFrame  # compare_models
    errors: dict[str, pd.DataFrame]  # label -> errors_by_aspect_bin
    aspect_histogram: pd.DataFrame  # aspect_ratio_histogram
    score_distribution: pd.DataFrame  # score_distribution
    paired: pd.DataFrame  # paired_scores
    worst: dict[str, pd.DataFrame] = field(default_factory=dict)  # label -> worst_predictions
    typical_bin: str = TYPICAL_ASPECT_BIN
    headline_min_n: int = HEADLINE_MIN_N  # bins with fewer images are left out of the headline ratio
    bootstrap: BootstrapResult | None = None  # paired bootstrap of the two sets (intervals, verdicts)


def headline(tables: ErrorTables) -> dict[str, Any]:
    """The paper's "up to 7.9 times" statistic: the bin (of at least ``headline_min_n`` images) whose MAE
    decrease is the largest multiple of the typical bin's, re-picked in each resample, with its
    bootstrap interval. Only when the typical bin's decrease is significantly positive (a ratio to a
    decrease that may be zero or negative means nothing); otherwise ``bin`` is None and ``reason``
    says why (one sentence)."""
    result = tables.bootstrap
    empty = {"bin": None, "decrease_vs_typical": None, "typical_bin": tables.typical_bin,
             "min_n": tables.headline_min_n}
    if result is None:
        return {**empty, "reason": "no bootstrap was computed"}
    if result.largest_bin_ratio is None:
        notes = [n.split(": ", 1)[1] for n in result.notes if n.startswith("no largest-bin ratio")]
        return {**empty, "reason": notes[0] if notes else f"no bin of {tables.headline_min_n} images or more"}
    label, interval = result.largest_bin_ratio
    return {**empty, "bin": label, "decrease_vs_typical": interval.estimate, "lo": interval.lo, "hi": interval.hi,
            "mae_decrease": result.bins[label][1].estimate, "n": result.bins[label][0],
            "share": result.largest_bin_share}


def headline_sentence(top: dict[str, Any]) -> str:
    """``headline`` in one line of words (what ``analyze-errors`` prints)."""
    typical = top["typical_bin"]
    if top["bin"] is None:
        return f"no largest-bin ratio: {top['reason']}"
    share = f", picked in {top['share']:.0%} of resamples" if top.get("share") is not None else ""
    return (f"largest-bin ratio: among the bins of at least {top['min_n']} test images, {top['bin']}{share} has "
            f"the largest MAE decrease relative to the decrease in {typical}: {top['decrease_vs_typical']:.2f} "
            f"[{top['lo']:.2f}, {top['hi']:.2f}] times it (the paper: up to {PAPER_DECREASE_RATIO}x)")


# ---------------------------------------------------------------------------------------------
# Plots (matplotlib.figure.Figure: no pyplot, no GUI backend)


def plot_aspect_ratio_histogram(hist: pd.DataFrame) -> Figure:
    fig = Figure(figsize=(8, 3.6), dpi=100)
    ax = fig.add_subplot()
    finite = hist[np.isfinite(hist["hi"].astype(float))]
    ax.bar(finite["lo"], finite["n"], width=(finite["hi"] - finite["lo"]), align="edge", color=TRUE_COLOR,
           edgecolor="white", linewidth=0.4)
    overflow = int(hist.loc[~np.isfinite(hist["hi"].astype(float)), "n"].sum())
    ax.set_xlabel("aspect ratio (height / width)")
    ax.set_ylabel("images")
    ax.set_title("Aspect ratios" + (f" ({overflow} at {finite['hi'].max():g} or more not drawn)" if overflow else ""))
    # The analysis bins' edges, so the plot reads against the tables.
    edges = sorted(set(hist["lo"][hist["bin"].ne(hist["bin"].shift())].tolist()))
    for edge in edges[1:]:
        ax.axvline(edge, color="#555555", linestyle=":", linewidth=0.8)
    return fig


def plot_mae_by_bin(comparison: pd.DataFrame, labels: tuple[str, str],
                    bootstrap: BootstrapResult | None = None) -> Figure:
    """Each set's MAE per bin; below it (with a bootstrap) the MAE decrease per bin with its interval."""
    rows = comparison[comparison["bin"] != "all"].reset_index(drop=True)
    x = np.arange(len(rows))
    fig = Figure(figsize=(max(6, 0.9 * len(rows) + 2), 4 if bootstrap is None else 6.5), dpi=100)
    ax = fig.add_subplot(1 if bootstrap is None else 2, 1, 1)
    if bootstrap is not None:
        _plot_decrease_intervals(fig.add_subplot(2, 1, 2), rows, bootstrap, labels)
    width = 0.38
    ax.bar(x - width / 2, rows["nima_mae"].astype(float).fillna(0), width, label=labels[0], color=NIMA_COLOR)
    ax.bar(x + width / 2, rows["mpemd_mae"].astype(float).fillna(0), width, label=labels[1], color=MPEMD_COLOR)
    ax.set_xticks(x, [f"{b}\nn={n}" for b, n in zip(rows["bin"], rows["n"], strict=True)], fontsize=8)
    ax.set_xlabel("aspect-ratio bin (height / width)")
    ax.set_ylabel("MAE of the mean score")
    ax.set_title("MAE per aspect-ratio bin")
    ax.legend()
    return fig


def _plot_decrease_intervals(ax: Any, rows: pd.DataFrame, bootstrap: BootstrapResult,
                             labels: tuple[str, str]) -> None:
    x = np.arange(len(rows))
    estimates, lower, upper = [], [], []
    for label in rows["bin"]:
        _, interval = bootstrap.bins.get(label, (0, None))
        est = np.nan if interval is None else interval.estimate
        lo = np.nan if interval is None else interval.lo
        hi = np.nan if interval is None else interval.hi
        estimates.append(est)
        lower.append(est - lo if np.isfinite(lo) else 0.0)
        upper.append(hi - est if np.isfinite(hi) else 0.0)
    ax.errorbar(x, estimates, yerr=[lower, upper], fmt="o", color=MPEMD_COLOR, ecolor="#333333", capsize=4)
    ax.axhline(0.0, color="#555555", linewidth=0.8)
    ax.set_xticks(x, [str(b) for b in rows["bin"]], fontsize=8)
    ax.set_ylabel("MAE decrease")
    ax.set_title(f"MAE decrease ({labels[0]} - {labels[1]}), {round(bootstrap.level * 100)}% paired-bootstrap "
                 "intervals (> 0 favours the second)", fontsize=9)


def plot_predicted_vs_true(paired: pd.DataFrame, labels: tuple[str, str]) -> Figure:
    fig = Figure(figsize=(9, 4.2), dpi=100)
    true = paired["true_score"].astype(float)
    for i, (column, label, color) in enumerate((("nima_score", labels[0], NIMA_COLOR),
                                               ("mpemd_score", labels[1], MPEMD_COLOR))):
        ax = fig.add_subplot(1, 2, i + 1)
        small = len(paired) < 1000  # few points: draw them larger and darker
        ax.scatter(true, paired[column].astype(float), s=14 if small else 4, alpha=0.7 if small else 0.35,
                   color=color, linewidths=0)
        lo, hi = 1.0, 10.0
        if len(paired):
            both = np.concatenate([true.to_numpy(), paired[column].astype(float).to_numpy()])
            lo, hi = float(np.nanmin(both)) - 0.2, float(np.nanmax(both)) + 0.2
        ax.plot([lo, hi], [lo, hi], color="black", linewidth=0.8)
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_xlabel("true mean score")
        ax.set_ylabel("predicted score")
        ax.set_title(f"{label} (n={len(paired)})")
    return fig


def plot_score_histogram(dist: pd.DataFrame) -> Figure:
    fig = Figure(figsize=(8, 3.6), dpi=100)
    ax = fig.add_subplot()
    for series, rows in dist.groupby("series", sort=False):
        ax.step(rows["lo"], rows["fraction"].astype(float), where="post", label=str(series),
                linewidth=1.6 if series == "true" else 1.0)
    ax.set_xlabel("score")
    ax.set_ylabel("fraction")
    ax.set_title("Score distribution")
    if len(dist):
        ax.legend(fontsize=7)
    return fig


def render_plots(tables: ErrorTables) -> dict[str, bytes]:
    """Every plot of the report as PNG bytes, keyed as ``PLOT_FILES``."""
    figures = {
        "aspect_ratio_histogram": plot_aspect_ratio_histogram(tables.aspect_histogram),
        "mae_by_bin": plot_mae_by_bin(tables.comparison, tables.labels, tables.bootstrap),
        "predicted_vs_true": plot_predicted_vs_true(tables.paired, tables.labels),
        "score_histogram": plot_score_histogram(tables.score_distribution),
    }
    return {key: figure_png(fig) for key, fig in figures.items()}


# ---------------------------------------------------------------------------------------------
# Markdown


def markdown_table(frame: pd.DataFrame, columns: Sequence[str] | None = None, digits: int = 4,
                   headers: Sequence[str] | None = None) -> str:
    """A GitHub Markdown table of ``frame`` (NULL/NaN shown as ``-``)."""
    columns = list(columns or frame.columns)
    return markdown.table(list(headers or columns), frame[columns].itertuples(index=False), digits=digits)


def render_markdown(tables: ErrorTables, title: str, context: dict[str, str] | None = None) -> str:
    """The report: headline, comparison per bin, each model's error table, plots, worst predictions."""
    nima, mpemd = tables.labels
    overall = tables.comparison[tables.comparison["bin"] == "all"]
    parts = [f"# {title}", ""]
    for key, value in (context or {}).items():
        parts.append(f"- {key}: `{value}`")
    parts.append("")
    if tables.bootstrap is not None:
        parts += headline_markdown(Pair(nima, mpemd, "report"), tables.bootstrap)
    else:
        parts.append("**Headline.** No bootstrap was computed, so no claim is made.")
    if len(overall):
        o = overall.iloc[0]
        parts += ["", f"Overall on {int(o['n'])} images: MAE {markdown.cell(o['nima_mae'], 4)} -> "
                      f"{markdown.cell(o['mpemd_mae'], 4)}, MSE {markdown.cell(o['nima_mse'], 4)} -> "
                      f"{markdown.cell(o['mpemd_mse'], 4)}, LCC {markdown.cell(o['nima_lcc'], 4)} -> "
                      f"{markdown.cell(o['mpemd_lcc'], 4)}, SRCC {markdown.cell(o['nima_srcc'], 4)} -> "
                      f"{markdown.cell(o['mpemd_srcc'], 4)} ({nima} -> {mpemd})."]
    comparison, ratio_note = _ratio_column(tables)
    parts += ["", f"## {nima} vs {mpemd} per aspect-ratio bin", "",
              "Images scored by both; bins are half-open [lo, hi) of height / width; `-` is undefined "
              "(no images, or fewer than two for a correlation). `MAE decrease`: "
              f"{nima}'s MAE minus {mpemd}'s (> 0 favours {mpemd}); `relative`: that decrease as a share of "
              f"{nima}'s MAE; `x {tables.typical_bin}`: that decrease divided by the decrease in the typical bin "
              f"{tables.typical_bin}. {ratio_note}", "",
              markdown_table(comparison,
                             ["bin", "n", "nima_mae", "mpemd_mae", "mae_decrease", "relative_decrease",
                              "decrease_vs_typical", "nima_mse", "mpemd_mse", "nima_lcc", "mpemd_lcc",
                              "nima_srcc", "mpemd_srcc"],
                             headers=["bin", "n", f"{nima} MAE", f"{mpemd} MAE", "MAE decrease",
                                      "relative", f"x {tables.typical_bin}", f"{nima} MSE", f"{mpemd} MSE",
                                      f"{nima} LCC", f"{mpemd} LCC", f"{nima} SRCC", f"{mpemd} SRCC"]),
              "", f"![MAE per bin]({PLOT_FILES['mae_by_bin']})", ""]
    for label, frame in tables.errors.items():
        parts += [f"## {label}: errors per aspect-ratio bin", "",
                  markdown_table(frame, ["bin", "n", "mae", "mse", "rmse", "lcc", "srcc", "accuracy", "caveat"],
                                 headers=["bin", "n", "MAE", "MSE", "RMSE", "LCC", "SRCC", "accuracy@5", "note"]), ""]
    parts += ["## Plots", "",
              f"![Predicted vs true]({PLOT_FILES['predicted_vs_true']})", "",
              f"![Aspect-ratio histogram]({PLOT_FILES['aspect_ratio_histogram']})", "",
              f"![Score histogram]({PLOT_FILES['score_histogram']})", ""]
    for label, frame in tables.worst.items():
        parts += [f"## {label}: largest errors", "",
                  markdown_table(frame, ["image_id", "uri", "aspect_ratio", "bin", "true_score", "pred_score",
                                         "error"], digits=3), ""]
    return "\n".join(parts)


def _ratio_column(tables: ErrorTables) -> tuple[pd.DataFrame, str]:
    """The per-bin ratio to the typical decrease only where that decrease is significant (the protocol's
    rule: no ratio to a denominator whose interval includes zero); otherwise blanked, and said."""
    result = tables.bootstrap
    if result is not None and result.typical.significant:
        return tables.comparison, "The typical bin's decrease is significant, so the ratios are shown."
    blank = tables.comparison.copy()
    blank["decrease_vs_typical"] = None
    why = ("no bootstrap was computed" if result is None else
           f"the typical bin's decrease {interval_text(result.typical)} is not significant")
    return blank, f"Ratios to it are not shown: {why}."


def write_report(root: str, name: str, markdown: str, plots: dict[str, bytes]) -> dict[str, Any]:
    """Store the report under ``{root}/reports/<name>/``; returns ``{"report": url, "plots": {key: url}}``."""
    base = storage.join(root, "reports", name)
    urls = {}
    for key, png in plots.items():
        urls[key] = storage.join(base, PLOT_FILES.get(key, f"{key}.png"))
        storage.write_bytes_atomic(urls[key], png)
    report = storage.join(base, "report.md")
    storage.write_text_atomic(report, markdown)  # last: its presence means the plots are there
    return {"report": report, "plots": urls}
