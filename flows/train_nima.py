"""Flow ``train-nima``: stage 1, NIMA pre-training (also the baseline), METHOD.md's settings by preset.

With ``init`` it continues a trained model instead (a run id under {root}/runs, a checkpoint URL,
or ``latest``): the whole network starts from that checkpoint and trains exactly ``mpemd_epochs``
epochs at stage 1's learning rate, the NIMA baseline with the same training budget as stage 2.

    mpemd train-nima --root ./data --preset cpu-smoke --set epochs=5
    mpemd train-nima --root ./data --preset cpu-smoke --init nima-20260101-120000-abc123  # equal budget
    prefect deployment run train-nima/smoke
"""

from __future__ import annotations

from prefect import flow

from flows.params import TrainNimaParams, per_setting
from flows.runtime import run_flow
from flows.training_runs import print_result, run_training
from tasks.runs import resolve_init_arg
from tasks.training import FitResult


@flow(name="train-nima", log_prints=True)
@per_setting(TrainNimaParams)
def train_nima(params: TrainNimaParams) -> FitResult:
    """Train NIMA on {root}/manifests/train.parquet, validate on val.parquet, write {root}/runs/<run_id>."""
    return run_training("nima", params, init=resolve_init_arg(params.root, params.init, "nima"))


def cli_run(params: TrainNimaParams) -> int:
    """``mpemd train-nima``."""
    print_result(run_flow(train_nima, params))
    return 0
