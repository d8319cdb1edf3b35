"""``python -m tasks.training`` (also under torchrun): a training run without Prefect.

Its command line is generated from ``TrainEntryParams`` by ``tasks.core.cli_args``, as ``mpemd
train-*``'s is from the flows' models: every ``TrainConfig`` field is a flag (``--epochs 5``) and a
``--set`` pair. No Prefect import.
"""

from __future__ import annotations

import argparse
import logging
import os

import torch.distributed as torch_dist

from tasks.core.cli_args import (
    HelpFormatter,
    ParameterError,
    Parser,
    add_model_arguments,
    command_line,
    model_from_args,
)
from tasks.training.loop import fit
from tasks.training.presets import TRAIN_CLI, TrainEntryParams
from tasks.training.runs import resolve_init_arg


def get_args_parser(model: type[TrainEntryParams] = TrainEntryParams) -> argparse.ArgumentParser:
    """``python -m tasks.training``'s flags, generated from ``model`` as ``mpemd train-*``'s are."""
    parser = Parser(prog="python -m tasks.training", description=model.__doc__, formatter_class=HelpFormatter)
    add_model_arguments(parser, model, TRAIN_CLI)
    return parser


def parse_args(argv: list[str] | None, model: type[TrainEntryParams] = TrainEntryParams) -> TrainEntryParams:
    """The run's settings from the command line; a bad value exits 2 with one line naming its flag."""
    parser = get_args_parser(model)
    args = parser.parse_args(argv)
    try:
        return model_from_args(args, model, TRAIN_CLI)
    except ParameterError as e:
        parser.error(str(e))


def main(argv: list[str] | None = None, model: type[TrainEntryParams] = TrainEntryParams) -> int:
    params = parse_args(argv, model)
    rank = int(os.environ.get("RANK", "0"))
    # under torchrun only rank 0 reports progress; the other ranks say something only when it matters
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s %(levelname)s %(name)s[rank {rank}]: %(message)s")
    command = command_line(["python", "-m", "tasks.training"], params, TRAIN_CLI)
    result = fit(params.config(), root=params.root, method=params.method, run_id=params.run_id,
                 init=resolve_init_arg(params.root, params.init), command=command, resume=params.resume)
    if rank == 0:
        print(f"run folder: {result.run_dir}")
        print(f"best checkpoint: {result.best_checkpoint} (model_version {result.model_version})")
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()
    return 0


