"""Flow ``train-nima``: stage 1, NIMA pre-training (also the baseline), METHOD.md's settings by preset.

    mpemd train-nima --root ./data --preset cpu-smoke --set epochs=5
    prefect deployment run train-nima/smoke
"""

from __future__ import annotations

import argparse
from typing import Any

from prefect import flow

from flows.training_runs import (
    TrainParams,
    add_training_arguments,
    params_from_args,
    print_result,
    run_training,
)


class TrainNimaParams(TrainParams):
    """Stage 1 has no extra parameters: backbone and weights come from the preset / overrides."""


@flow(name="train-nima", log_prints=True)
def train_nima(params: TrainNimaParams) -> dict[str, Any]:
    """Train NIMA on {root}/manifests/train.parquet, validate on val.parquet, write {root}/runs/<run_id>."""
    return run_training("nima", params)


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train-nima", help="stage 1: train NIMA (writes {root}/runs/<run_id>)")
    add_training_arguments(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    result = train_nima(TrainNimaParams(**params_from_args(args)))
    print_result(result)
    return 0
