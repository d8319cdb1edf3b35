"""Run bookkeeping: where a run lives, how it is named and found, its initial weights, its RNG state,
and what its last checkpoint carries for an exact resume.

A run is the folder ``{root}/runs/<run_id>/`` holding ``checkpoint-last.pt`` (everything resume
needs), ``checkpoint-best.pt``, ``config.json``, ``metrics.parquet`` and ``curves.png``. The loop that
fills it is ``tasks/training/loop.py``; the report written beside it is ``tasks/training/run_report.py``.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from model.checkpoint import (
    CheckpointError,
    checkpoint_bytes,
    load_checkpoint,
    make_checkpoint,
    serialize_checkpoint,
)
from model.networks import AestheticNet
from tasks.core import storage
from tasks.core.errors import UnknownChoiceError, missing_path
from tasks.training.presets import TrainConfig, config_from_dict

logger = logging.getLogger("mpemd")


@dataclass(frozen=True)
class FitResult:
    """What a finished (or already finished) run gives a later step: where it is and how it did."""

    run_id: str
    run_dir: str
    method: str
    best_checkpoint: str
    last_checkpoint: str
    model_version: str | None  # of the best checkpoint
    best_metric: str
    best_value: float | None
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    final_train: dict[str, Any] = field(default_factory=dict)  # metrics of the last epoch
    final_val: dict[str, Any] = field(default_factory=dict)
    best_val: dict[str, Any] = field(default_factory=dict)  # val metrics of the best epoch
    init: dict[str, Any] | None = None  # the checkpoint the weights started from (url, model_version, stage)
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# The files of a run folder, by the name RunPaths gives each.
RUN_FILES = {"last": "checkpoint-last.pt", "best": "checkpoint-best.pt", "config": "config.json",
             "metrics": "metrics.parquet", "curves": "curves.png"}


@dataclass(frozen=True)
class RunPaths:
    run_dir: str
    last: str
    best: str
    config: str
    metrics: str
    curves: str


def run_paths(root: str, run_id: str) -> RunPaths:
    # One path segment: a run id like "../x" or "/x" must not put a run outside {root}/runs.
    if not run_id or run_id in (".", "..") or "/" in run_id or "\\" in run_id:
        raise ValueError(f"run id must be one path segment, got {run_id!r}")
    run_dir = storage.join(root, "runs", run_id)
    return RunPaths(run_dir, **{name: storage.join(run_dir, file) for name, file in RUN_FILES.items()})


def new_run_id(method: str) -> str:
    return f"{method}-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


# ---- RNG ------------------------------------------------------------------------------------------

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


# ---- finding runs and their weights ---------------------------------------------------------------

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
        candidates.append((storage.file_version(fs.info(best)).mtime or 0.0, run_id))
    if not candidates:
        raise UnknownChoiceError(f"init=latest: no {method} run with checkpoint-best.pt under "
                                 f"{storage.join(root, 'runs')}; train one first: mpemd train-{method} --root {root} "
                                 f"(or prefect deployment run train-{method}/smoke)")
    return max(candidates)[1]


def resolve_init_arg(root: str, init: str | None, method: str = "nima") -> str | None:
    """``latest`` -> the newest ``method`` run's id; any other value (or None) unchanged."""
    return latest_run(root, method) if init == "latest" else init


def load_init_weights(model: AestheticNet, root: str, init: str) -> dict[str, Any]:
    """Load trained weights (head included) into ``model``; returns url, model_version and stage."""
    url = resolve_init(root, init)
    try:
        data = storage.read_bytes(url)
    except FileNotFoundError as exc:
        raise missing_path("init checkpoint", url) from exc
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"init checkpoint {url} cannot be read: {exc}") from exc
    checkpoint = load_checkpoint(data, name=url)
    if checkpoint["backbone"] != model.config.name:
        raise CheckpointError(f"init checkpoint {url} is for backbone {checkpoint['backbone']!r}, the config "
                              f"says {model.config.name!r}; pass --set backbone={checkpoint['backbone']}")
    model.load_state_dict(checkpoint["model"])
    stage = checkpoint.get("metadata", {}).get("stage")
    if stage != "nima":
        logger.warning("init checkpoint %s comes from stage %r, not nima", url, stage)
    return {"url": url, "model_version": checkpoint["model_version"], "stage": stage}


# ---- starting or resuming a run, and the loop state a checkpoint carries ----------------------------

class Stopper(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class RunStart:
    cfg: TrainConfig
    init: str | None
    command: str
    resume_command: str | None = None
    state: dict[str, Any] | None = None  # checkpoint-last.pt of a run being resumed


def start_run(paths: RunPaths, cfg: TrainConfig, init: str | None, command: str, resume: bool) -> RunStart:
    """A new run, or the saved config, init and command of the run being resumed."""
    if not (resume and storage.exists(paths.last)):
        return RunStart(cfg, init, command)
    state = load_checkpoint(storage.read_bytes(paths.last), name=paths.last)
    saved = config_from_dict(state["config"])
    if saved != cfg:
        logger.warning("resuming %s with its saved config (the one given differs)", paths.run_dir)
    logger.info("resuming %s after epoch %d", paths.run_dir, state["epoch"] + 1)
    # the checkpoint keeps the command that created the run; the resuming one is recorded beside it
    return RunStart(saved, state["metadata"].get("init_arg") or init,
                    state["metadata"].get("command") or command, command, state)


@dataclass
class LoopState:
    """The mutable state of the epoch loop that checkpoint-last.pt saves and a resume restores."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    stopper: Stopper
    history: list[dict[str, Any]] = field(default_factory=list)
    best_version: str | None = None  # model_version of checkpoint-best.pt
    start_epoch: int = 0

    def restore(self, state: dict[str, Any], net: nn.Module, seed: int) -> None:
        if state["data_order"]["seed"] != seed:
            raise CheckpointError("checkpoint data order seed differs from the config seed")
        net.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.history = list(state["history"])
        self.stopper.load_state_dict(state["best"])
        self.best_version = state["best"].get("model_version")
        self.start_epoch = state["epoch"] + 1
        set_rng_state(state["rng"])

    def save(self, paths: RunPaths, net: nn.Module, metadata: dict[str, Any], epoch: int, improved: bool,
             cfg: TrainConfig) -> None:
        """checkpoint-best.pt when ``improved`` (its model_version read off the dict), then checkpoint-last.pt."""
        if improved:
            best = make_checkpoint(net, metadata=metadata)
            self.best_version = best["model_version"]
            storage.write_bytes_atomic(paths.best, serialize_checkpoint(best))
        storage.write_bytes_atomic(paths.last, checkpoint_bytes(
            net, metadata=metadata, optimizer=self.optimizer.state_dict(), scheduler=self.scheduler.state_dict(),
            scaler=self.scaler.state_dict(), epoch=epoch, rng=rng_state(), history=self.history,
            best={**self.stopper.state_dict(), "model_version": self.best_version},
            data_order={"seed": cfg.seed, "next_epoch": epoch + 1}, config=cfg.to_dict()))
