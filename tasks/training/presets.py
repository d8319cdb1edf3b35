"""Training configuration: one dataclass, named presets, and ``field=value`` overrides.

``paper`` is METHOD.md's setting (Inception-V3 from ImageNet, SGD momentum 0.9, lr 1e-3 x0.95 every
10 epochs, 100 epochs; stage 2 its own ``mpemd_*`` schedule: 10 epochs at lr 1e-3); ``cpu`` is the
demo's (efficientnet_lite0 with ImageNet weights from the pip package); ``cpu-smoke`` trains a tiny MobileNetV3 from scratch on small images in about a minute.
Every field can be overridden (``--set lr=0.01``); strings are converted to the field's type.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

# Fields only stage 2 reads (MPEMD, and NIMA continued for its budget): a stage-1 run is the same run
# whatever they are (flows/reproduce.py hashes the rest into stage 1's run id)
STAGE2_FIELDS = frozenset({"mpemd_epochs", "mpemd_lr", "mpemd_avg_lr", "nima_continue_lr", "mpemd_lr_step_epochs",
                           "mpemd_lr_gamma", "loss", "k", "gamma", "eps", "detach_weight", "eval_patch_mode",
                           "patch_seed"})
LOWER_IS_BETTER = frozenset({"loss", "emd2", "emd1", "mse", "mae", "rmse"})
HIGHER_IS_BETTER = frozenset({"lcc", "srcc", "accuracy", "std_lcc"})


@dataclass(frozen=True)
class Schedule:
    """How long a run trains and its step decay: lr * lr_gamma every lr_step_epochs epochs."""

    epochs: int
    lr: float
    lr_step_epochs: int
    lr_gamma: float


@dataclass(frozen=True)
class TrainConfig:
    # model
    backbone: str = "inception_v3"
    weights: str = "imagenet"  # imagenet | none | path to a weights file (stage 1 only)
    image_size: int | None = None  # override the backbone's input size; resize scales as 342/299
    freeze_backbone: bool = False  # train the new head only (backbone fixed, BatchNorm in eval mode)
    train_blocks: int = 0  # 0 = the whole trunk trains; N > 0 = only its last N blocks (tasks/training/setup.py)
    trunk_lr_scale: float = 1.0  # the trunk's learning rate is lr * trunk_lr_scale (the head's is lr)
    head_dropout: float = 0.75  # NIMA's dropout before its last layer; the trunk's own dropout is removed
    # optimisation (METHOD.md)
    epochs: int = 100
    batch_size: int = 32  # images per step and rank (MPEMD: each brings n_patches patches); the paper is silent
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_step_epochs: int = 10
    lr_gamma: float = 0.95
    # stage 2's own schedule (MPEMD, and the NIMA run continued for the same budget). The seed's text
    # stops before its stage-2 settings; ours: 10 epochs (x |P| = 8 patches: about stage 1's compute)
    # from the converged stage 1, at stage 1's lr and decay (MPEMD_ada's gradients are already ~10x
    # smaller than EMD's at typical patch EMDs, so the same lr is a fine-tuning step). See README.
    mpemd_epochs: int = 10
    mpemd_lr: float = 1e-3
    # MPEMD_avg's own stage-2 lr (none: mpemd_lr): its gradients are ~9x MPEMD_ada's at typical patch
    # EMDs, so each loss is compared at its own best lr (benchmarks/lr_sweep.py)
    mpemd_avg_lr: float | None = None
    # NIMA continued for stage 2's budget (the equal-budget baseline) at its own best lr (none: lr);
    # swept like the MPEMD losses (benchmarks/lr_sweep.py --losses nima)
    nima_continue_lr: float | None = None
    mpemd_lr_step_epochs: int = 10
    mpemd_lr_gamma: float = 0.95
    # MPEMD (stage 2)
    n_patches: int = 8
    loss: str = "ada"  # ada | avg
    k: float = 1.2
    gamma: float = 0.4
    eps: float = 1e-6
    detach_weight: bool = False
    eval_patch_mode: str = "random"  # random (seeded per image) | grid
    patch_seed: int = 0
    # selection and stopping
    best_metric: str = "emd2"
    early_stopping_patience: int = 0  # epochs without val improvement before stopping; 0 = never
    # data
    num_workers: int = 4  # loader processes; -1 = auto (``auto_workers``)
    mp_context: str = ""  # "" (platform default) | fork | spawn | forkserver
    max_train_samples: int = 0  # 0 = all; a cap for smoke runs
    max_val_samples: int = 0
    eval_batch_size: int = 0  # 0 = batch_size
    # devices
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "auto"  # auto (bf16 on CUDA if supported, else fp16; none on CPU) | bf16 | fp16 | none
    channels_last: bool = True
    compile: bool = False
    cudnn_benchmark: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        checks = {
            "loss": (self.loss, ("ada", "avg")),
            "eval_patch_mode": (self.eval_patch_mode, ("random", "grid")),
            "amp": (self.amp, ("auto", "bf16", "fp16", "none")),
            "mp_context": (self.mp_context, ("", "fork", "spawn", "forkserver")),
        }
        if self.num_workers < -1:
            raise ValueError(f"num_workers must be >= 0, or -1 for auto; got {self.num_workers}")
        for name, (value, allowed) in checks.items():
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if self.best_metric not in LOWER_IS_BETTER | HIGHER_IS_BETTER:
            raise ValueError(f"best_metric {self.best_metric!r} is not one of "
                             f"{sorted(LOWER_IS_BETTER | HIGHER_IS_BETTER)}")
        if min(self.epochs, self.mpemd_epochs, self.batch_size, self.n_patches) < 1:
            raise ValueError("epochs, mpemd_epochs, batch_size and n_patches must be >= 1")
        if self.train_blocks < 0 or self.trunk_lr_scale < 0:
            raise ValueError("train_blocks and trunk_lr_scale must be >= 0")
        if not 0.0 <= self.head_dropout < 1.0:
            raise ValueError(f"head_dropout must be in [0, 1), got {self.head_dropout}")

    @property
    def best_mode(self) -> str:
        return "min" if self.best_metric in LOWER_IS_BETTER else "max"

    def schedule(self, method: str, continued: bool = False) -> Schedule:
        """The epochs and learning-rate schedule of a run.

        Stage 1 from the backbone's weights: ``epochs`` at ``lr``. Stage 2 (mpemd): its own
        ``mpemd_*`` schedule (``mpemd_avg_lr`` when the loss is avg and it is set). NIMA continued
        from a checkpoint (``continued``): ``nima_continue_lr`` (none: stage 1's lr) with stage 1's decay
        for exactly ``mpemd_epochs`` epochs, the equal-budget baseline of stage 2.
        """
        if method == "mpemd":
            lr = self.mpemd_avg_lr if self.loss == "avg" and self.mpemd_avg_lr is not None else self.mpemd_lr
            return Schedule(self.mpemd_epochs, lr, self.mpemd_lr_step_epochs, self.mpemd_lr_gamma)
        if continued:
            lr = self.nima_continue_lr if self.nima_continue_lr is not None else self.lr
            return Schedule(self.mpemd_epochs, lr, self.lr_step_epochs, self.lr_gamma)
        return Schedule(self.epochs, self.lr, self.lr_step_epochs, self.lr_gamma)

    def arm_lr(self, arm: str) -> float:
        """The stage-2-budget learning rate of one protocol arm: ``nima`` (continued), ``ada``, ``avg``."""
        if arm == "nima":
            return self.schedule("nima", continued=True).lr
        return dataclasses.replace(self, loss=arm).schedule("mpemd").lr

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, TrainConfig] = {
    "paper": TrainConfig(),
    # cpu: fine-tunes the last 4 trunk blocks at a tenth of the head's lr (the head needs a large lr:
    # at the paper's 1e-3 a fresh head barely moves in 10 epochs of a small set); measured on real
    # photographs with benchmarks/real_photos.py; stage 2 at each loss's best lr there
    # (benchmarks/lr_sweep.py: MPEMD_ada 0.32, MPEMD_avg 0.02; README "Presets"); NIMA continued at 0.08,
    # its best of 0.005/0.02/0.08/0.32 by validation EMD in benchmarks/lr_sweep.py --losses nima on the
    # small demo's data (no real-photo sweep of it yet; `reproduce --tune-lr` chooses on any data).
    # Loader workers: auto (one; none on one core): see auto_workers.
    "cpu": TrainConfig(backbone="efficientnet_lite0", weights="imagenet", epochs=10, batch_size=32, lr=0.02,
                       train_blocks=4, trunk_lr_scale=0.1, num_workers=-1, n_patches=4, mpemd_epochs=5,
                       mpemd_lr=0.32, mpemd_avg_lr=0.02, nima_continue_lr=0.08, head_dropout=0.2),
    "cpu-smoke": TrainConfig(backbone="mobilenet_v3_small", weights="none", image_size=96, epochs=3,
                             batch_size=16, lr=1e-2, num_workers=0, n_patches=4, mpemd_epochs=3, mpemd_lr=1e-2,
                             head_dropout=0.2),
}


def auto_workers(cpu_count: int | None = None) -> int:
    """``num_workers=-1``: one loader worker when there are two cores or more, else none.

    On CPU the data path (fetch, decode, resize, crop) runs ~20x faster than the training step
    (cpu preset, docs/performance.md), so one worker hides it behind the step; each further worker
    is one more process (fork, memory, its share of the cores) with nothing left to hide. A GPU run
    needs more (the ``paper`` preset sets 4).
    """
    cores = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    return 1 if cores >= 2 else 0


def list_presets() -> list[str]:
    return sorted(PRESETS)


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _coerce(name: str, value: Any, annotation: Any) -> Any:
    """Convert ``value`` (often a string from the command line) to the field's type."""
    args = typing.get_args(annotation)
    is_optional = (typing.get_origin(annotation) in (typing.Union, types.UnionType)) and type(None) in args
    if is_optional:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            return None
        annotation = next(a for a in args if a is not type(None))
    if annotation is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"{name}: expected a boolean, got {value!r}")
    if annotation in (int, float):
        if isinstance(value, bool):
            raise ValueError(f"{name}: expected {annotation.__name__}, got a boolean")
        try:
            number = float(value) if annotation is float else int(str(value), 0) if isinstance(value, str) else value
        except ValueError:
            raise ValueError(f"{name}: expected {annotation.__name__}, got {value!r}") from None
        if annotation is int and (not isinstance(number, int) and float(number) != int(number)):
            raise ValueError(f"{name}: expected an integer, got {value!r}")
        return annotation(number)
    return str(value)


def parse_overrides(items: Iterable[str]) -> dict[str, str]:
    """``["lr=0.01", "epochs=5"]`` -> ``{"lr": "0.01", "epochs": "5"}``."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"override {item!r} is not field=value")
        out[name.strip()] = value.strip()
    return out


def resolve_config(preset: str, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """The preset with ``overrides`` applied (unknown fields and bad values raise ``ValueError``)."""
    try:
        base = PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown preset {preset!r}; choose from {list_presets()}") from None
    types_ = _field_types()
    changes = {}
    for name, value in (overrides or {}).items():
        if name not in types_:
            raise ValueError(f"unknown config field {name!r}; fields: {sorted(types_)}")
        changes[name] = _coerce(name, value, types_[name])
    return dataclasses.replace(base, **changes)


def config_from_dict(data: Mapping[str, Any]) -> TrainConfig:
    """Rebuild a config saved with ``to_dict`` (unknown keys from newer versions are ignored)."""
    types_ = _field_types()
    return TrainConfig(**{k: _coerce(k, v, types_[k]) for k, v in data.items() if k in types_})
