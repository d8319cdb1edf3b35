"""Flow ``train-mpemd``: stage 2, MPEMD fine-tuning from a stage-1 checkpoint.

``init`` is a run id under {root}/runs (its checkpoint-best.pt), a checkpoint URL, or ``latest``
(the newest nima run under {root}/runs, so that ``train-nima/smoke`` then ``train-mpemd/smoke``
chain without parameters).

    mpemd train-mpemd --root ./data --preset cpu-smoke --init nima-20260101-120000-abc123
    prefect deployment run train-mpemd/smoke
"""

from __future__ import annotations

import argparse
from typing import Any

from prefect import flow
from pydantic import Field

from flows.training_runs import (
    TrainParams,
    add_training_arguments,
    params_from_args,
    print_result,
    run_training,
)
from tasks.training import latest_run


class TrainMpemdParams(TrainParams):
    init: str = Field("latest", description="stage-1 weights: a run id under {root}/runs, a checkpoint URL, "
                      "or 'latest' (the newest nima run under {root}/runs)")


@flow(name="train-mpemd", log_prints=True)
def train_mpemd(params: TrainMpemdParams) -> dict[str, Any]:
    """Fine-tune MPEMD from stage-1 weights; validate with seeded patches; write {root}/runs/<run_id>."""
    init = latest_run(params.root, "nima") if params.init == "latest" else params.init
    return run_training("mpemd", params, init=init)


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train-mpemd", help="stage 2: fine-tune MPEMD from a stage-1 run or checkpoint")
    add_training_arguments(p)
    p.add_argument("--init", required=True, help="stage-1 run id under {root}/runs, a checkpoint URL, or 'latest'")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    result = train_mpemd(TrainMpemdParams(**params_from_args(args), init=args.init))
    print_result(result)
    return 0
