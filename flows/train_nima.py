"""Flow ``train-nima``: stage 1, NIMA pre-training (also the baseline), METHOD.md's settings by preset.

With ``init`` it continues a trained model instead (a run id under {root}/runs, a checkpoint URL,
or ``latest``): the whole network starts from that checkpoint and trains exactly ``mpemd_epochs``
epochs at stage 1's learning rate, the NIMA baseline with the same training budget as stage 2.

    mpemd train-nima --root ./data --preset cpu-smoke --set epochs=5
    mpemd train-nima --root ./data --preset cpu-smoke --init nima-20260101-120000-abc123  # equal budget
    prefect deployment run train-nima/smoke
"""

from __future__ import annotations

from flows.params import TrainNimaParams
from flows.training_runs import training_cli, training_flow

train_nima = training_flow("nima", TrainNimaParams,
                           "Train NIMA on {root}/manifests/train.parquet, validate on val.parquet, "
                           "write {root}/runs/<run_id>.")
cli_run = training_cli(train_nima)
