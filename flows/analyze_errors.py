"""Flow ``analyze-errors``: the paper's error table by aspect ratio, NIMA against MPEMD, as a report.

    views over {root}/manifests and {root}/predictions  ->  sql/ queries (per-bin errors of each
    set, the comparison, histograms, worst predictions)  ->  PNG plots + report.md under
    {root}/reports/<name>/  ->  the same tables and Markdown as Prefect artifacts

``mpemd analyze-errors --root URL --nima-version V --mpemd-version V`` runs this same flow. The
return value carries the comparison rows and paths, so a ``reproduce`` flow can print them.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import pyarrow as pa
from prefect import flow, task

from flows.artifacts import artifact_key, publish_markdown, publish_table
from flows.params import AnalyzeErrorsParams, PredictionSetChoice, one_parameter_per_field
from flows.runtime import TASK_OPTIONS, run_flow, run_logger, run_step
from flows.sql_cli import print_table
from model.aspect_bins import aspect_bin_labels, parse_edges
from tasks.analysis import report, sql
from tasks.analysis.bootstrap import BootstrapResult, paired_bootstrap
from tasks.analysis.comparison import PredictionSet, scores_frame
from tasks.core import storage
from tasks.core.errors import UnknownChoiceError, missing_path
from tasks.core.records import frame_rows

logger = logging.getLogger("mpemd")


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
        raise UnknownChoiceError(f"{choice.label}: no ok predictions for {choice.model_dump(exclude={'label'})}; "
                                 f"the root holds: {held}")
    if len(sets) > 1:  # silently mixing (or picking) sets would judge a model on settings nobody chose
        held = [(s["model"], s["patch_mode"], s["n_patches"]) for s in sets.to_dict("records")]
        raise UnknownChoiceError(f"{choice.label}: model_version {choice.model_version} has {len(held)} prediction "
                                 f"sets (model, patch_mode, n_patches): {held}; set model/patch_mode/n_patches "
                                 "to pick one")
    return sets.to_dict("records")


def collect_tables(params: AnalyzeErrorsParams) -> report.ErrorTables:
    """Run every query the report needs over ``params.root`` (one DuckDB connection)."""
    if not storage.exists(params.root):  # a mistyped root: say so, not "no ok predictions"
        raise missing_path("data root", params.root)
    con = sql.connect(params.root, parse_edges(params.bin_edges))
    try:
        for choice in (params.nima, params.mpemd):
            check_set(con, choice)  # exactly one stored set, or a UserError saying which exist
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
            bootstrap=_bootstrap(con, params),
        )
    finally:
        con.close()


def _bootstrap(con: Any, params: AnalyzeErrorsParams) -> BootstrapResult:
    """Paired bootstrap of the two sets over every image both scored (tasks/analysis/bootstrap.py)."""
    sets = [PredictionSet(name, c.model_version, c.model, c.patch_mode, c.n_patches)  # labels may coincide
            for name, c in (("baseline", params.nima), ("candidate", params.mpemd))]
    frame = scores_frame(con, sets, params.split)
    labels = [b if isinstance(b, str) else None for b in frame["bin"]]
    return paired_bootstrap(frame["true_score"], frame[sets[0].name], frame[sets[1].name], labels,
                            typical_bin=params.typical_bin, min_n=params.headline_min_n,
                            bin_order=aspect_bin_labels(parse_edges(params.bin_edges)))


# The work is idempotent (reads, then atomic writes), so a retry redoes it whole.
collect_task = task(collect_tables, name="collect-error-tables", **TASK_OPTIONS)
write_task = task(report.write_report, name="write-report", **TASK_OPTIONS)


@flow(name="analyze-errors", log_prints=True, timeout_seconds=3600)
@one_parameter_per_field(AnalyzeErrorsParams)
def analyze_errors(params: AnalyzeErrorsParams) -> dict[str, Any]:
    """Write ``{root}/reports/<name>/report.md`` and its plots; returns comparison rows, headline and paths."""
    log = run_logger()
    tables = run_step(collect_task, params)
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
    paths = run_step(write_task, params.root, params.report_name, markdown, report.render_plots(tables))
    log.info("report written to %s", paths["report"])

    key = f"analyze-errors-{params.report_name}"
    comparison = frame_rows(tables.comparison)
    publish_markdown(key, markdown, description=f"{title} ({paths['report']})")
    publish_table(f"{key}-comparison", comparison, description=f"{title}: per bin")
    for label, frame in tables.errors.items():
        publish_table(f"{key}-{artifact_key(label)}", frame_rows(frame), description=f"{label}: errors per bin")
    top = report.headline(tables)
    print(report.headline_sentence(top))
    return {"report": paths["report"], "plots": paths["plots"], "comparison": comparison, "headline": top,
            "errors": {label: frame_rows(frame) for label, frame in tables.errors.items()}}


def cli_run(params: AnalyzeErrorsParams) -> int:
    """``mpemd analyze-errors``: the comparison table on stdout, the report's path on stderr."""
    result = run_flow(analyze_errors, params)
    import duckdb

    # DuckDB renders the table, as mpemd sql does
    print_table(duckdb.from_arrow(pa.Table.from_pylist(result["comparison"])))
    print(f"report: {result['report']}", file=sys.stderr)
    return 0
