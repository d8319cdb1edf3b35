"""Stage 1 (NIMA) and stage 2 (MPEMD) training: ``train_one_epoch``, ``evaluate`` and a plain epoch loop.

In the manner of torchvision's classification reference: no trainer framework, one checkpoint dict
that holds everything resume needs (model, optimizer, scheduler, scaler, epoch, RNG states, data
order, history), written after every epoch as ``checkpoint-last.pt``; the best by a validation
metric is also kept as ``checkpoint-best.pt``. Outputs go to ``{root}/runs/<run_id>/``
(``tasks/training/runs.py``), with the report beside them (``tasks/training/run_report.py``); loaders, network and
optimizer are built by ``tasks/training/setup.py``.

Devices: CUDA when present (AMP bf16/fp16 with a GradScaler for fp16, channels_last, cudnn
benchmark, optional ``torch.compile``), else CPU. Launched by ``torchrun`` the same entry point
runs DistributedDataParallel with one shard of the data per rank (see infra/torchrun.md)::

    python -m tasks.training nima --root ./data --preset cpu-smoke
    torchrun --nproc_per_node=8 -m tasks.training nima --root s3://bucket/ava --preset paper

No Prefect import: the flows in ``flows/train_*.py`` call ``fit`` and publish its summary.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from model.allocator import release_free_memory
from model.losses import mpemd_loss, nima_loss
from model.metrics import distribution_metrics
from model.preprocess import METHODS
from tasks.core import storage
from tasks.core.devices import SINGLE_PROCESS, RankInfo, autocast_dtype, barrier, gather_arrays, reduce_sum
from tasks.core.progress import Progress
from tasks.training.presets import Schedule, TrainConfig
from tasks.training.run_report import history_row, write_history
from tasks.training.runs import (
    FitResult,
    LoopState,
    RunPaths,
    new_run_id,
    run_paths,
    seed_everything,
    start_run,
)
from tasks.training.setup import (
    TrainEnv,
    build_loaders,
    build_network,
    make_optimizer,
    run_metadata,
    wrap_model,
)

__all__ = ["EarlyStopping", "FitResult", "autocast_dtype", "evaluate", "fit", "make_loss_fn", "run_paths",
           "train_one_epoch"]

logger = logging.getLogger("mpemd")

LossFn = Callable[..., Tensor]  # (probs, target, reduction="mean" | "none") -> loss


# ---- the model's view of a batch ---------------------------------------------------------------

def batch_probs(model: nn.Module, images: Tensor, channels_last: bool) -> Tensor:
    """(B,3,s,s) -> (B,10) or (B,P,3,s,s) -> (B,P,10) probabilities (float32)."""
    lead = images.shape[:-3]
    flat = images.reshape(-1, *images.shape[-3:])
    if channels_last:
        flat = flat.contiguous(memory_format=torch.channels_last)
    return model(flat).float().reshape(*lead, -1)


def make_loss_fn(cfg: TrainConfig, method: str) -> LossFn:
    if method == "nima":
        return nima_loss

    def loss(probs: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
        return mpemd_loss(probs, target, k=cfg.k, gamma=cfg.gamma, eps=cfg.eps, adaptive=cfg.loss == "ada",
                          detach_weight=cfg.detach_weight, reduction=reduction)
    return loss


def image_dist(probs: Tensor) -> Tensor:
    """Per-image distribution: the view itself (NIMA) or the mean over patches (MPEMD)."""
    return probs.mean(dim=1) if probs.dim() == 3 else probs


def _log_skipped(batch_skipped: list, split: str, epoch: int) -> None:
    for s in batch_skipped:
        logger.warning("%s epoch %d: skipped image %d (%s)", split, epoch, s.image_id, s.reason)


def _cat(parts: list[np.ndarray], width: int = 10) -> np.ndarray:
    """Concatenate batches; an empty list gives (0, width), or (0,) with width 0."""
    return np.concatenate(parts) if parts else np.zeros((0, width) if width else 0)


def _rates(n: int, skipped: int, seconds: float) -> dict[str, Any]:
    return {"n": int(n), "skipped": int(skipped), "seconds": seconds,
            "samples_per_s": n / seconds if seconds > 0 else math.nan}


# ---- one epoch of training, one pass of evaluation ---------------------------------------------

def train_one_epoch(model: nn.Module, loss_fn: LossFn, optimizer: torch.optim.Optimizer,
                    loader: torch.utils.data.DataLoader, device: torch.device, epoch: int, *,
                    scaler: torch.amp.GradScaler, amp_dtype: torch.dtype | None = None,
                    channels_last: bool = False, ranks: RankInfo = SINGLE_PROCESS,
                    desc: str = "train") -> dict[str, float]:
    """One pass over ``loader``; returns loss, METHOD.md metrics of the training predictions, rates."""
    model.train()
    loader.sampler.set_epoch(epoch)  # type: ignore[union-attr]
    loss_sum, n_seen, n_skipped = 0.0, 0, 0
    preds, targets = [], []
    start = time.perf_counter()
    total = len(loader) * loader.batch_size if loader.drop_last else len(loader.sampler)  # type: ignore[arg-type]
    dropped = len(loader.sampler) - total  # type: ignore[arg-type]
    if dropped > 0:  # drop_last: say where the rest of the images went, each epoch
        desc = f"{desc} ({dropped} of {len(loader.sampler)} img in the dropped last partial batch)"  # type: ignore[arg-type]
    with Progress(total, desc, disable=None if ranks.is_main else True) as progress:
        for batch in loader:
            n_skipped += len(batch.skipped)
            _log_skipped(batch.skipped, "train", epoch)
            if len(batch) == 0:
                progress.update(len(batch.skipped))
                continue
            images = batch.inputs(device)  # uint8 views normalised on the device
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
            loss_sum += float(loss.detach()) * len(batch)
            n_seen += len(batch)
            preds.append(image_dist(probs.detach()).cpu().numpy())
            targets.append(batch.targets.numpy())
            progress.update(len(batch) + len(batch.skipped), loss=loss_sum / n_seen)
    seconds = time.perf_counter() - start
    loss_sum, n_seen, n_skipped = reduce_sum([loss_sum, n_seen, n_skipped], ranks, device)
    pred_all, target_all = gather_arrays([_cat(preds), _cat(targets)], ranks)
    return {"loss": loss_sum / n_seen if n_seen else math.nan, **distribution_metrics(pred_all, target_all),
            **_rates(n_seen, n_skipped, seconds)}


@torch.inference_mode()
def evaluate(model: nn.Module, loss_fn: LossFn, loader: torch.utils.data.DataLoader, device: torch.device, *,
             amp_dtype: torch.dtype | None = None, channels_last: bool = False,
             ranks: RankInfo = SINGLE_PROCESS, desc: str = "val", epoch: int = 0,
             return_predictions: bool = False) -> dict[str, Any]:
    """All METHOD.md metrics with the stage's prediction protocol (the dataset's eval views).

    NIMA: the whole image warped; MPEMD: P patches seeded by the image id, distributions averaged.
    Losses are kept per image, so that images repeated by a distributed sampler's padding count once.
    With ``return_predictions``, also ``indices`` and ``pred_dist`` arrays (for analysis and tests).
    """
    model.eval()
    preds, targets, indices, losses = [], [], [], []
    skipped: list[int] = []
    start = time.perf_counter()
    with Progress(len(loader.sampler), desc, disable=None if ranks.is_main else True) as progress:  # type: ignore[arg-type]
        for batch in loader:
            skipped.extend(sample.index for sample in batch.skipped)
            _log_skipped(batch.skipped, "val", epoch)
            if len(batch) == 0:
                progress.update(len(batch.skipped))
                continue
            images = batch.inputs(device)  # uint8 views normalised on the device
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                probs = batch_probs(model, images, channels_last).float()
            losses.append(loss_fn(probs, batch.targets.to(device), reduction="none").cpu().numpy())
            preds.append(image_dist(probs).cpu().numpy())
            targets.append(batch.targets.numpy())
            indices.append(batch.indices.numpy())
            progress.update(len(batch) + len(batch.skipped))
    seconds = time.perf_counter() - start
    pred_all, target_all, index_all, loss_all, skipped_all = gather_arrays(
        [_cat(preds), _cat(targets), _cat(indices, 0).astype(np.int64), _cat(losses, 0),
         np.array(skipped, dtype=np.int64)], ranks)
    if ranks.enabled:  # DistributedSampler pads the last shard with repeats: keep each image once
        index_all, first = np.unique(index_all, return_index=True)
        pred_all, target_all, loss_all = pred_all[first], target_all[first], loss_all[first]
    n = len(index_all)
    out: dict[str, Any] = {"loss": float(loss_all.mean()) if n else math.nan,
                           **distribution_metrics(pred_all, target_all),
                           **_rates(n, len(np.unique(skipped_all)), seconds)}
    if return_predictions:
        out["indices"], out["pred_dist"] = index_all, pred_all
    return out


# ---- early stopping and the result ---------------------------------------------------------------

@dataclass
class EarlyStopping:
    """Tracks the best validation value; ``should_stop`` after ``patience`` epochs without a better one.

    NaN never improves; ``patience`` 0 never stops. ``state_dict`` is the checkpoint's ``best`` entry.
    """

    mode: str = "min"  # min | max
    patience: int = 0
    value: float | None = None
    epoch: int = -1
    stale_epochs: int = 0

    def update(self, value: float, epoch: int) -> bool:
        """Record epoch ``epoch``'s value; True when it is a new best."""
        better = value is not None and not math.isnan(value) and (
            self.value is None or (value < self.value if self.mode == "min" else value > self.value))
        if better:
            self.value, self.epoch, self.stale_epochs = float(value), epoch, 0
        else:
            self.stale_epochs += 1
        return better

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.stale_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value, "epoch": self.epoch, "stale_epochs": self.stale_epochs}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value, self.epoch, self.stale_epochs = state["value"], state["epoch"], state["stale_epochs"]


# ---- fit: one run from start (or resume) to its result -----------------------------------------------

def fit(cfg: TrainConfig, *, root: str, method: str, run_id: str | None = None, init: str | None = None,
        command: str = "", resume: bool = True, train_manifest: str | None = None,
        val_manifest: str | None = None) -> FitResult:
    """Train ``method`` (nima | mpemd) under ``{root}/runs/<run_id>``; resume if a last checkpoint exists.

    ``init`` (a run id or checkpoint URL) starts from trained weights: required for mpemd (stage 2);
    for nima it continues stage 1 for exactly ``cfg.mpemd_epochs`` epochs (the equal-budget baseline).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "mpemd" and not init:
        raise ValueError("stage 2 (mpemd) needs init: a stage-1 run id or checkpoint URL")
    run_id = run_id or new_run_id(method)
    paths = run_paths(root, run_id)
    start = start_run(paths, cfg, init, command, resume)
    cfg, init = start.cfg, start.init
    schedule = cfg.schedule(method, continued=bool(init))

    env = TrainEnv.create(cfg)
    ranks, device = env.ranks, env.device
    seed_everything(cfg.seed)
    loaders = build_loaders(cfg, method, root, ranks, device, train_manifest=train_manifest,
                            val_manifest=val_manifest)
    net, init_info = build_network(cfg, method, root, init, start.state)
    net.to(device, memory_format=torch.channels_last if env.channels_last else torch.preserve_format)
    loop = LoopState(*make_optimizer(net, cfg, schedule),
                     torch.amp.GradScaler(device.type, enabled=env.amp_dtype == torch.float16),
                     EarlyStopping(cfg.best_mode, cfg.early_stopping_patience))
    if start.state is not None:
        loop.restore(start.state, net, cfg.seed)
    elif ranks.enabled:
        torch.manual_seed(cfg.seed + ranks.rank)  # different dropout masks per rank
    model = wrap_model(net, cfg, ranks, device)
    loss_fn = make_loss_fn(cfg, method)
    metadata = run_metadata(cfg, method, run_id, loaders, start, init_info, ranks)
    if ranks.is_main:
        _open_run_folder(paths, cfg, method, env, schedule)
    on_device = {"amp_dtype": env.amp_dtype, "channels_last": env.channels_last, "ranks": ranks}
    epoch = loop.start_epoch - 1
    for epoch in range(loop.start_epoch, schedule.epochs):
        lr = loop.optimizer.param_groups[-1]["lr"]  # the head's
        tag = f"{method} epoch {epoch + 1}/{schedule.epochs}"
        train_stats = train_one_epoch(model, loss_fn, loop.optimizer, loaders.train, device, epoch,
                                      scaler=loop.scaler, desc=f"{tag} train", **on_device)
        val_stats = evaluate(model, loss_fn, loaders.val, device, desc=f"{tag} val", epoch=epoch, **on_device)
        loop.scheduler.step()
        loop.history += [{"epoch": epoch, "split": "train", "lr": lr, **train_stats},
                         {"epoch": epoch, "split": "val", "lr": lr, **val_stats}]
        improved = loop.stopper.update(val_stats[cfg.best_metric], epoch)
        if ranks.is_main:
            _log_epoch(tag, train_stats, val_stats)
            loop.save(paths, net, {**metadata, "epoch": epoch, "val_metrics": val_stats}, epoch, improved, cfg)
            write_history(paths, loop.history, f"{method} {run_id}")
        if loop.stopper.should_stop:
            logger.info("early stopping after epoch %d: no %s improvement for %d epochs", epoch + 1,
                        cfg.best_metric, loop.stopper.stale_epochs)
            break
    barrier(ranks)
    release_free_memory()  # the steps' freed buffers go back: the heap is never trimmed by itself
    return _result(paths, run_id, method, cfg, loop, epoch + 1, init_info)


def _open_run_folder(paths: RunPaths, cfg: TrainConfig, method: str, env: TrainEnv, schedule: Schedule) -> None:
    storage.makedirs(paths.run_dir)
    storage.write_text_atomic(paths.config, json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
    logger.info("run folder: %s (%s on %s, amp=%s, world_size=%d, %d epochs at lr %g)", paths.run_dir, method,
                env.device, env.amp_dtype, env.ranks.world_size, schedule.epochs, schedule.lr)


def _log_epoch(tag: str, train: dict[str, Any], val: dict[str, Any]) -> None:
    logger.info("%s: train loss %.4f (%.1f img/s, %d skipped) | val loss %.4f emd2 %.4f lcc %.3f srcc %.3f",
                tag, train["loss"], train["samples_per_s"], train["skipped"], val["loss"], val["emd2"],
                val["lcc"], val["srcc"])


def _result(paths: RunPaths, run_id: str, method: str, cfg: TrainConfig, loop: LoopState, epochs_run: int,
            init_info: dict[str, Any] | None) -> FitResult:
    stopper = loop.stopper
    assert isinstance(stopper, EarlyStopping)
    return FitResult(
        run_id=run_id, run_dir=paths.run_dir, method=method, best_checkpoint=paths.best, last_checkpoint=paths.last,
        model_version=loop.best_version, best_metric=cfg.best_metric, best_value=stopper.value,
        best_epoch=stopper.epoch, epochs_run=int(epochs_run), stopped_early=stopper.should_stop,
        final_train=history_row(loop.history, "train"), final_val=history_row(loop.history, "val"),
        best_val=history_row(loop.history, "val", stopper.epoch), init=init_info, config=cfg.to_dict())
