"""Stage 1 (NIMA) and stage 2 (MPEMD) training: ``train_one_epoch``, ``evaluate`` and a plain epoch loop.

In the manner of torchvision's classification reference: no trainer framework, one checkpoint dict
that holds everything resume needs (model, optimizer, scheduler, scaler, epoch, RNG states, data
order, history), written after every epoch as ``checkpoint-last.pt``; the best by a validation
metric is also kept as ``checkpoint-best.pt``. Outputs go to ``{root}/runs/<run_id>/``.

Devices: CUDA when present (AMP bf16/fp16 with a GradScaler for fp16, channels_last, cudnn
benchmark, optional ``torch.compile``), else CPU. Launched by ``torchrun`` the same entry point
runs DistributedDataParallel with one shard of the data per rank (see infra/torchrun.md)::

    python -m tasks.training nima --root ./data --preset cpu-smoke
    torchrun --nproc_per_node=8 -m tasks.training nima --root s3://bucket/ava --preset paper

No Prefect import: the flows in ``flows/train_*.py`` call ``fit`` and publish its summary.
"""

from __future__ import annotations

import argparse
import io
import logging
import math
import os
import random
import shlex
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
import torch.distributed as torch_dist
from torch import Tensor, nn

from model.checkpoint import CheckpointError, checkpoint_bytes, load_checkpoint
from model.losses import mpemd_loss, nima_loss
from model.metrics import distribution_metrics
from model.networks import AestheticNet, build_model
from model.preprocess import PatchSettings
from tasks import storage
from tasks.datasets import ManifestDataset, input_config, make_loader, read_manifest
from tasks.presets import TrainConfig, config_from_dict, parse_overrides, resolve_config
from tasks.progress import Progress

if TYPE_CHECKING:
    from matplotlib.figure import Figure

logger = logging.getLogger("mpemd")

METRIC_COLUMNS = ("n", "mse", "mae", "rmse", "lcc", "srcc", "accuracy", "emd2", "emd1", "std_lcc")


# ---- environment: ranks, devices, precision ----------------------------------------------------

@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_kind: str) -> DistInfo:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1); else a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return info


def resolve_device(setting: str, dist: DistInfo) -> torch.device:
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(setting)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda was asked for but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    return device


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The AMP dtype: ``auto`` is bf16 on CUDA where supported, else fp16; no AMP on CPU."""
    if setting == "none" or (setting == "auto" and device.type != "cuda"):
        return None
    if setting == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if setting == "bf16" else torch.float16


# ---- the model's view of a batch ---------------------------------------------------------------

def batch_probs(model: nn.Module, images: Tensor, channels_last: bool) -> Tensor:
    """(B,3,s,s) -> (B,10) or (B,P,3,s,s) -> (B,P,10) probabilities (float32)."""
    lead = images.shape[:-3]
    flat = images.reshape(-1, *images.shape[-3:])
    if channels_last:
        flat = flat.contiguous(memory_format=torch.channels_last)
    return model(flat).float().reshape(*lead, -1)


def make_loss_fn(cfg: TrainConfig, method: str) -> Callable[[Tensor, Tensor], Tensor]:
    if method == "nima":
        return nima_loss
    return lambda probs, target: mpemd_loss(probs, target, k=cfg.k, gamma=cfg.gamma, eps=cfg.eps,
                                            adaptive=cfg.loss == "ada", detach_weight=cfg.detach_weight)


def image_dist(probs: Tensor) -> Tensor:
    """Per-image distribution: the view itself (NIMA) or the mean over patches (MPEMD)."""
    return probs.mean(dim=1) if probs.dim() == 3 else probs


def _gather(arrays: list[np.ndarray], dist: DistInfo) -> list[np.ndarray]:
    """Concatenate per-rank arrays on every rank (object all_gather; eval-sized data only)."""
    if not dist.enabled:
        return arrays
    gathered: list[Any] = [None] * dist.world_size
    torch_dist.all_gather_object(gathered, arrays)
    return [np.concatenate([g[i] for g in gathered]) for i in range(len(arrays))]


def _reduce_sum(values: list[float], dist: DistInfo, device: torch.device) -> list[float]:
    if not dist.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch_dist.all_reduce(t)
    return t.tolist()


def _log_skipped(batch_skipped: list, split: str, epoch: int) -> None:
    for s in batch_skipped:
        logger.warning("%s epoch %d: skipped image %d (%s)", split, epoch, s.image_id, s.reason)


# ---- one epoch of training, one pass of evaluation ---------------------------------------------

def train_one_epoch(model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], optimizer: torch.optim.Optimizer,
                    loader: torch.utils.data.DataLoader, device: torch.device, epoch: int, *,
                    scaler: torch.amp.GradScaler, amp_dtype: torch.dtype | None = None,
                    channels_last: bool = False, dist: DistInfo = DistInfo(), desc: str = "train") -> dict[str, float]:
    """One pass over ``loader``; returns loss, METHOD.md metrics of the training predictions, rates."""
    model.train()
    loader.sampler.set_epoch(epoch)  # type: ignore[union-attr]
    loss_sum, n_seen, n_skipped = 0.0, 0, 0
    preds, targets = [], []
    start = time.perf_counter()
    total = len(loader) * loader.batch_size if loader.drop_last else len(loader.sampler)  # type: ignore[arg-type]
    with Progress(total, desc, disable=None if dist.is_main else True) as progress:
        for batch in loader:
            n_skipped += len(batch.skipped)
            _log_skipped(batch.skipped, "train", epoch)
            if len(batch) == 0:
                progress.update(len(batch.skipped))
                continue
            images = batch.images.to(device, non_blocking=True)
            target = batch.targets.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                probs = batch_probs(model, images, channels_last)
            loss = loss_fn(probs.float(), target)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch}; lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            b = len(batch)
            loss_sum += float(loss.detach()) * b
            n_seen += b
            preds.append(image_dist(probs.detach()).cpu().numpy())
            targets.append(batch.targets.numpy())
            progress.update(b + len(batch.skipped), loss=loss_sum / n_seen)
    seconds = time.perf_counter() - start
    loss_sum, n_seen, n_skipped = _reduce_sum([loss_sum, n_seen, n_skipped], dist, device)
    pred_all, target_all = _gather([_cat(preds), _cat(targets)], dist)
    return {
        "loss": loss_sum / n_seen if n_seen else math.nan,
        **distribution_metrics(pred_all, target_all),
        "n": int(n_seen),
        "skipped": int(n_skipped),
        "seconds": seconds,
        "samples_per_s": n_seen / seconds if seconds > 0 else math.nan,
    }


def _cat(parts: list[np.ndarray], width: int = 10) -> np.ndarray:
    """Concatenate batches; an empty list gives (0, width), or (0,) with width 0."""
    return np.concatenate(parts) if parts else np.zeros((0, width) if width else 0)


@torch.inference_mode()
def evaluate(model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], loader: torch.utils.data.DataLoader,
             device: torch.device, *, amp_dtype: torch.dtype | None = None, channels_last: bool = False,
             dist: DistInfo = DistInfo(), desc: str = "val", epoch: int = 0,
             return_predictions: bool = False) -> dict[str, Any]:
    """All METHOD.md metrics with the stage's prediction protocol (the dataset's eval views).

    NIMA: the whole image warped; MPEMD: P patches seeded by the image id, distributions averaged.
    With ``return_predictions``, also ``indices`` and ``pred_dist`` arrays (for analysis and tests).
    """
    model.eval()
    preds, targets, indices, losses = [], [], [], []
    skipped: list[int] = []
    start = time.perf_counter()
    with Progress(len(loader.sampler), desc, disable=None if dist.is_main else True) as progress:  # type: ignore[arg-type]
        for batch in loader:
            skipped.extend(sample.index for sample in batch.skipped)
            _log_skipped(batch.skipped, "val", epoch)
            if len(batch) == 0:
                progress.update(len(batch.skipped))
                continue
            images = batch.images.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                probs = batch_probs(model, images, channels_last)
            target = batch.targets.to(device)
            probs = probs.float()
            # per image, so that images repeated by a distributed sampler's padding count once
            losses.append(np.array([float(loss_fn(probs[i:i + 1], target[i:i + 1])) for i in range(len(batch))]))
            preds.append(image_dist(probs).cpu().numpy())
            targets.append(batch.targets.numpy())
            indices.append(batch.indices.numpy())
            progress.update(len(batch) + len(batch.skipped))
    seconds = time.perf_counter() - start
    pred_all, target_all, index_all, loss_all, skipped_all = _gather(
        [_cat(preds), _cat(targets), _cat(indices, 0).astype(np.int64), _cat(losses, 0),
         np.array(skipped, dtype=np.int64)], dist)
    if dist.enabled:  # DistributedSampler pads the last shard with repeats: keep each image once
        index_all, first = np.unique(index_all, return_index=True)
        pred_all, target_all, loss_all = pred_all[first], target_all[first], loss_all[first]
    n_skipped = len(np.unique(skipped_all))
    n = len(index_all)
    out: dict[str, Any] = {
        "loss": float(loss_all.mean()) if n else math.nan,
        **distribution_metrics(pred_all, target_all),
        "n": int(n),
        "skipped": int(n_skipped),
        "seconds": seconds,
        "samples_per_s": n / seconds if seconds > 0 else math.nan,
    }
    if return_predictions:
        out["indices"], out["pred_dist"] = index_all, pred_all
    return out


# ---- run folder, checkpoints, RNG ----------------------------------------------------------------

@dataclass(frozen=True)
class RunPaths:
    run_dir: str

    @property
    def last(self) -> str:
        return storage.join(self.run_dir, "checkpoint-last.pt")

    @property
    def best(self) -> str:
        return storage.join(self.run_dir, "checkpoint-best.pt")

    @property
    def config(self) -> str:
        return storage.join(self.run_dir, "config.json")

    @property
    def metrics(self) -> str:
        return storage.join(self.run_dir, "metrics.parquet")

    @property
    def curves(self) -> str:
        return storage.join(self.run_dir, "curves.png")


def run_paths(root: str, run_id: str) -> RunPaths:
    # One path segment: a run id like "../x" or "/x" must not put a run outside {root}/runs.
    if not run_id or run_id in (".", "..") or "/" in run_id or "\\" in run_id:
        raise ValueError(f"run id must be one path segment, got {run_id!r}")
    return RunPaths(storage.join(root, "runs", run_id))


def new_run_id(method: str) -> str:
    return f"{method}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def rng_state() -> dict[str, Any]:
    """Every RNG the loop may touch, as tensors/lists so ``weights_only=True`` loads it."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def resolve_init(root: str, init: str) -> str:
    """A run id under ``{root}/runs`` -> its best checkpoint; anything path-like is used as is."""
    if "/" in init or "://" in init or init.endswith(".pt"):
        return init
    return run_paths(root, init).best


def latest_run(root: str, method: str) -> str:
    """The id of the newest run of ``method`` under ``{root}/runs`` that has a best checkpoint."""
    fs, runs = storage.filesystem(storage.join(root, "runs"))
    candidates = []
    for entry in fs.ls(runs, detail=True) if fs.exists(runs) else []:
        run_id = entry["name"].rstrip("/").rsplit("/", 1)[-1]
        best = f"{entry['name'].rstrip('/')}/checkpoint-best.pt"
        if entry["type"] != "directory" or not run_id.startswith(f"{method}-") or not fs.exists(best):
            continue
        info = fs.info(best)
        stamp = info.get("mtime") or info.get("LastModified") or info.get("last_modified") or 0
        candidates.append((stamp.timestamp() if hasattr(stamp, "timestamp") else float(stamp), run_id))
    if not candidates:
        raise CheckpointError(f"no {method} run with checkpoint-best.pt under {storage.join(root, 'runs')}")
    return max(candidates)[1]


def load_init_weights(model: AestheticNet, root: str, init: str) -> dict[str, Any]:
    """Load stage-1 weights into ``model``; returns what was loaded (url, model_version, stage)."""
    url = resolve_init(root, init)
    try:
        data = storage.read_bytes(url)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"init checkpoint {url} cannot be read: {exc}") from exc
    checkpoint = load_checkpoint(data)
    if checkpoint["backbone"] != model.config.name:
        raise CheckpointError(f"init checkpoint {url} is for backbone {checkpoint['backbone']!r}, the config "
                              f"says {model.config.name!r}; pass --set backbone={checkpoint['backbone']}")
    model.load_state_dict(checkpoint["model"])
    stage = checkpoint.get("metadata", {}).get("stage")
    if stage != "nima":
        logger.warning("init checkpoint %s comes from stage %r, not nima", url, stage)
    return {"url": url, "model_version": checkpoint["model_version"], "stage": stage}


# ---- reports: metrics table, curves, markdown --------------------------------------------------

def history_frame(history: list[dict[str, Any]]) -> pd.DataFrame:
    columns = ["epoch", "split", "lr", "loss", *METRIC_COLUMNS, "skipped", "seconds", "samples_per_s"]
    frame = pd.DataFrame(history)
    return frame.reindex(columns=columns)


def plot_curves(history: list[dict[str, Any]], title: str) -> Figure:
    from matplotlib.figure import Figure  # imported here: GPU hosts may lack matplotlib

    frame = history_frame(history)
    fig = Figure(figsize=(11, 3.6), layout="constrained")
    axes = fig.subplots(1, 3)
    for split, style in (("train", "-o"), ("val", "-s")):
        part = frame[frame["split"] == split]
        axes[0].plot(part["epoch"] + 1, part["loss"], style, label=split, markersize=3)
        axes[1].plot(part["epoch"] + 1, part["emd2"], style, label=split, markersize=3)
        axes[2].plot(part["epoch"] + 1, part["lcc"], style, label=f"LCC {split}", markersize=3)
        axes[2].plot(part["epoch"] + 1, part["srcc"], style.replace("-", ":"), label=f"SRCC {split}", markersize=3)
    for ax, name in zip(axes, ("loss", "EMD_2", "correlation"), strict=True):
        ax.set_xlabel("epoch")
        ax.set_title(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return fig


def figure_png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def _write_curves(url: str, history: list[dict[str, Any]], title: str) -> None:
    try:
        png = figure_png(plot_curves(history, title))
    except ImportError as exc:  # a bare GPU host: the run goes on, the plot is missing
        logger.warning("curves.png not written (%s)", exc)
        return
    storage.write_bytes_atomic(url, png)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def summary_markdown(result: dict[str, Any]) -> str:
    """The final metrics table (last and best epoch, train and val) for a Prefect artifact or a report."""
    cols = ["loss", "emd2", "emd1", "mse", "mae", "rmse", "lcc", "srcc", "accuracy", "std_lcc", "n", "skipped"]
    lines = [
        f"# {result['method'].upper()} run `{result['run_id']}`",
        "",
        f"- run folder: `{result['run_dir']}`",
        f"- best checkpoint: `{result['best_checkpoint']}` (epoch {result['best_epoch'] + 1}, "
        f"val {result['best_metric']} = {_fmt(result['best_value'])}), model_version `{result['model_version']}`",
        f"- epochs run: {result['epochs_run']}, stopped early: {result['stopped_early']}",
        "",
        "| row | " + " | ".join(cols) + " |",
        "| --- | " + " | ".join("---" for _ in cols) + " |",
    ]
    for name in ("final_train", "final_val", "best_val"):
        row = result.get(name) or {}
        lines.append(f"| {name} | " + " | ".join(_fmt(row.get(c, math.nan)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


# ---- the epoch loop ------------------------------------------------------------------------------

def _is_better(value: float, best: float | None, mode: str) -> bool:
    if value is None or math.isnan(value):
        return False
    if best is None:
        return True
    return value < best if mode == "min" else value > best


def _json_config(cfg: TrainConfig) -> str:
    import json
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True)


def fit(cfg: TrainConfig, *, root: str, method: str, run_id: str | None = None, init: str | None = None,
        command: str = "", resume: bool = True, train_manifest: str | None = None,
        val_manifest: str | None = None) -> dict[str, Any]:
    """Train stage ``method`` (nima | mpemd) under ``{root}/runs/<run_id>``; resume if a last checkpoint exists.

    Returns run_id, run_dir, best_checkpoint, model_version (of the best), best metric and epoch,
    and the final/best metric rows: what a later flow needs to chain stages.
    """
    if method not in ("nima", "mpemd"):
        raise ValueError(f"method must be nima or mpemd, got {method!r}")
    if method == "mpemd" and not init:
        raise ValueError("stage 2 (mpemd) needs init: a stage-1 run id or checkpoint URL")
    run_id = run_id or new_run_id(method)
    resume_command = None
    paths = run_paths(root, run_id)
    resume_state = None
    if resume and storage.exists(paths.last):
        resume_state = load_checkpoint(storage.read_bytes(paths.last))
        saved = config_from_dict(resume_state["config"])
        if saved != cfg:
            logger.warning("resuming %s with its saved config (the one given differs)", run_id)
        cfg = saved
        init = resume_state["metadata"].get("init_arg") or init
        # the checkpoint keeps the command that created the run; the resuming one is recorded beside it
        command, resume_command = resume_state["metadata"].get("command") or command, command
        logger.info("resuming %s after epoch %d", run_id, resume_state["epoch"] + 1)

    dist = setup_distributed("cuda" if cfg.device.startswith("cuda") or
                             (cfg.device == "auto" and torch.cuda.is_available()) else "cpu")
    device = resolve_device(cfg.device, dist)
    amp_dtype = autocast_dtype(cfg.amp, device)
    channels_last = cfg.channels_last and device.type == "cuda"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
    seed_everything(cfg.seed)

    # data
    geometry = input_config(cfg.backbone, cfg.image_size)
    patch_settings = PatchSettings(n_patches=cfg.n_patches, mode=cfg.eval_patch_mode, seed=cfg.patch_seed)
    train_records = read_manifest(train_manifest or storage.join(root, "manifests", "train.parquet"),
                                  cfg.max_train_samples)
    val_records = read_manifest(val_manifest or storage.join(root, "manifests", "val.parquet"), cfg.max_val_samples)
    common = {"n_patches": cfg.n_patches, "patch_settings": patch_settings, "seed": cfg.seed}
    train_set = ManifestDataset(train_records, geometry, method, train=True, **common)
    val_set = ManifestDataset(val_records, geometry, method, train=False, **common)
    pin = device.type == "cuda"
    loader_args = {"num_workers": cfg.num_workers, "pin_memory": pin, "rank": dist.rank,
                   "world_size": dist.world_size, "mp_context": cfg.mp_context}
    train_loader = make_loader(train_set, batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed,
                               drop_last=len(train_set) >= 2 * cfg.batch_size * dist.world_size, **loader_args)
    val_loader = make_loader(val_set, batch_size=cfg.eval_batch_size or cfg.batch_size, shuffle=False,
                             seed=cfg.seed, **loader_args)

    # model: stage 1 from the backbone's weights, stage 2 from the stage-1 checkpoint
    net = build_model(cfg.backbone, weights=cfg.weights if method == "nima" else "none", input_size=cfg.image_size)
    if cfg.freeze_backbone:
        net.freeze_features()
    init_info = None
    if method == "mpemd":  # a resumed run takes its weights from checkpoint-last.pt below
        init_info = (resume_state["metadata"].get("init") if resume_state is not None
                     else load_init_weights(net, root, init))
    net.to(device)
    if channels_last:
        net.to(memory_format=torch.channels_last)
    trainable = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.lr_step_epochs, gamma=cfg.lr_gamma)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    start_epoch, history = 0, []
    best: dict[str, Any] = {"value": None, "epoch": -1, "stale_epochs": 0, "model_version": None}
    if resume_state is not None:
        net.load_state_dict(resume_state["model"])
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        scaler.load_state_dict(resume_state["scaler"])
        history = list(resume_state["history"])
        best = dict(resume_state["best"])
        start_epoch = resume_state["epoch"] + 1
        if resume_state["data_order"]["seed"] != cfg.seed:
            raise CheckpointError("checkpoint data order seed differs from the config seed")
        set_rng_state(resume_state["rng"])
    elif dist.enabled:
        torch.manual_seed(cfg.seed + dist.rank)  # different dropout masks per rank

    model: nn.Module = net
    if dist.enabled:
        model = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        model = torch.compile(model)
    loss_fn = make_loss_fn(cfg, method)

    metadata_base = {
        "stage": method, "method": method, "run_id": run_id, "backbone": cfg.backbone,
        "input_size": geometry.input_size, "resize_size": geometry.resize_size,
        "patch_settings": patch_settings.to_dict(),  # read back by scoring through PatchSettings.from_dict
        "config": cfg.to_dict(), "command": command, "resume_command": resume_command,
        "argv": shlex.join(sys.argv),
        "init": init_info, "init_arg": init, "world_size": dist.world_size,
    }
    if dist.is_main:
        storage.makedirs(paths.run_dir)
        storage.write_text_atomic(paths.config, _json_config(cfg))
        logger.info("run folder: %s (%s on %s, amp=%s, world_size=%d)", paths.run_dir, method, device,
                    amp_dtype, dist.world_size)

    stopped_early = False
    epoch = start_epoch - 1
    for epoch in range(start_epoch, cfg.epochs):
        lr = optimizer.param_groups[0]["lr"]
        tag = f"{method} epoch {epoch + 1}/{cfg.epochs}"
        train_stats = train_one_epoch(model, loss_fn, optimizer, train_loader, device, epoch, scaler=scaler,
                                      amp_dtype=amp_dtype, channels_last=channels_last, dist=dist,
                                      desc=f"{tag} train")
        val_stats = evaluate(model, loss_fn, val_loader, device, amp_dtype=amp_dtype, channels_last=channels_last,
                             dist=dist, desc=f"{tag} val", epoch=epoch)
        scheduler.step()
        history.append({"epoch": epoch, "split": "train", "lr": lr, **train_stats})
        history.append({"epoch": epoch, "split": "val", "lr": lr, **val_stats})
        if dist.is_main:
            logger.info("%s: train loss %.4f (%.1f img/s, %d skipped) | val loss %.4f emd2 %.4f lcc %.3f srcc %.3f",
                        tag, train_stats["loss"], train_stats["samples_per_s"], train_stats["skipped"],
                        val_stats["loss"], val_stats["emd2"], val_stats["lcc"], val_stats["srcc"])
        value = val_stats[cfg.best_metric]
        improved = _is_better(value, best["value"], cfg.best_mode)
        if improved:
            best.update(value=float(value), epoch=epoch, stale_epochs=0)
        else:
            best["stale_epochs"] += 1
        stop = cfg.early_stopping_patience > 0 and best["stale_epochs"] >= cfg.early_stopping_patience
        if dist.is_main:
            metadata = {**metadata_base, "epoch": epoch, "val_metrics": val_stats}
            if improved:
                best_bytes = checkpoint_bytes(net, metadata=metadata)
                best["model_version"] = load_checkpoint(best_bytes)["model_version"]
                storage.write_bytes_atomic(paths.best, best_bytes)
            storage.write_bytes_atomic(paths.last, checkpoint_bytes(
                net, metadata=metadata, optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                scaler=scaler.state_dict(), epoch=epoch, rng=rng_state(), history=history, best=best,
                data_order={"seed": cfg.seed, "next_epoch": epoch + 1}, config=cfg.to_dict()))
            storage.write_parquet_atomic(pa.Table.from_pandas(history_frame(history), preserve_index=False),
                                         paths.metrics)
            _write_curves(paths.curves, history, f"{method} {run_id}")
        if stop:
            logger.info("early stopping after epoch %d: no %s improvement for %d epochs", epoch + 1,
                        cfg.best_metric, best["stale_epochs"])
            stopped_early = True
            break

    rows = history_frame(history)
    def last_row(split: str, epoch_index: int | None = None) -> dict[str, Any]:
        part = rows[rows["split"] == split]
        if epoch_index is not None:
            part = part[part["epoch"] == epoch_index]
        if not len(part):
            return {}
        return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in part.iloc[-1].to_dict().items()}

    if dist.enabled:
        torch_dist.barrier()
    return {
        "run_id": run_id,
        "run_dir": paths.run_dir,
        "method": method,
        "best_checkpoint": paths.best,
        "last_checkpoint": paths.last,
        "model_version": best["model_version"],
        "best_metric": cfg.best_metric,
        "best_value": best["value"],
        "best_epoch": best["epoch"],
        "epochs_run": int(epoch + 1),
        "stopped_early": stopped_early,
        "final_train": last_row("train"),
        "final_val": last_row("val"),
        "best_val": last_row("val", best["epoch"]),
        "init": init_info,
        "config": cfg.to_dict(),
    }


# ---- command line (also the torchrun entry point) ----------------------------------------------

def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tasks.training", description="Train NIMA (stage 1) or MPEMD "
                                "(stage 2) without Prefect; the same entry point works under torchrun.")
    p.add_argument("method", choices=("nima", "mpemd"))
    p.add_argument("--root", required=True, help="data root URL ({root}/manifests, {root}/runs)")
    p.add_argument("--preset", default="cpu-smoke")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    p.add_argument("--init", help="stage 2: a stage-1 run id or checkpoint URL")
    p.add_argument("--run-id", help="run folder name; an existing run resumes from checkpoint-last.pt")
    p.add_argument("--no-resume", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    # under torchrun only rank 0 reports progress; the other ranks say something only when it matters
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s %(levelname)s %(name)s[rank {rank}]: %(message)s")
    cfg = resolve_config(args.preset, parse_overrides(args.overrides))
    command = shlex.join(["python", "-m", "tasks.training", *(argv if argv is not None else sys.argv[1:])])
    result = fit(cfg, root=args.root, method=args.method, run_id=args.run_id, init=args.init, command=command,
                 resume=not args.no_resume)
    if rank == 0:
        print(f"run folder: {result['run_dir']}")
        print(f"best checkpoint: {result['best_checkpoint']} (model_version {result['model_version']})")
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
