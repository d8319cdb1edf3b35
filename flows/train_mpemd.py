"""Flow ``train-mpemd``: stage 2, MPEMD fine-tuning from a stage-1 checkpoint.

``init`` is a run id under {root}/runs (its checkpoint-best.pt), a checkpoint URL, or ``latest``
(the newest nima run under {root}/runs, so that ``train-nima/smoke`` then ``train-mpemd/smoke``
chain without parameters).

    mpemd train-mpemd --root ./data --preset cpu-smoke --init nima-20260101-120000-abc123
    prefect deployment run train-mpemd/smoke
"""

from __future__ import annotations

from prefect import flow

from flows.params import TrainMpemdParams, per_setting
from flows.runtime import run_flow
from flows.training_runs import print_result, run_training
from tasks.runs import resolve_init_arg
from tasks.training import FitResult


@flow(name="train-mpemd", log_prints=True)
@per_setting(TrainMpemdParams)
def train_mpemd(params: TrainMpemdParams) -> FitResult:
    """Fine-tune MPEMD from stage-1 weights; validate with seeded patches; write {root}/runs/<run_id>."""
    return run_training("mpemd", params, init=resolve_init_arg(params.root, params.init, "nima"))


def cli_run(params: TrainMpemdParams) -> int:
    """``mpemd train-mpemd``."""
    print_result(run_flow(train_mpemd, params))
    return 0
