"""What ``train-nima`` and ``train-mpemd`` share: the run id, the call into ``tasks.training.loop.fit``,
the summary artifacts and the printed result. Each flow lives in its own file; their parameters
(``TrainParams``) in ``flows/params.py``.
"""

from __future__ import annotations

import logging
from typing import Any

from prefect import flow
from prefect.context import FlowRunContext

from flows.artifacts import publish_markdown, publish_table
from flows.ingest_ava import ingest_ava_flow
from flows.params import TrainNimaParams, TrainParams, one_parameter_per_field
from flows.runtime import run_flow, run_step
from flows.synth_ava import synth_ava_flow
from tasks.core import markdown, storage
from tasks.core.cli_args import command_line
from tasks.core.errors import MissingPathError, UnknownChoiceError
from tasks.training.loop import FitResult, fit
from tasks.training.presets import TRAIN_CLI
from tasks.training.run_report import summary_markdown, summary_rows
from tasks.training.runs import latest_run, new_run_id, resolve_init, resolve_init_arg
from tasks.training.setup import require_dataset

logger = logging.getLogger("mpemd")

def default_run_id(method: str) -> str:
    """Stable across retries of the same flow run (so a retried run resumes), unique otherwise."""
    ctx = FlowRunContext.get()
    flow_run = ctx.flow_run if ctx is not None else None
    if flow_run is None:
        return new_run_id(method)
    started = flow_run.created  # fixed at creation: a retry of this flow run gets the same id
    stamp = started.strftime("%Y%m%d-%H%M%S") if started else "run"
    return f"{method}-{stamp}-{flow_run.id.hex[:6]}"


def equivalent_command(method: str, params: TrainParams, run_id: str, init: str | None) -> str:
    """The ``mpemd`` command line that makes (or resumes) exactly this run, written from its settings."""
    resolved = params.model_copy(update={"run_id": run_id, **({"init": init} if "init" in type(params).model_fields
                                                               else {})})
    return command_line(["mpemd", f"train-{method}"], resolved, TRAIN_CLI)


# A smoke run's synthetic set: enough images for every split, split 80/10/10 (a set-up check).
SMOKE_SPLIT = (0.8, 0.1, 0.1)


def synthesize_if_missing(root: str, n: int) -> str | None:
    """A root without an ingested dataset gets ``n`` synthetic images, ingested (referenced in place);
    returns what was done, for the log and the run's summary, or None when the root had data."""
    try:
        require_dataset(root)
        return None
    except MissingPathError:
        pass
    out = storage.join(root, "synth")
    logger.warning("no ingested dataset under %s: synthesizing %d images into %s and ingesting them "
                   "(synth_if_missing; a set-up check, not a result)", root, n, out)
    run_step(synth_ava_flow, out=out, n=n, seed=0)
    run_step(ingest_ava_flow, labels=storage.join(out, "AVA.txt"), images=storage.join(out, "images"), root=root,
         mode="reference", split_fractions=SMOKE_SPLIT)
    return (f"{root} held no ingested dataset: {n} synthetic images (seed 0) were written to {out} and "
            f"ingested (split {'/'.join(map(str, SMOKE_SPLIT))}); this run checks the set-up, it is not a result")


def stage1_if_missing(params: TrainParams) -> str | None:
    """Stage 2 with ``init=latest`` on a root without a nima run (a smoke run on a fresh checkout):
    train that stage 1 first, with the same preset and overrides; returns what was done."""
    try:
        latest_run(params.root, "nima")
        return None
    except UnknownChoiceError:
        pass
    logger.warning("no nima run under %s: training stage 1 first (synth_if_missing)", params.root)
    stage1 = run_training("nima", TrainNimaParams(root=params.root, preset=params.preset,
                                                  overrides=params.overrides))
    return f"{params.root} held no nima run: stage 1 was trained first ({stage1.run_dir})"


def smoke_setup(method: str, params: TrainParams) -> list[str]:
    """What a run with ``synth_if_missing`` had to make first; nothing for any other run."""
    if not params.synth_if_missing:
        return []
    notes = [synthesize_if_missing(params.root, params.synth_if_missing)]
    if method == "mpemd" and getattr(params, "init", None) == "latest":
        notes.append(stage1_if_missing(params))
    return [note for note in notes if note]


def run_training(method: str, params: TrainParams, init: str | None = None, notes: list[str] | None = None
                 ) -> FitResult:
    """``fit`` under a run id stable across retries, then its summary published as artifacts (headed by
    ``notes``: what a smoke run had to make first)."""
    cfg = params.config()
    require_dataset(params.root)  # before a run folder is made: a fresh checkout gets one line saying what to run
    run_id = params.run_id or default_run_id(method)
    requested = getattr(params, "init", None)
    if init is not None:  # say what `latest` (or a run id) resolved to before the work starts
        logger.info("init %s resolved to %s", requested, resolve_init(params.root, init))
    result = fit(cfg, root=params.root, method=method, run_id=run_id, init=init,
                 command=equivalent_command(method, params, run_id, init), resume=params.resume)
    if result.init:
        publish_markdown(f"{method}-init", init_markdown(requested, init, result.init),
                         description=f"the weights {method} run {run_id} started from")
    said = "".join(f"> {note}\n\n" for note in notes or [])
    publish_markdown(f"{method}-training-summary", said + summary_markdown(result),
                     description=f"final metrics of {method} run {run_id}")
    publish_table(f"{method}-training-final-metrics", summary_rows(result), description=f"{method} run {run_id}")
    logger.info("run folder: %s", result.run_dir)
    return result


def init_markdown(requested: str | None, resolved: str, init: dict[str, Any]) -> str:
    """Which checkpoint an ``init`` (``latest``, a run id or a URL) resolved to, as a small table."""
    return "# init\n\n" + markdown.table(
        ["requested", "resolved to", "checkpoint", "model_version", "stage"],
        [[requested, resolved, init.get("url"), init.get("model_version"), init.get("stage")]]) + "\n"


def print_result(result: FitResult) -> None:
    print(f"run folder: {result.run_dir}")
    print(f"best checkpoint: {result.best_checkpoint} (model_version {result.model_version}, "
          f"val {result.best_metric} {result.best_value})")


def training_flow(method: str, model: type[TrainParams], description: str) -> Any:
    """The ``train-<method>`` flow: one parameter per field of ``model``; an ``init`` of ``latest``
    resolves to the newest nima run under {root}/runs (stage 2, and the equal-budget NIMA baseline)."""

    def train(params: TrainParams) -> FitResult:
        notes = smoke_setup(method, params)
        return run_training(method, params, init=resolve_init_arg(params.root, getattr(params, "init", None)),
                            notes=notes)

    train.__name__ = train.__qualname__ = f"train_{method}"
    train.__doc__ = description
    return flow(name=f"train-{method}", log_prints=True)(one_parameter_per_field(model)(train))


def training_cli(train_flow: Any) -> Any:
    """``mpemd train-<method>``: run the flow, print the run folder and best checkpoint."""

    def cli_run(params: TrainParams) -> int:
        print_result(run_flow(train_flow, params))
        return 0

    return cli_run
