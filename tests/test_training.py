"""Training loops: presets, learning on a tiny learnable set, stage 2 from stage 1, exact resume after a kill."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from benchmarks.toy_data import write_toy_dataset
from model.checkpoint import load_checkpoint, save_checkpoint
from model.losses import nima_loss
from model.metrics import distribution_metrics, normalize_counts
from model.networks import backbone_config, build_model
from model.preprocess import nima_predict_input
from tasks.core import storage
from tasks.core.images import decode_to_tensor
from tasks.training.datasets import ManifestDataset, make_loader, read_manifest
from tasks.training.loop import EarlyStopping, FitResult, evaluate, fit
from tasks.training.presets import PRESETS, Schedule, TrainConfig, auto_workers, resolve_config
from tasks.training.runs import latest_run, load_init_weights, resolve_init_arg, run_paths
from tasks.training.setup import apply_trainable, make_optimizer, trunk_blocks

REPO = Path(__file__).resolve().parents[1]
TINY = {"image_size": 64, "batch_size": 4, "lr": 0.05, "n_patches": 2, "num_workers": 0}
TIMING = ["seconds", "samples_per_s"]


# One torch thread: bitwise-equal runs across processes, and a 2-core machine is not oversubscribed.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("toy")
    write_toy_dataset(root, n_train=24, n_val=8, short_side=(72, 100), corrupt_ids=(5,))
    return root


@pytest.fixture(scope="module")
def fresh_stage1(toy_root: Path) -> str:
    """An untrained stage-1 checkpoint, so stage 2 has something to learn."""
    torch.manual_seed(123)
    path = toy_root / "fresh-stage1.pt"
    save_checkpoint(path, build_model("mobilenet_v3_small", "none"), metadata={"stage": "nima"})
    return str(path)


def _metrics(root: Path, run_id: str) -> pd.DataFrame:
    return pd.read_parquet(run_paths(str(root), run_id).metrics)


# ---- presets ---------------------------------------------------------------------------------

def test_paper_preset_is_method_md() -> None:
    paper = PRESETS["paper"]
    assert (paper.backbone, paper.weights, paper.epochs) == ("inception_v3", "imagenet", 100)
    assert (paper.lr, paper.momentum, paper.lr_gamma, paper.lr_step_epochs) == (1e-3, 0.9, 0.95, 10)
    assert (paper.n_patches, paper.loss, paper.k, paper.gamma, paper.eps) == (8, "ada", 1.2, 0.4, 1e-6)
    assert paper.image_size is None and backbone_config(paper.backbone).resize_size == 342
    assert PRESETS["cpu-smoke"].weights == "none" and PRESETS["cpu"].backbone == "efficientnet_lite0"
    cpu = PRESETS["cpu"]  # fine-tunes the trunk's last blocks, slower than the head
    assert not cpu.freeze_backbone and cpu.train_blocks > 0 and 0 < cpu.trunk_lr_scale < 1


def test_cpu_preset_picks_its_loader_workers_from_the_core_count() -> None:
    assert resolve_config("cpu").num_workers == -1  # auto
    assert [auto_workers(n) for n in (1, 2, 4, 64)] == [0, 1, 1, 1]
    with pytest.raises(ValueError, match="num_workers"):
        resolve_config("cpu", {"num_workers": -2})


def test_overrides_are_typed_and_checked() -> None:
    cfg = resolve_config("cpu-smoke", {"lr": "0.5", "epochs": "7", "compile": "true", "image_size": "none",
                                       "loss": "avg"})
    assert (cfg.lr, cfg.epochs, cfg.compile, cfg.image_size, cfg.loss) == (0.5, 7, True, None, "avg")
    with pytest.raises(ValueError, match="learning_rate=1: Extra inputs are not permitted"):
        resolve_config("paper", {"learning_rate": 1})
    with pytest.raises(ValueError, match=r"epochs='2\.5': Input should be a valid integer"):
        resolve_config("paper", {"epochs": "2.5"})
    with pytest.raises(ValueError, match="loss='sum': Input should be 'ada' or 'avg'"):
        resolve_config("paper", {"loss": "sum"})
    assert TrainConfig(best_metric="lcc").best_mode == "max"


# ---- learning ---------------------------------------------------------------------------------

def test_nima_learns_and_counts_corrupt_images(toy_root: Path) -> None:
    cfg = resolve_config("cpu-smoke", {**TINY, "epochs": 8})
    result = fit(cfg, root=str(toy_root), method="nima", run_id="nima-learn", resume=False)
    frame = _metrics(toy_root, "nima-learn")
    train = frame[frame["split"] == "train"]
    val = frame[frame["split"] == "val"]
    assert len(train) == len(val) == 8
    assert train["loss"].tail(3).mean() < 0.8 * train["loss"].iloc[0]
    assert val["lcc"].iloc[-1] > 0.5  # the brightness rule is really learnt, not only the training set
    # the truncated JPEG is skipped and counted every epoch: count in == count out
    assert (train["skipped"] == 1).all() and (train["n"] + train["skipped"] == 24).all()
    assert (val["n"] == 8).all()
    # the stored best is the epoch with the lowest val emd2, and the result says so
    assert result.best_epoch == int(val["emd2"].idxmin() // 2)
    best = load_checkpoint(storage.read_bytes(result.best_checkpoint))
    assert best["model_version"] == result.model_version
    assert best["metadata"]["stage"] == "nima" and best["metadata"]["input_size"] == 64
    for name in ("config.json", "curves.png", "checkpoint-last.pt"):
        assert (toy_root / "runs" / "nima-learn" / name).is_file()


def test_evaluate_matches_an_independent_nima_prediction(toy_root: Path) -> None:
    """Val metrics of the best checkpoint == warp-predict each image by hand + distribution_metrics."""
    cfg = resolve_config("cpu-smoke", {**TINY, "epochs": 1})
    result = fit(cfg, root=str(toy_root), method="nima", run_id="nima-eval", resume=False)
    checkpoint = load_checkpoint(storage.read_bytes(result.best_checkpoint))
    model = build_model("mobilenet_v3_small", "none")
    model.load_state_dict(checkpoint["model"])
    model.eval()
    records = read_manifest(str(toy_root / "manifests" / "val.parquet"))
    geometry = backbone_config("mobilenet_v3_small", 64)
    with torch.inference_mode():
        preds = [model(nima_predict_input(decode_to_tensor(storage.read_bytes(u)), geometry))[0].numpy()
                 for u in records.uri]
    expected = distribution_metrics(np.stack(preds), normalize_counts(records.counts))
    got = checkpoint["metadata"]["val_metrics"]
    # A 1-epoch model may predict a constant on some CPUs: its LCC/SRCC are undefined (NaN) on both sides.
    for key in ("emd2", "mse", "lcc", "srcc", "accuracy"):
        assert got[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6, nan_ok=True), key


def test_mpemd_learns_from_stage1_weights(toy_root: Path, fresh_stage1: str) -> None:
    cfg = resolve_config("cpu-smoke", {**TINY, "mpemd_epochs": 8})
    result = fit(cfg, root=str(toy_root), method="mpemd", run_id="mpemd-learn", init=fresh_stage1, resume=False)
    train = _metrics(toy_root, "mpemd-learn").query("split == 'train'")
    assert train["loss"].tail(3).mean() < 0.6 * train["loss"].iloc[0]
    assert result.init["url"] == fresh_stage1


def test_stage2_really_starts_from_stage1(toy_root: Path) -> None:
    # stage 1 from another seed, so its weights differ from the init stage 2 would draw itself (seed 0)
    stage1 = fit(resolve_config("cpu-smoke", {**TINY, "epochs": 1, "seed": 7}), root=str(toy_root), method="nima",
                 run_id="nima-init", resume=False)
    # the run id resolves to that run's best checkpoint, and the weights land bit for bit
    stage1_ckpt = load_checkpoint(storage.read_bytes(stage1.best_checkpoint))
    model = build_model("mobilenet_v3_small", "none")
    info = load_init_weights(model, str(toy_root), "nima-init")
    assert info["model_version"] == stage1.model_version
    for key, value in model.state_dict().items():
        assert torch.equal(value, stage1_ckpt["model"][key]), key

    cfg = resolve_config("cpu-smoke", {**TINY, "mpemd_epochs": 1, "mpemd_lr": 1e-3})
    stage2 = fit(cfg, root=str(toy_root), method="mpemd", run_id="mpemd-init", init="nima-init", resume=False)
    assert stage2.init["model_version"] == stage1.model_version
    tuned = load_checkpoint(storage.read_bytes(stage2.best_checkpoint))["model"]
    torch.manual_seed(0)  # the weights stage 2 would have had without init (fit seeds the same way)
    scratch = build_model("mobilenet_v3_small", "none").state_dict()

    weights = [name for name, _ in model.named_parameters()]  # not BN statistics, which train mode moves

    def distance(a: dict, b: dict) -> float:
        return sum(float((a[k] - b[k]).pow(2).sum()) for k in weights)

    assert distance(tuned, stage1_ckpt["model"]) < 0.01 * distance(scratch, stage1_ckpt["model"])


def test_latest_run_picks_the_newest_stage1_best(tmp_path: Path) -> None:
    model = build_model("mobilenet_v3_small", "none")
    for i, run_id in enumerate(["nima-b", "nima-a", "mpemd-c"]):
        path = tmp_path / "runs" / run_id / "checkpoint-best.pt"
        path.parent.mkdir(parents=True)
        save_checkpoint(path, model)
        os.utime(path, (1_000_000 + i, 1_000_000 + i))
    (tmp_path / "runs" / "nima-z").mkdir()  # no checkpoint: not a candidate
    assert latest_run(str(tmp_path), "nima") == "nima-a"
    assert latest_run(str(tmp_path), "mpemd") == "mpemd-c"


def test_stage2_refuses_a_mismatched_backbone(toy_root: Path, fresh_stage1: str) -> None:
    cfg = resolve_config("cpu-smoke", {**TINY, "backbone": "resnet18", "mpemd_epochs": 1})
    with pytest.raises(Exception, match="backbone"):
        fit(cfg, root=str(toy_root), method="mpemd", run_id="mpemd-bad", init=fresh_stage1, resume=False)


# ---- exact resume after a kill ------------------------------------------------------------------

def _kill_after_first_checkpoint(root: Path, method: str, run_id: str, overrides: dict, init: str | None) -> int:
    """Run ``python -m tasks.training`` and SIGKILL it as soon as checkpoint-last.pt exists."""
    cmd = [sys.executable, "-m", "tasks.training", method, "--root", str(root), "--preset", "cpu-smoke",
           "--run-id", run_id, *[a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]]
    if init:
        cmd += ["--init", init]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    last = Path(run_paths(str(root), run_id).last)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not last.exists():
            if proc.poll() is not None:
                raise AssertionError(f"training exited early: {proc.stderr.read().decode()[-3000:]}")
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stderr.close()
    return int(load_checkpoint(last.read_bytes())["epoch"])


@pytest.mark.slow
@pytest.mark.parametrize("method", ["nima", "mpemd"])
def test_resume_after_kill_equals_uninterrupted(toy_root: Path, fresh_stage1: str, method: str) -> None:
    epochs = 3
    overrides = {**TINY, "epochs": epochs, "mpemd_epochs": epochs}
    init = fresh_stage1 if method == "mpemd" else None
    cfg = resolve_config("cpu-smoke", overrides)

    straight = fit(cfg, root=str(toy_root), method=method, run_id=f"{method}-straight", init=init, resume=False)
    killed_at = _kill_after_first_checkpoint(toy_root, method, f"{method}-resumed", overrides, init)
    assert killed_at < epochs - 1, "the kill came after the run had finished"
    resumed = fit(cfg, root=str(toy_root), method=method, run_id=f"{method}-resumed", init=init)

    a = _metrics(toy_root, f"{method}-straight").drop(columns=TIMING)
    b = _metrics(toy_root, f"{method}-resumed").drop(columns=TIMING)
    assert len(a) == len(b) == 2 * epochs
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert resumed.model_version == straight.model_version  # best weights bit for bit
    last_a = load_checkpoint(storage.read_bytes(run_paths(str(toy_root), f"{method}-straight").last))
    last_b = load_checkpoint(storage.read_bytes(run_paths(str(toy_root), f"{method}-resumed").last))
    assert last_a["model_version"] == last_b["model_version"]
    assert torch.equal(last_a["rng"]["torch"], last_b["rng"]["torch"])
    assert "tasks.training" in last_b["metadata"]["command"]


@pytest.mark.slow
def test_torchrun_ddp_matches_single_process_evaluation(tmp_path: Path) -> None:
    """Two gloo ranks under torchrun: sharded training runs, and the gathered (de-duplicated)
    val metrics equal a single-process evaluation of the saved checkpoint."""
    root = tmp_path / "data"
    write_toy_dataset(root, n_train=16, n_val=7, short_side=(72, 100), corrupt_ids=(3,))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for _ in range(3):  # a port taken between picking it and torchrun binding it: pick another
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={port}", "-m", "tasks.training", "nima", "--root", str(root), "--preset",
               "cpu-smoke", "--run-id", "ddp", *[a for k, v in {**TINY, "epochs": 1}.items() for a in ("--set", f"{k}={v}")]]
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=150)
        if done.returncode == 0 or "address already in use" not in done.stderr.lower():
            break
    assert done.returncode == 0, done.stderr[-3000:]
    frame = _metrics(root, "ddp")
    val = frame[frame["split"] == "val"].iloc[0]
    train = frame[frame["split"] == "train"].iloc[0]
    assert val["n"] == 7  # 7 images over 2 ranks: the padded repeat is counted once
    assert train["n"] + train["skipped"] == 16
    checkpoint = load_checkpoint(storage.read_bytes(run_paths(str(root), "ddp").best))
    assert checkpoint["metadata"]["world_size"] == 2
    model = build_model("mobilenet_v3_small", "none")
    model.load_state_dict(checkpoint["model"])
    dataset = ManifestDataset(read_manifest(str(root / "manifests" / "val.parquet")),
                              backbone_config("mobilenet_v3_small", 64), "nima", train=False)
    loader = make_loader(dataset, batch_size=4, shuffle=False, seed=0, num_workers=0, pin_memory=False)
    single = evaluate(model, nima_loss, loader, torch.device("cpu"))
    for key in ("loss", "emd2", "mse", "lcc", "srcc"):
        assert val[key] == pytest.approx(single[key], rel=1e-4, abs=1e-6, nan_ok=True), key


@pytest.mark.slow
def test_gpu_check_quick_runs_without_prefect_duckdb_s3fs(tmp_path: Path) -> None:
    """The GPU script's import closure works on a host with none of prefect/duckdb/s3fs (nor matplotlib, tqdm)."""
    code = ("import sys, runpy\n"
            "for m in ('prefect', 'duckdb', 's3fs', 'matplotlib', 'tqdm'):\n"
            "    sys.modules[m] = None\n"
            f"sys.argv = ['gpu_check.py', '--quick', '--out', {str(tmp_path / 'out.json')!r}]\n"
            "runpy.run_path('benchmarks/gpu_check.py', run_name='__main__')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=170,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "out.json").read_text())
    assert result["failed"] == [] and len(result["rows"]) >= 8  # every step ran: no FAIL row
    assert [r["value"] for r in result["rows"] if r["section"] == "imports"] == ["no"]
    rates = [float(r["value"]) for r in result["rows"] if r["section"] == "training"]
    assert len(rates) == 4 and all(r > 0 for r in rates)  # nima and mpemd, in memory and through the loader


@pytest.mark.slow
def test_cli_train_nima_flow_prints_run_folder_and_publishes_summary(prefect_harness, toy_root: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    from prefect.client.orchestration import get_client

    from flows.cli import main

    rc = main(["train-nima", "--root", str(toy_root), "--preset", "cpu-smoke", "--run-id", "nima-cli",
               *[a for k, v in {**TINY, "epochs": 1}.items() for a in ("--set", f"{k}={v}")]])
    assert rc == 0
    out = capsys.readouterr().out
    assert f"run folder: {run_paths(str(toy_root), 'nima-cli').run_dir}" in out
    best = load_checkpoint(storage.read_bytes(run_paths(str(toy_root), "nima-cli").best))
    assert best["metadata"]["command"].startswith("mpemd train-nima --root")
    assert "--set epochs=1" in best["metadata"]["command"]
    with get_client(sync_client=True) as client:
        artifacts = client.read_latest_artifacts()
    summary = [a for a in artifacts if a.key == "nima-training-summary"]
    assert summary and "nima-cli" in summary[0].data and "| final_val |" in summary[0].data


def test_early_stopping_follows_the_best_metric(toy_root: Path) -> None:
    # lr 0: the predictions barely move, so val accuracy (steps of 1/8) stops improving at once
    cfg = resolve_config("cpu-smoke", {**TINY, "epochs": 4, "lr": 0.0, "best_metric": "accuracy",
                                       "early_stopping_patience": 1})
    result = fit(cfg, root=str(toy_root), method="nima", run_id="nima-early", resume=False)
    val = _metrics(toy_root, "nima-early").query("split == 'val'")["accuracy"].tolist()
    best, expected = -1.0, len(val)
    for i, value in enumerate(val):  # an independent replay of the rule: stop at the first non-improvement
        if value > best:
            best = value
        else:
            expected = i + 1
            break
    assert result.epochs_run == expected == len(val) == 2
    assert result.stopped_early and result.best_epoch == 0 and result.best_metric == "accuracy"


@pytest.mark.s3
def test_fit_reads_and_writes_an_s3_root(s3_bucket: str) -> None:
    root = f"{s3_bucket}/ava"
    write_toy_dataset(root, n_train=8, n_val=4, short_side=(72, 80))
    cfg = resolve_config("cpu-smoke", {**TINY, "epochs": 1})
    first = fit(cfg, root=root, method="nima", run_id="nima-s3")
    assert first.best_checkpoint == f"{root}/runs/nima-s3/checkpoint-best.pt"
    for name in ("checkpoint-last.pt", "config.json", "metrics.parquet", "curves.png"):
        assert storage.exists(f"{root}/runs/nima-s3/{name}"), name
    again = fit(cfg, root=root, method="nima", run_id="nima-s3")  # finds the last checkpoint: nothing to do
    assert again.model_version == first.model_version and again.epochs_run == 1
    assert latest_run(root, "nima") == "nima-s3"
    assert len(storage.read_parquet(f"{root}/runs/nima-s3/metrics.parquet")) == 2


# ---- the result, early stopping, continuation, trunk fine-tuning, stage 2's schedule ----------------

def test_early_stopping_object_follows_mode_patience_and_nan() -> None:
    stop = EarlyStopping("min", patience=2)
    assert stop.update(0.5, 0) and not stop.update(float("nan"), 1) and not stop.should_stop
    assert not stop.update(0.5, 2) and stop.should_stop  # equal is no improvement
    assert (stop.value, stop.epoch, stop.stale_epochs) == (0.5, 0, 2)
    again = EarlyStopping("min", patience=2)
    again.load_state_dict(stop.state_dict())
    assert again == stop
    higher = EarlyStopping("max", patience=0)
    assert higher.update(0.1, 0) and higher.update(0.2, 1) and not higher.update(0.2, 2)
    assert higher.epoch == 1 and not higher.should_stop  # patience 0 never stops


def test_fit_result_describes_the_run_folder(toy_root: Path) -> None:
    cfg = resolve_config("cpu-smoke", {**TINY, "epochs": 2})
    result = fit(cfg, root=str(toy_root), method="nima", run_id="nima-result", resume=False)
    assert isinstance(result, FitResult)
    paths = run_paths(str(toy_root), "nima-result")
    assert (result.run_dir, result.best_checkpoint, result.last_checkpoint) == (paths.run_dir, paths.best, paths.last)
    best = load_checkpoint(storage.read_bytes(result.best_checkpoint))
    assert best["model_version"] == result.model_version and best["metadata"]["epoch"] == result.best_epoch
    val = _metrics(toy_root, "nima-result").query("split == 'val'")
    assert result.final_val["emd2"] == pytest.approx(val["emd2"].iloc[-1])
    assert result.best_val["epoch"] == result.best_epoch and result.best_value == pytest.approx(
        val["emd2"].min())
    assert (result.epochs_run, result.stopped_early, result.init, result.method) == (2, False, None, "nima")
    assert result.to_dict()["config"] == cfg.to_dict()


def test_nima_continues_a_run_for_exactly_the_stage2_epochs(toy_root: Path) -> None:
    stage1 = fit(resolve_config("cpu-smoke", {**TINY, "epochs": 1, "seed": 3}), root=str(toy_root), method="nima",
                 run_id="nima-base", resume=False)
    start = load_checkpoint(storage.read_bytes(stage1.best_checkpoint))["model"]
    # lr 0: the weights must stay those of the given checkpoint (not ImageNet's, not a fresh draw)
    cfg = resolve_config("cpu-smoke", {**TINY, "epochs": 5, "mpemd_epochs": 2, "lr": 0.0})
    cont = fit(cfg, root=str(toy_root), method="nima", run_id="nima-cont", init="nima-base", resume=False)
    assert cont.epochs_run == 2 and len(_metrics(toy_root, "nima-cont")) == 4
    assert cont.init["model_version"] == stage1.model_version and cont.init["url"] == stage1.best_checkpoint
    tuned = load_checkpoint(storage.read_bytes(cont.last_checkpoint))
    for name, _ in build_model("mobilenet_v3_small", "none").named_parameters():
        assert torch.equal(tuned["model"][name], start[name]), name
    assert tuned["metadata"]["stage"] == "nima" and tuned["metadata"]["init_arg"] == "nima-base"
    assert resolve_init_arg(str(toy_root), "latest", "nima") in ("nima-base", "nima-cont")


def test_stage2_trains_its_own_schedule() -> None:
    paper = PRESETS["paper"]
    assert paper.schedule("nima") == Schedule(100, 1e-3, 10, 0.95)
    assert paper.schedule("mpemd") == Schedule(paper.mpemd_epochs, paper.mpemd_lr, paper.mpemd_lr_step_epochs,
                                                paper.mpemd_lr_gamma)
    assert paper.schedule("nima", continued=True).epochs == paper.mpemd_epochs  # the equal budget
    assert paper.schedule("nima", continued=True).lr == paper.lr
    assert (paper.mpemd_epochs, paper.mpemd_lr, paper.mpemd_lr_step_epochs, paper.mpemd_lr_gamma) == (10, 1e-3, 10, 0.95)
    assert paper.mpemd_epochs < paper.epochs  # not stage 1's 100 epochs again
    each = paper.model_copy(update=dict(mpemd_lr=0.3, mpemd_avg_lr=0.03))  # each loss at its own lr
    assert each.schedule("mpemd").lr == 0.3 and each.model_copy(update=dict(loss="avg")).schedule("mpemd").lr == 0.03
    assert paper.model_copy(update=dict(loss="avg")).schedule("mpemd").lr == paper.mpemd_lr  # none: mpemd_lr


def test_nima_continued_trains_at_its_own_lr() -> None:
    """The equal-budget baseline gets its own field, so it can be tuned like the MPEMD losses."""
    paper = PRESETS["paper"]
    assert paper.nima_continue_lr is None and paper.arm_lr("nima") == paper.lr  # none: stage 1's lr
    own = resolve_config("paper", {"nima_continue_lr": "0.05"})
    assert own.schedule("nima", continued=True) == Schedule(own.mpemd_epochs, 0.05, own.lr_step_epochs, own.lr_gamma)
    assert own.schedule("nima").lr == own.lr  # stage 1 untouched
    each = own.model_copy(update={"mpemd_lr": 0.3, "mpemd_avg_lr": 0.03})
    assert (each.arm_lr("nima"), each.arm_lr("ada"), each.arm_lr("avg")) == (0.05, 0.3, 0.03)
    with pytest.raises(ValueError, match="head_dropout"):
        resolve_config("paper", {"head_dropout": "1.0"})


def test_stage2_run_uses_mpemd_epochs_and_lr(toy_root: Path, fresh_stage1: str) -> None:
    cfg = resolve_config("cpu-smoke", {**TINY, "epochs": 4, "mpemd_epochs": 1, "mpemd_lr": 0.003})
    result = fit(cfg, root=str(toy_root), method="mpemd", run_id="mpemd-schedule", init=fresh_stage1, resume=False)
    frame = _metrics(toy_root, "mpemd-schedule")
    assert result.epochs_run == 1 and len(frame) == 2 and (frame["lr"] == 0.003).all()


def test_trunk_blocks_split_the_backbone_in_forward_order() -> None:
    small = build_model("mobilenet_v3_small", "none")
    blocks = trunk_blocks(small)
    assert len(blocks) == 13 and blocks[-1][0] is small.features.features[-1]
    lite = build_model("efficientnet_lite0", "none")
    names = {id(m): n for n, m in lite.features.named_modules()}
    lite_blocks = [[names[id(m)] for m in block] for block in trunk_blocks(lite)]
    assert lite_blocks[0] == ["net._conv_stem", "net._bn0"] and lite_blocks[-1] == ["net._conv_head", "net._bn1"]
    assert len(lite_blocks) == 18  # stem, 16 MBConv blocks, head conv; the unused ImageNet _fc is not a block


def test_trunk_learning_rate_and_frozen_blocks() -> None:
    torch.manual_seed(0)
    cfg = resolve_config("cpu-smoke", {"train_blocks": 2, "trunk_lr_scale": 0.1, "lr": 0.05, "lr_step_epochs": 1,
                                       "lr_gamma": 0.5})
    net = build_model("mobilenet_v3_small", "none", input_size=64)
    apply_trainable(net, cfg)
    optimizer, scheduler = make_optimizer(net, cfg, cfg.schedule("nima"))
    trunk_group, head_group = optimizer.param_groups
    assert trunk_group["lr"] == pytest.approx(0.005) and head_group["lr"] == pytest.approx(0.05)
    last_two = {id(p) for block in trunk_blocks(net)[-2:] for m in block for p in m.parameters()}
    assert {id(p) for p in trunk_group["params"]} == last_two
    assert {id(p) for p in head_group["params"]} == {id(p) for p in net.head.parameters()}
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.train()
    images, target = torch.rand(4, 3, 64, 64), torch.softmax(torch.rand(4, 10), dim=1)
    nima_loss(net(images), target).backward()
    optimizer.step()
    scheduler.step()
    after = net.state_dict()
    frozen = [k for k in after if k.startswith("features.") and not _in_blocks(net, k, 2)]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)  # weights and BN statistics
    assert any(not torch.equal(before[k], after[k]) for k in after if _in_blocks(net, k, 2))
    assert trunk_group["lr"] / head_group["lr"] == pytest.approx(0.1)  # the decay keeps the ratio
    whole = resolve_config("cpu-smoke", {"trunk_lr_scale": 0.1})
    full = build_model("mobilenet_v3_small", "none")
    apply_trainable(full, whole)
    assert all(p.requires_grad for p in full.parameters())
    assert len(make_optimizer(full, whole, whole.schedule("nima"))[0].param_groups) == 2


def _in_blocks(net: torch.nn.Module, key: str, last: int) -> bool:
    """Is state-dict entry ``key`` inside the trunk's last ``last`` blocks?"""
    names = {id(m): f"features.{n}" for n, m in net.features.named_modules()}
    prefixes = [names[id(m)] + "." for block in trunk_blocks(net)[-last:] for m in block]
    return any(key.startswith(p) for p in prefixes)


class _Records(logging.Handler):
    """The records of one logger, whatever Prefect's logging set-up does to the root's handlers."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.mark.slow
def test_a_smoke_run_on_an_empty_root_makes_its_data_and_stage1_and_says_so(prefect_harness, tmp_path: Path) -> None:
    """``synth_if_missing`` (the smoke deployments'): train-mpemd on a root with nothing in it."""
    from flows.cli import main

    root = tmp_path / "fresh" / "data"
    seen = _Records()
    logging.getLogger("mpemd").addHandler(seen)
    try:
        rc = main(["train-mpemd", "--root", str(root), "--preset", "cpu-smoke", "--synth-if-missing", "40",
                   *[a for k, v in {**TINY, "epochs": 1, "mpemd_epochs": 1}.items() for a in ("--set", f"{k}={v}")]])
    finally:
        logging.getLogger("mpemd").removeHandler(seen)
    assert rc == 0
    assert (root / "manifests" / "train.parquet").is_file() and (root / "synth" / "AVA.txt").is_file()
    (stage1,) = (root / "runs").glob("nima-*/checkpoint-best.pt")
    (stage2,) = (root / "runs").glob("mpemd-*/checkpoint-best.pt")
    best = load_checkpoint(stage2.read_bytes())
    assert best["metadata"]["init"]["url"] == str(stage1) and "--synth-if-missing 40" in best["metadata"]["command"]
    warned = [r.getMessage() for r in seen.records if r.levelno == logging.WARNING]
    assert any(m.startswith(f"no ingested dataset under {root}: synthesizing 40 images") for m in warned), warned
    assert any(m.startswith(f"no nima run under {root}") for m in warned), warned
    # Without it an empty root is refused in one line saying what to run, before any work.
    assert main(["train-nima", "--root", str(tmp_path / "other"), "--preset", "cpu-smoke"]) == 2
    assert not (tmp_path / "other").exists()
