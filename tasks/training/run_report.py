"""A training run's report: the per-epoch history as a table, its curves, and the summary Markdown.

Written into the run folder after every epoch (``metrics.parquet``, ``curves.png``) and published by
the training flows (``summary_markdown``). Matplotlib and ``tasks.analysis.report`` are imported only when a
plot is drawn: a bare GPU host trains without them (the curves are then skipped).
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa

from tasks.core import markdown, storage
from tasks.training.runs import FitResult, RunPaths

if TYPE_CHECKING:
    from matplotlib.figure import Figure


logger = logging.getLogger("mpemd")

METRIC_COLUMNS = ("n", "mse", "mae", "rmse", "lcc", "srcc", "accuracy", "emd2", "emd1", "std_lcc")
SUMMARY_COLUMNS = ("loss", "emd2", "emd1", "mse", "mae", "rmse", "lcc", "srcc", "accuracy", "std_lcc", "n",
                   "skipped")


def history_frame(history: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per epoch and split (train, val) in a fixed column order."""
    columns = ["epoch", "split", "lr", "loss", *METRIC_COLUMNS, "skipped", "seconds", "samples_per_s"]
    return pd.DataFrame(history).reindex(columns=columns)


def history_row(history: list[dict[str, Any]], split: str, epoch: int | None = None) -> dict[str, Any]:
    """The last row of ``split`` (of ``epoch`` if given) as plain Python values; {} if none."""
    rows = history_frame(history)
    part = rows[rows["split"] == split]
    if epoch is not None:
        part = part[part["epoch"] == epoch]
    if not len(part):
        return {}
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in part.iloc[-1].to_dict().items()}


def plot_curves(history: list[dict[str, Any]], title: str) -> Figure:
    from matplotlib.figure import Figure  # imported here: GPU hosts may lack matplotlib

    frame = history_frame(history)
    fig = Figure(figsize=(11, 3.6), layout="constrained")
    axes = fig.subplots(1, 3)
    for split, style in (("train", "-o"), ("val", "-s")):
        part = frame[frame["split"] == split]
        axes[0].plot(part["epoch"] + 1, part["loss"], style, label=split, markersize=3)
        axes[1].plot(part["epoch"] + 1, part["emd2"], style, label=split, markersize=3)
        axes[2].plot(part["epoch"] + 1, part["lcc"], style, label=f"LCC {split}", markersize=3)
        axes[2].plot(part["epoch"] + 1, part["srcc"], style.replace("-", ":"), label=f"SRCC {split}", markersize=3)
    for ax, name in zip(axes, ("loss", "EMD_2", "correlation"), strict=True):
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return fig


def write_history(paths: RunPaths, history: list[dict[str, Any]], title: str) -> None:
    """``metrics.parquet`` always; ``curves.png`` when matplotlib is there."""
    storage.write_parquet_atomic(pa.Table.from_pandas(history_frame(history), preserve_index=False),
                                 paths.metrics)
    try:
        from tasks.core.plots import figure_png

        png = figure_png(plot_curves(history, title))
    except ImportError as exc:  # a bare GPU host: the run goes on, the plot is missing
        logger.warning("curves.png not written (%s)", exc)
        return
    storage.write_bytes_atomic(paths.curves, png)


def summary_rows(result: FitResult) -> list[dict[str, Any]]:
    """final_train, final_val and best_val as table rows (``row`` names the row)."""
    return [{"row": name, **{k: v for k, v in (getattr(result, name) or {}).items() if k != "split"}}
            for name in ("final_train", "final_val", "best_val")]


def summary_markdown(result: FitResult) -> str:
    """The final metrics table (last and best epoch, train and val) for a Prefect artifact or a report."""
    lines = [
        f"# {result.method.upper()} run `{result.run_id}`",
        "",
        f"- run folder: `{result.run_dir}`",
        f"- best checkpoint: `{result.best_checkpoint}` (epoch {result.best_epoch + 1}, "
        f"val {result.best_metric} = {markdown.cell(result.best_value)}), model_version `{result.model_version}`",
        f"- epochs run: {result.epochs_run}, stopped early: {result.stopped_early}",
    ]
    if result.init:
        lines.append(f"- started from: `{result.init['url']}` (model_version `{result.init['model_version']}`)")
    rows = [[row["row"], *(_count(row.get(c)) if c in ("n", "skipped") else row.get(c) for c in SUMMARY_COLUMNS)]
            for row in summary_rows(result)]
    return "\n".join([*lines, "", markdown.table(["row", *SUMMARY_COLUMNS], rows)]) + "\n"


def _count(value: Any) -> int | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else int(value)
