"""A training setting is declared once, as one line of ``TrainConfig``: a field added there reaches
``mpemd train-*``, the flow's Prefect form, ``python -m tasks.training`` and the run's ``config.json``
with no other edit. The field here is added in a fixture model (``ProbeConfig``), the rest is the
project's own code built over it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import Field

from benchmarks.toy_data import write_toy_dataset
from flows.cli import Command, build_parser
from flows.params import TrainNimaParams, demo_params
from model.checkpoint import load_checkpoint
from tasks.core import storage
from tasks.core.cli_args import model_values
from tasks.training.presets import STAGE2_LRS, TRAIN_CLI, TrainConfig, TrainEntryParams, resolve_config
from tasks.training.runs import run_paths


class ProbeConfig(TrainConfig):
    probe_knob: int = Field(7, ge=0)  # the one line a new setting takes


PROBE_NIMA = TrainNimaParams.for_config(ProbeConfig)
TINY = {"image_size": 64, "batch_size": 4, "n_patches": 2, "num_workers": 0, "epochs": 1}


def test_a_new_field_is_a_flag_of_the_training_command(capsys):
    parser = build_parser((Command("train-nima", PROBE_NIMA, "flows.train_nima", "stage 1", TRAIN_CLI),))
    with pytest.raises(SystemExit):
        parser.parse_args(["train-nima", "--help"])
    assert "--probe-knob PROBE_KNOB" in capsys.readouterr().out
    for argv, want in ((["--probe-knob", "9"], 9), (["--set", "probe_knob=11"], 11), ([], 7)):
        args = parser.parse_args(["train-nima", *argv])
        assert PROBE_NIMA(**model_values(args, PROBE_NIMA, TRAIN_CLI)).config().probe_knob == want


def test_a_new_field_is_in_the_flows_prefect_form():
    from prefect.exceptions import ParameterTypeError
    from prefect.utilities.callables import parameter_schema

    from flows.training_runs import training_flow

    flow = training_flow("nima", PROBE_NIMA, "stage 1")
    schema = parameter_schema(flow.fn).model_dump()
    ref = schema["properties"]["overrides"]["$ref"].rsplit("/", 1)[-1]
    assert schema["definitions"][ref]["properties"]["probe_knob"]["description"].startswith("ProbeConfig.probe_knob")
    values = flow.validate_parameters({"overrides": {"probe_knob": "3"}})  # as Prefect checks a run's parameters
    assert PROBE_NIMA(overrides=values["overrides"]).config().probe_knob == 3
    with pytest.raises(ParameterTypeError, match="probe_knob"):
        flow.validate_parameters({"overrides": {"probe_knob": "x"}})


@pytest.mark.slow  # one epoch of training on a toy dataset
def test_a_new_field_reaches_the_torchrun_entry_and_the_runs_config_json(tmp_path: Path):
    from tasks.training.entry import main

    root = tmp_path / "data"
    write_toy_dataset(root, n_train=8, n_val=4, short_side=(72, 100))
    argv = ["nima", "--root", str(root), "--preset", "cpu-smoke", "--run-id", "probe", "--probe-knob", "9",
            *[w for k, v in TINY.items() for w in ("--set", f"{k}={v}")]]
    assert main(argv, TrainEntryParams.for_config(ProbeConfig)) == 0
    paths = run_paths(str(root), "probe")
    assert json.loads(storage.read_bytes(paths.config))["probe_knob"] == 9
    command = load_checkpoint(storage.read_bytes(paths.last))["metadata"]["command"]
    assert command.startswith("python -m tasks.training nima --root") and "--set probe_knob=9" in command


@pytest.mark.parametrize("size", ["tiny", "small", "medium", "large"])
def test_every_swept_learning_rate_comes_from_one_table(size: str):
    """Each stage-2 arm's lr, as the cpu preset and every demo size train it, is the one entry of
    ``STAGE2_LRS`` named by the data it was swept on (a second copy of a figure could drift)."""
    arms = {"nima": "nima_continue_lr", "ada": "mpemd_lr", "avg": "mpemd_avg_lr"}
    cpu = resolve_config("cpu")
    assert {field: cpu.arm_lr(arm) for arm, field in arms.items()} == STAGE2_LRS["real_photos"]
    demo = demo_params(size)
    config = resolve_config(demo.preset, {**demo.overrides, **demo.mpemd_overrides})
    assert {field: config.arm_lr(arm) for arm, field in arms.items()} == STAGE2_LRS["synthetic"]
