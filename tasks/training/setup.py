"""What a training run is built from: its data loaders, its network (which parts train) and its optimizer.

Fine-tuning the trunk: ``train_blocks`` = 0 trains the whole network; N > 0 freezes all but the
trunk's last N blocks (``trunk_blocks``: the trunk's parameter-holding modules in forward order,
``Sequential``/``ModuleList`` containers opened one level, a normalisation layer grouped with the
layer before it). A partly frozen trunk keeps all its BatchNorm layers in inference mode (their
ImageNet statistics; CPU batches are too small to re-estimate them), as ``freeze_backbone`` does.
The trunk trains at ``lr * trunk_lr_scale`` and the head at ``lr``: one SGD param group each.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from model.networks import AestheticNet, backbone_config, build_model
from model.preprocess import PatchSettings
from tasks.core import storage
from tasks.core.devices import RankInfo, autocast_dtype, resolve_device, setup_distributed, wants_cuda
from tasks.core.errors import MissingPathError
from tasks.training.datasets import ManifestDataset, make_loader, read_manifest, start_workers
from tasks.training.presets import Schedule, TrainConfig, auto_workers
from tasks.training.runs import RunStart, load_init_weights

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)
_UNUSED_HEADS = ("_fc",)  # efficientnet-lite keeps its ImageNet classifier; our features skip it


# ---- process and data ----

@dataclass(frozen=True)
class TrainEnv:
    """This process's rank, device and precision."""

    ranks: RankInfo
    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool

    @classmethod
    def create(cls, cfg: TrainConfig) -> TrainEnv:
        ranks = setup_distributed("cuda" if wants_cuda(cfg.device) else "cpu")
        device = resolve_device(cfg.device, local_rank=ranks.local_rank)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = cfg.cudnn_benchmark
        return cls(ranks, device, autocast_dtype(cfg.amp, device), cfg.channels_last and device.type == "cuda")


def run_metadata(cfg: TrainConfig, method: str, run_id: str, loaders: Loaders, start: RunStart,
              init_info: dict[str, Any] | None, ranks: RankInfo) -> dict[str, Any]:
    """What every checkpoint of the run says about how it was made (scoring reads patch_settings)."""
    return {"stage": method, "method": method, "run_id": run_id, "backbone": cfg.backbone,
            "input_size": loaders.input_size, "resize_size": loaders.resize_size,
            "patch_settings": {"n_patches": cfg.n_patches, "mode": cfg.eval_patch_mode, "seed": cfg.patch_seed},
            "config": cfg.to_dict(), "command": start.command, "resume_command": start.resume_command,
            "argv": shlex.join(sys.argv), "init": init_info, "init_arg": start.init, "world_size": ranks.world_size}


def wrap_model(net: nn.Module, cfg: TrainConfig, ranks: RankInfo, device: torch.device) -> nn.Module:
    """DistributedDataParallel under torchrun, ``torch.compile`` when asked; checkpoints save ``net``."""
    model = net
    if ranks.enabled:
        model = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    return torch.compile(model) if cfg.compile else model


# ---- data ---------------------------------------------------------------------------------------

@dataclass
class Loaders:
    train: torch.utils.data.DataLoader
    val: torch.utils.data.DataLoader
    input_size: int
    resize_size: int


def require_dataset(root: str) -> None:
    """A training root holds an ingested dataset; else one line saying what to run (a fresh checkout
    has none, and pyarrow's FileNotFoundError says nothing about ingest)."""
    for split in ("train", "val"):
        url = storage.join(root, "manifests", f"{split}.parquet")
        if not storage.exists(url):
            raise MissingPathError(
                f"no ingested dataset under {root}: {url} does not exist; make one with "
                f"`mpemd synth-ava --out {storage.join(root, 'synth')} && mpemd ingest --labels "
                f"{storage.join(root, 'synth', 'AVA.txt')} --images {storage.join(root, 'synth', 'images')} "
                f"--root {root}` (or ingest AVA itself)")


def build_loaders(cfg: TrainConfig, method: str, root: str, ranks: RankInfo, device: torch.device, *,
                  train_manifest: str | None = None, val_manifest: str | None = None) -> Loaders:
    """Train (shuffled, augmented) and val (the stage's prediction views) loaders, sharded per rank."""
    geometry = backbone_config(cfg.backbone, cfg.image_size)
    patch_settings = PatchSettings(n_patches=cfg.n_patches, mode=cfg.eval_patch_mode, seed=cfg.patch_seed)
    manifests = storage.join(root, "manifests")
    train_records = read_manifest(train_manifest or storage.join(manifests, "train.parquet"), cfg.max_train_samples)
    val_records = read_manifest(val_manifest or storage.join(manifests, "val.parquet"), cfg.max_val_samples)
    common = {"n_patches": cfg.n_patches, "patch_settings": patch_settings, "seed": cfg.seed}
    train_set = ManifestDataset(train_records, geometry, method, train=True, **common)
    val_set = ManifestDataset(val_records, geometry, method, train=False, **common)
    workers = auto_workers() if cfg.num_workers == -1 else cfg.num_workers
    loader_args = {"num_workers": workers, "pin_memory": device.type == "cuda", "rank": ranks.rank,
                   "world_size": ranks.world_size, "mp_context": cfg.mp_context, "seed": cfg.seed}
    train = make_loader(train_set, batch_size=cfg.batch_size, shuffle=True,
                        drop_last=len(train_set) >= 2 * cfg.batch_size * ranks.world_size, **loader_args)
    val = make_loader(val_set, batch_size=cfg.eval_batch_size or cfg.batch_size, shuffle=False, **loader_args)
    for loader in (train, val):  # before the network and its training buffers exist (copy-on-write)
        start_workers(loader)
    return Loaders(train, val, geometry.input_size, geometry.resize_size)


# ---- the network: initial weights and what trains ------------------------------------------------

def trunk_blocks(net: AestheticNet) -> list[list[nn.Module]]:
    """The trunk's blocks in forward order (see the module docstring); each block is a list of modules."""
    module: nn.Module = net.features
    while True:  # open single-child wrappers (efficientnet-lite's _LiteFeatures)
        children = [c for c in module.children() if _has_params(c)]
        if len(children) != 1 or isinstance(children[0], nn.Sequential | nn.ModuleList):
            break
        module = children[0]
    blocks: list[list[nn.Module]] = []
    for name, child in module.named_children():
        if name in _UNUSED_HEADS or not _has_params(child):
            continue
        if isinstance(child, nn.Sequential | nn.ModuleList):
            blocks.extend([c] for c in child.children() if _has_params(c))
        elif isinstance(child, _NORMS) and blocks:
            blocks[-1].append(child)
        else:
            blocks.append([child])
    return blocks


def _has_params(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def apply_trainable(net: AestheticNet, cfg: TrainConfig) -> None:
    """Freeze what ``freeze_backbone`` / ``train_blocks`` leave out of training."""
    if cfg.freeze_backbone or cfg.train_blocks > 0:
        net.freeze_features()
    if not cfg.freeze_backbone and cfg.train_blocks > 0:
        for block in trunk_blocks(net)[-cfg.train_blocks:]:
            for module in block:
                module.requires_grad_(True)


def build_network(cfg: TrainConfig, method: str, root: str, init: str | None,
                  resume_state: dict[str, Any] | None) -> tuple[AestheticNet, dict[str, Any] | None]:
    """Stage 1: the backbone's weights; with ``init`` (stage 2, or NIMA continued): that checkpoint's.

    A resumed run records the init it had and takes its weights from checkpoint-last.pt later.
    """
    weights = cfg.weights if method == "nima" and not init else "none"
    net = build_model(cfg.backbone, weights=weights, input_size=cfg.image_size, dropout=cfg.head_dropout)
    apply_trainable(net, cfg)
    init_info = None
    if init:
        init_info = (resume_state["metadata"].get("init") if resume_state is not None
                     else load_init_weights(net, root, init))
    return net, init_info


# ---- optimisation ---------------------------------------------------------------------------------

def param_groups(net: AestheticNet, cfg: TrainConfig, lr: float) -> list[dict[str, Any]]:
    """Trainable parameters: one group at ``lr`` when the trunk's scale is 1, else trunk and head groups."""
    trunk = [p for p in net.features.parameters() if p.requires_grad]
    head = [p for p in net.head.parameters() if p.requires_grad]
    if cfg.trunk_lr_scale == 1.0 or not trunk:
        return [{"params": trunk + head, "lr": lr}]  # the order checkpoints of one group were saved in
    return [{"params": trunk, "lr": lr * cfg.trunk_lr_scale, "name": "trunk"},
            {"params": head, "lr": lr, "name": "head"}]


def make_optimizer(net: AestheticNet, cfg: TrainConfig, schedule: Schedule
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """METHOD.md's SGD with momentum and its step decay (every group decays by the same factor)."""
    optimizer = torch.optim.SGD(param_groups(net, cfg, schedule.lr), lr=schedule.lr, momentum=cfg.momentum,
                                weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=schedule.lr_step_epochs,
                                                gamma=schedule.lr_gamma)
    return optimizer, scheduler
