"""Flow ``train-mpemd``: stage 2, MPEMD fine-tuning from a stage-1 checkpoint.

``init`` is a run id under {root}/runs (its checkpoint-best.pt), a checkpoint URL, or ``latest``
(the newest nima run under {root}/runs, so that ``train-nima/smoke`` then ``train-mpemd/smoke``
chain without parameters).

    mpemd train-mpemd --root ./data --preset cpu-smoke --init nima-20260101-120000-abc123
    prefect deployment run train-mpemd/smoke
"""

from __future__ import annotations

from flows.params import TrainMpemdParams
from flows.training_runs import training_cli, training_flow

train_mpemd = training_flow("mpemd", TrainMpemdParams,
                            "Fine-tune MPEMD from stage-1 weights; validate with seeded patches; "
                            "write {root}/runs/<run_id>.")
cli_run = training_cli(train_mpemd)
