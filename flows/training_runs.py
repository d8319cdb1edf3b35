"""What ``train-nima`` and ``train-mpemd`` share: the parameters, the run id, the call into
``tasks.training.fit``, the summary artifacts and the CLI arguments. Each flow lives in its own file.
"""

from __future__ import annotations

import argparse
import logging
import shlex
from typing import Any

from prefect.context import FlowRunContext
from pydantic import BaseModel, Field, field_validator

from flows.artifacts import publish_markdown, publish_table
from tasks.presets import list_presets, parse_overrides, resolve_config
from tasks.training import fit, new_run_id, summary_markdown

logger = logging.getLogger("mpemd")

OverrideValue = str | int | float | bool | None


class TrainParams(BaseModel):
    """Parameters of a training run (both stages)."""

    root: str = Field("./data", description="data root URL: reads {root}/manifests, writes {root}/runs/<run_id>")
    preset: str = Field("cpu-smoke", description=f"one of {list_presets()}")
    overrides: dict[str, OverrideValue] = Field(default_factory=dict,
                                                description="TrainConfig fields to change, e.g. {'epochs': 5}")
    run_id: str | None = Field(None, description="run folder name; an existing run resumes from its last "
                               "checkpoint (default: derived from the flow run, so a retry resumes)")
    resume: bool = Field(True, description="resume from {run_dir}/checkpoint-last.pt when it exists")

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        if value not in list_presets():
            raise ValueError(f"unknown preset {value!r}; choose from {list_presets()}")
        return value


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
    """The ``mpemd`` command line that makes (or resumes) exactly this run."""
    parts = ["mpemd", f"train-{method}", "--root", params.root, "--preset", params.preset]
    if init:
        parts += ["--init", init]
    for name, value in params.overrides.items():
        parts += ["--set", f"{name}={value}"]
    parts += ["--run-id", run_id]
    if not params.resume:
        parts.append("--no-resume")
    return shlex.join(parts)


def run_training(method: str, params: TrainParams, init: str | None = None) -> dict[str, Any]:
    cfg = resolve_config(params.preset, params.overrides)
    run_id = params.run_id or default_run_id(method)
    result = fit(cfg, root=params.root, method=method, run_id=run_id, init=init,
                 command=equivalent_command(method, params, run_id, init), resume=params.resume)
    publish_markdown(f"{method}-training-summary", summary_markdown(result),
                     description=f"final metrics of {method} run {run_id}")
    publish_table(f"{method}-training-final-metrics",
                  [{"row": name, **{k: v for k, v in (result[name] or {}).items() if k != "split"}}
                   for name in ("final_train", "final_val", "best_val")],
                  description=f"{method} run {run_id}")
    logger.info("run folder: %s", result["run_dir"])
    return {
        "run_id": result["run_id"],
        "run_dir": result["run_dir"],
        "best_checkpoint": result["best_checkpoint"],
        "model_version": result["model_version"],
        "best_metric": result["best_metric"],
        "best_value": result["best_value"],
        "best_epoch": result["best_epoch"],
        "epochs_run": result["epochs_run"],
        "final_val": result["final_val"],
        "final_train": result["final_train"],
        "init": result["init"],
    }


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", default="./data", help="data root URL (local path or s3://...)")
    parser.add_argument("--preset", default="cpu-smoke", choices=list_presets())
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a TrainConfig field (repeatable), e.g. --set epochs=5")
    parser.add_argument("--run-id", help="run folder name; an existing run resumes")
    parser.add_argument("--no-resume", action="store_true", help="start over even if a last checkpoint exists")


def params_from_args(args: argparse.Namespace) -> dict[str, Any]:
    return {"root": args.root, "preset": args.preset, "overrides": parse_overrides(args.overrides),
            "run_id": args.run_id, "resume": not args.no_resume}


def print_result(result: dict[str, Any]) -> None:
    print(f"run folder: {result['run_dir']}")
    print(f"best checkpoint: {result['best_checkpoint']} (model_version {result['model_version']}, "
          f"val {result['best_metric']} {result['best_value']})")
