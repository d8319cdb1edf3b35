"""A checkpoint tells scoring how it was trained: fit -> checkpoint -> ``mpemd score`` with no flags
predicts with the patch mode and |P| the trainer recorded (one serialise/parse pair, PatchSettings)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks.toy_data import write_toy_dataset
from model.checkpoint import load_checkpoint, save_checkpoint
from model.networks import build_model
from model.preprocess import PatchSettings
from tasks.core import storage
from tasks.scoring.predictions import read_predictions
from tasks.scoring.scorer import config_from_checkpoint
from tasks.training.loop import fit, run_paths
from tasks.training.presets import resolve_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_patch_settings_round_trip_and_reject_unknown_keys() -> None:
    settings = PatchSettings(n_patches=3, mode="grid", seed=11)
    assert PatchSettings.from_dict(settings.to_dict()) == settings
    assert PatchSettings.from_dict(None) == PatchSettings()
    with pytest.raises(ValueError, match="unknown"):
        PatchSettings.from_dict({"patches": 3})
    with pytest.raises(ValueError):
        PatchSettings.from_dict({"mode": "warp"})


def test_config_from_checkpoint_reads_what_the_trainer_writes_and_flags_override() -> None:
    info = {"metadata": {"stage": "mpemd", "patch_settings": PatchSettings(4, "grid", 7).to_dict()}}
    cfg = config_from_checkpoint(info)
    assert (cfg.method, cfg.patches) == ("mpemd", PatchSettings(4, "grid", 7))
    cfg = config_from_checkpoint(info, patch_mode="random", n_patches=2, patch_seed=0)
    assert cfg.patches == PatchSettings(2, "random", 0)
    assert config_from_checkpoint({"metadata": {"stage": "nima"}}).method == "nima"


@pytest.mark.slow
def test_fit_then_score_without_flags_uses_the_trained_grid_and_patch_count(tmp_path: Path,
                                                                           prefect_harness) -> None:
    from flows.cli import main

    write_toy_dataset(tmp_path, n_train=8, n_val=4, n_test=6, short_side=(72, 90))
    torch.manual_seed(0)
    stage1 = tmp_path / "stage1.pt"
    save_checkpoint(stage1, build_model("mobilenet_v3_small", "none"), metadata={"stage": "nima"})
    # Neither value is a default (random, 8), so only the checkpoint can supply them.
    cfg = resolve_config("cpu-smoke", {"image_size": 64, "batch_size": 4, "epochs": 1, "num_workers": 0,
                                       "n_patches": 3, "eval_patch_mode": "grid", "patch_seed": 5})
    fit(cfg, root=str(tmp_path), method="mpemd", run_id="mpemd-grid", init=str(stage1))
    best = run_paths(str(tmp_path), "mpemd-grid").best
    checkpoint = load_checkpoint(storage.read_bytes(best))
    assert PatchSettings.from_dict(checkpoint["metadata"]["patch_settings"]) == PatchSettings(3, "grid", 5)

    out = tmp_path / "predictions"
    rc = main(["score", str(tmp_path / "manifests" / "test.parquet"), "--checkpoint", best, "--out", str(out)])
    assert rc == 0
    rows = read_predictions(str(out), checkpoint["model_version"]).to_pandas()
    assert len(rows) == 6
    assert set(rows["model"]) == {"mpemd"}
    assert set(rows["patch_mode"]) == {"grid"}
    assert set(rows["n_patches"]) == {3}
