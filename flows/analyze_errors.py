"""Flow ``analyze-errors``: the paper's error table by aspect ratio, NIMA against MPEMD, as a report.

    views over {root}/manifests and {root}/predictions  ->  sql/ queries (per-bin errors of each
    set, the comparison, histograms, worst predictions)  ->  PNG plots + report.md under
    {root}/reports/<name>/  ->  the same tables and Markdown as Prefect artifacts

``mpemd analyze-errors --root URL --nima-version V --mpemd-version V`` runs this same flow. The
return value carries the comparison rows and paths, so a ``reproduce`` flow can print them.
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import sys
from typing import Any

import duckdb
import pyarrow as pa
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field, field_validator

from flows.artifacts import artifact_key, publish_markdown, publish_table
from flows.sql_cli import format_table
from model.metrics import ASPECT_BIN_EDGES, TYPICAL_ASPECT_BIN
from tasks import report, sql

logger = logging.getLogger("mpemd")


def format_edges(edges: tuple[float, ...] | list[float]) -> str:
    return ",".join("inf" if math.isinf(e) else f"{e:g}" for e in edges)


def parse_edges(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


class PredictionSetChoice(BaseModel):
    """One side of the comparison: a model version, narrowed to one prediction set where it has several."""

    model_version: str = Field(description="model_version= partition (checkpoint hash) of the predictions")
    label: str = Field(description="name in the report, e.g. NIMA")
    model: str | None = Field(None, description="model column to keep (nima, mpemd); None keeps any")
    patch_mode: str | None = Field(None, description="patch mode to keep (warp, random, grid); None keeps any")
    n_patches: int | None = Field(None, ge=1, description="patch count to keep; None keeps any")


class AnalyzeErrorsParams(BaseModel):
    """Parameters of ``analyze-errors`` (also the form in the Prefect UI)."""

    root: str = Field(description="data root holding manifests/ and predictions/ (local path or URL)")
    report_name: str = Field("errors", description="the report goes to {root}/reports/<report_name>/")
    nima: PredictionSetChoice
    mpemd: PredictionSetChoice
    split: str | None = Field("test", description="manifest split to judge on (None: every split)")
    # Text, not a list of floats: the open last edge "inf" does not survive JSON parameter storage.
    bin_edges: str = Field(format_edges(ASPECT_BIN_EDGES),
                           description="aspect-ratio (height/width) bin edges, comma separated; inf allowed")
    typical_bin: str = Field(TYPICAL_ASPECT_BIN, description="the bin whose MAE decrease is the unit")
    worst_n: int = Field(20, ge=0, description="largest errors listed per model")
    scatter_n: int = Field(5000, ge=1, description="most points in the predicted-vs-true scatter")
    headline_min_n: int = Field(10, ge=1, description="fewest images of a bin in the headline ratio")

    @field_validator("report_name")
    @classmethod
    def _one_path_segment(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value) or ".." in value:
            raise ValueError("report_name must be one path segment of letters, digits, '.', '_' or '-'")
        return value

    @field_validator("bin_edges")
    @classmethod
    def _valid_edges(cls, value: str) -> str:
        sql.aspect_bins_table(parse_edges(value))  # raises ValueError on bad edges
        return value


def _set_params(choice: PredictionSetChoice, side: str | None = None) -> dict[str, Any]:
    """The query parameters selecting ``choice``: ``model_version, model, ...`` for one-set queries,
    ``<side>_version, <side>_model, ...`` for the two-set ones."""
    values = {"model": choice.model, "patch_mode": choice.patch_mode, "n_patches": choice.n_patches}
    if side is None:
        return {"model_version": choice.model_version, **values}
    return {f"{side}_version": choice.model_version, **{f"{side}_{k}": v for k, v in values.items()}}


def check_set(con: Any, choice: PredictionSetChoice) -> list[dict[str, Any]]:
    """The stored sets a choice matches; raises when it matches none (a typo in a version is common)."""
    sets = sql.run_query_df(con, "prediction_sets", {"model_version": choice.model_version})
    for key in ("model", "patch_mode", "n_patches"):
        wanted = getattr(choice, key)
        if wanted is not None:
            sets = sets[sets[key] == wanted]
    if sets.empty or int(sets["n_ok"].sum()) == 0:
        available = sql.run_query_df(con, "prediction_sets")
        held = available[["model_version", "model", "patch_mode", "n_patches"]].to_dict("records")
        raise ValueError(f"{choice.label}: no ok predictions for {choice.model_dump(exclude={'label'})}; "
                         f"the root holds: {held}")
    return sets.to_dict("records")


def collect_tables(params: AnalyzeErrorsParams) -> report.ErrorTables:
    """Run every query the report needs over ``params.root`` (one DuckDB connection)."""
    con = sql.connect(params.root, parse_edges(params.bin_edges))
    try:
        for choice in (params.nima, params.mpemd):
            sets = check_set(con, choice)
            if len(sets) > 1:
                logger.warning("%s matches %d prediction sets (%s); each image counts once, by its latest row. "
                               "Set model/patch_mode/n_patches to pick one.", choice.label, len(sets),
                               [(s["model"], s["patch_mode"], s["n_patches"]) for s in sets])
        pair = {**_set_params(params.nima, "nima"), **_set_params(params.mpemd, "mpemd"), "split": params.split}
        comparison = sql.run_query_df(con, "compare_models", {**pair, "typical_bin": params.typical_bin})
        errors, worst = {}, {}
        for choice in (params.nima, params.mpemd):
            one = {**_set_params(choice), "split": params.split}
            errors[choice.label] = sql.run_query_df(con, "errors_by_aspect_bin", one)
            if params.worst_n:
                worst[choice.label] = sql.run_query_df(con, "worst_predictions", {**one, "limit": params.worst_n})
        return report.ErrorTables(
            labels=(params.nima.label, params.mpemd.label),
            comparison=comparison,
            errors=errors,
            aspect_histogram=sql.run_query_df(con, "aspect_ratio_histogram", {"split": params.split}),
            score_distribution=sql.run_query_df(con, "score_distribution", {"split": params.split}),
            paired=sql.run_query_df(con, "paired_scores", {**pair, "limit": params.scatter_n}),
            worst=worst,
            typical_bin=params.typical_bin,
            headline_min_n=params.headline_min_n,
        )
    finally:
        con.close()


def _write(params: AnalyzeErrorsParams, markdown: str, plots: dict[str, bytes]) -> dict[str, Any]:
    return report.write_report(params.root, params.report_name, markdown, plots)


def _retry_on_io(task: Any, task_run: Any, state: Any) -> bool:
    """Retry storage hiccups (S3, network) only; a wrong version or bad data fails at once."""
    try:
        state.result()
    except (OSError, duckdb.IOException, duckdb.HTTPException):
        return True
    except Exception:
        return False
    return False


# The work is idempotent (reads, then atomic writes), so a retry redoes it whole.
collect_task = task(collect_tables, name="collect-error-tables", retries=2, retry_delay_seconds=5,
                    retry_condition_fn=_retry_on_io, cache_policy=NO_CACHE)
write_task = task(_write, name="write-report", retries=2, retry_delay_seconds=5,
                  retry_condition_fn=_retry_on_io, cache_policy=NO_CACHE)


def _records(frame: Any) -> list[dict[str, Any]]:
    """Rows with NaN/NA as None and numpy scalars as Python ones (JSON-safe for artifacts and returns)."""
    rows = []
    for record in frame.astype(object).where(frame.notna(), None).to_dict("records"):
        rows.append({k: (v.item() if hasattr(v, "item") else v) for k, v in record.items()})
    return rows


@flow(name="analyze-errors", log_prints=True, timeout_seconds=3600)
def analyze_errors(params: AnalyzeErrorsParams) -> dict[str, Any]:
    """Write ``{root}/reports/<name>/report.md`` and its plots; returns comparison rows, headline and paths."""
    run_logger = get_run_logger()
    tables = collect_task(params)
    overall = tables.comparison[tables.comparison["bin"] == "all"]
    if overall.empty or int(overall["n"].iloc[0]) == 0:
        raise ValueError(f"no {params.split or 'manifest'} images are scored by both {params.nima.label} "
                         f"({params.nima.model_version}) and {params.mpemd.label} ({params.mpemd.model_version})")
    title = f"Errors by aspect ratio: {params.nima.label} vs {params.mpemd.label}"
    context = {"root": params.root, "split": str(params.split),
               params.nima.label: params.nima.model_dump_json(exclude={"label"}),
               params.mpemd.label: params.mpemd.model_dump_json(exclude={"label"}),
               "bins": params.bin_edges}
    markdown = report.render_markdown(tables, title, context)
    paths = write_task(params, markdown, report.render_plots(tables))
    run_logger.info("report written to %s", paths["report"])

    key = f"analyze-errors-{params.report_name}"
    comparison = _records(tables.comparison)
    publish_markdown(key, markdown, description=f"{title} ({paths['report']})")
    publish_table(f"{key}-comparison", comparison, description=f"{title}: per bin")
    for label, frame in tables.errors.items():
        publish_table(f"{key}-{artifact_key(label)}", _records(frame), description=f"{label}: errors per bin")
    top = report.headline(tables.comparison, params.typical_bin, params.headline_min_n)
    if top["bin"] is not None:
        print(f"MAE decrease in {top['bin']} is {top['decrease_vs_typical']:.2f}x the decrease in "
              f"{params.typical_bin} (seed: up to {report.SEED_DECREASE_RATIO}x)")
    return {"report": paths["report"], "plots": paths["plots"], "comparison": comparison, "headline": top,
            "errors": {label: _records(frame) for label, frame in tables.errors.items()}}


# ---------------------------------------------------------------------------------------------
# CLI


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("analyze-errors", help="NIMA vs MPEMD error report by aspect ratio",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True, help="data root (manifests/, predictions/, reports/)")
    p.add_argument("--name", default="errors", help="report name: {root}/reports/<name>/")
    for side, label in (("nima", "NIMA"), ("mpemd", "MPEMD")):
        p.add_argument(f"--{side}-version", required=True, help=f"model_version of the {label} predictions")
        p.add_argument(f"--{side}-label", default=label, help=f"name in the report (default {label})")
        p.add_argument(f"--{side}-model", default=None, help="model column to keep (default any)")
        p.add_argument(f"--{side}-patch-mode", default=None, help="patch mode to keep (default any)")
        p.add_argument(f"--{side}-n-patches", type=int, default=None, help="patch count to keep (default any)")
    p.add_argument("--split", default="test", help="manifest split (default test; 'all' for every split)")
    p.add_argument("--bins", default=format_edges(ASPECT_BIN_EDGES), help="bin edges, comma separated")
    p.add_argument("--typical-bin", default=TYPICAL_ASPECT_BIN)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    def choice(side: str) -> PredictionSetChoice:
        return PredictionSetChoice(
            model_version=getattr(args, f"{side}_version"), label=getattr(args, f"{side}_label"),
            model=getattr(args, f"{side}_model"), patch_mode=getattr(args, f"{side}_patch_mode"),
            n_patches=getattr(args, f"{side}_n_patches"))

    params = AnalyzeErrorsParams(root=args.root, report_name=args.name, nima=choice("nima"),
                                 mpemd=choice("mpemd"), split=None if args.split == "all" else args.split,
                                 bin_edges=args.bins, typical_bin=args.typical_bin)
    result = analyze_errors(params)
    print(format_table(pa.Table.from_pylist(result["comparison"])))
    print(f"report: {result['report']}", file=sys.stderr)
    return 0
