"""Training loops: presets, learning on a tiny learnable set, stage 2 from stage 1, exact resume after a kill."""

from __future__ import annotations

import json
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

from model.checkpoint import load_checkpoint, save_checkpoint
from model.losses import nima_loss
from model.metrics import distribution_metrics, normalize_counts
from model.networks import build_model
from model.preprocess import nima_predict_input
from tasks import storage
from tasks.datasets import ManifestDataset, input_config, make_loader, read_manifest
from tasks.images import decode_to_tensor
from tasks.presets import PRESETS, TrainConfig, resolve_config
from tasks.toy_data import write_toy_dataset
from tasks.training import evaluate, fit, latest_run, load_init_weights, run_paths

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
    assert paper.image_size is None and input_config(paper.backbone).resize_size == 342
    assert PRESETS["cpu-smoke"].weights == "none" and PRESETS["cpu"].backbone == "efficientnet_lite0"


def test_overrides_are_typed_and_checked() -> None:
    cfg = resolve_config("cpu-smoke", {"lr": "0.5", "epochs": "7", "compile": "true", "image_size": "none",
                                       "loss": "avg"})
    assert (cfg.lr, cfg.epochs, cfg.compile, cfg.image_size, cfg.loss) == (0.5, 7, True, None, "avg")
    with pytest.raises(ValueError, match="unknown config field"):
        resolve_config("paper", {"learning_rate": 1})
    with pytest.raises(ValueError, match="expected int"):
        resolve_config("paper", {"epochs": "2.5"})
    with pytest.raises(ValueError, match="loss must be"):
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
    assert result["best_epoch"] == int(val["emd2"].idxmin() // 2)
    best = load_checkpoint(storage.read_bytes(result["best_checkpoint"]))
    assert best["model_version"] == result["model_version"]
    assert best["metadata"]["stage"] == "nima" and best["metadata"]["input_size"] == 64
    for name in ("config.json", "curves.png", "checkpoint-last.pt"):
        assert (toy_root / "runs" / "nima-learn" / name).is_file()


def test_evaluate_matches_an_independent_nima_prediction(toy_root: Path) -> None:
    """Val metrics of the best checkpoint == warp-predict each image by hand + distribution_metrics."""
    cfg = resolve_config("cpu-smoke", {**TINY, "epochs": 1})
    result = fit(cfg, root=str(toy_root), method="nima", run_id="nima-eval", resume=False)
    checkpoint = load_checkpoint(storage.read_bytes(result["best_checkpoint"]))
    model = build_model("mobilenet_v3_small", "none")
    model.load_state_dict(checkpoint["model"])
    model.eval()
    records = read_manifest(str(toy_root / "manifests" / "val.parquet"))
    geometry = input_config("mobilenet_v3_small", 64)
    with torch.inference_mode():
        preds = [model(nima_predict_input(decode_to_tensor(storage.read_bytes(u)), geometry))[0].numpy()
                 for u in records.uri]
    expected = distribution_metrics(np.stack(preds), normalize_counts(records.counts))
    got = checkpoint["metadata"]["val_metrics"]
    # A 1-epoch model may predict a constant on some CPUs: its LCC/SRCC are undefined (NaN) on both sides.
    for key in ("emd2", "mse", "lcc", "srcc", "accuracy"):
        assert got[key] == pytest.approx(expected[key], rel=1e-4, abs=1e-6, nan_ok=True), key


def test_mpemd_learns_from_stage1_weights(toy_root: Path, fresh_stage1: str) -> None:
    cfg = resolve_config("cpu-smoke", {**TINY, "epochs": 8})
    result = fit(cfg, root=str(toy_root), method="mpemd", run_id="mpemd-learn", init=fresh_stage1, resume=False)
    train = _metrics(toy_root, "mpemd-learn").query("split == 'train'")
    assert train["loss"].tail(3).mean() < 0.6 * train["loss"].iloc[0]
    assert result["init"]["url"] == fresh_stage1


def test_stage2_really_starts_from_stage1(toy_root: Path) -> None:
    # stage 1 from another seed, so its weights differ from the init stage 2 would draw itself (seed 0)
    stage1 = fit(resolve_config("cpu-smoke", {**TINY, "epochs": 1, "seed": 7}), root=str(toy_root), method="nima",
                 run_id="nima-init", resume=False)
    # the run id resolves to that run's best checkpoint, and the weights land bit for bit
    stage1_ckpt = load_checkpoint(storage.read_bytes(stage1["best_checkpoint"]))
    model = build_model("mobilenet_v3_small", "none")
    info = load_init_weights(model, str(toy_root), "nima-init")
    assert info["model_version"] == stage1["model_version"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, stage1_ckpt["model"][key]), key

    cfg = resolve_config("cpu-smoke", {**TINY, "epochs": 1, "lr": 1e-3})
    stage2 = fit(cfg, root=str(toy_root), method="mpemd", run_id="mpemd-init", init="nima-init", resume=False)
    assert stage2["init"]["model_version"] == stage1["model_version"]
    tuned = load_checkpoint(storage.read_bytes(stage2["best_checkpoint"]))["model"]
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
    cfg = resolve_config("cpu-smoke", {**TINY, "backbone": "resnet18", "epochs": 1})
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
    overrides = {**TINY, "epochs": epochs}
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
    assert resumed["model_version"] == straight["model_version"]  # best weights bit for bit
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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", "-m", "tasks.training", "nima", "--root", str(root), "--preset", "cpu-smoke",
           "--run-id", "ddp", *[a for k, v in {**TINY, "epochs": 1}.items() for a in ("--set", f"{k}={v}")]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=150)
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
                              input_config("mobilenet_v3_small", 64), "nima", train=False)
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
    assert all(c["ok"] for c in result["checks"]) and len(result["checks"]) >= 8
    rates = [f["train_img_s_end_to_end"] for f in result["figures"] if "train_img_s_end_to_end" in f]
    assert len(rates) == 4 and all(r > 0 for r in rates)


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
    assert result["epochs_run"] == expected == len(val) == 2
    assert result["stopped_early"] and result["best_epoch"] == 0 and result["best_metric"] == "accuracy"


@pytest.mark.s3
def test_fit_reads_and_writes_an_s3_root(s3_bucket: str) -> None:
    root = f"{s3_bucket}/ava"
    write_toy_dataset(root, n_train=8, n_val=4, short_side=(72, 80))
    cfg = resolve_config("cpu-smoke", {**TINY, "epochs": 1})
    first = fit(cfg, root=root, method="nima", run_id="nima-s3")
    assert first["best_checkpoint"] == f"{root}/runs/nima-s3/checkpoint-best.pt"
    for name in ("checkpoint-last.pt", "config.json", "metrics.parquet", "curves.png"):
        assert storage.exists(f"{root}/runs/nima-s3/{name}"), name
    again = fit(cfg, root=root, method="nima", run_id="nima-s3")  # finds the last checkpoint: nothing to do
    assert again["model_version"] == first["model_version"] and again["epochs_run"] == 1
    assert latest_run(root, "nima") == "nima-s3"
    assert len(storage.read_parquet(f"{root}/runs/nima-s3/metrics.parquet")) == 2
