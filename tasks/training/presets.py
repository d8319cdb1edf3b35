"""Training configuration: one pydantic model, named presets, and ``field=value`` overrides.

``paper`` is METHOD.md's setting (Inception-V3 from ImageNet, SGD momentum 0.9, lr 1e-3 x0.95 every
10 epochs, 100 epochs; stage 2 its own ``mpemd_*`` schedule: 10 epochs at lr 1e-3); ``cpu`` is the
demo's (efficientnet_lite0 with ImageNet weights from the pip package); ``cpu-smoke`` trains a tiny MobileNetV3 from scratch on small images in about a minute.
Every field can be overridden (``--epochs 5`` or ``--set lr=0.01``): ``TrainConfig`` is the one
declaration of a training setting. ``overrides_model`` derives from it the model of a run's changes
(every field optional, unset = the preset's), which the flows' parameters, the ``mpemd`` command line
and ``python -m tasks.training`` are generated from; pydantic converts and checks the values.
"""

from __future__ import annotations

import functools
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from model.patch_modes import PatchMode
from tasks.core.cli_args import CliSpec

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


AtLeastOne = Annotated[int, Field(ge=1)]
NonNegative = Annotated[int, Field(ge=0)]


class TrainConfig(BaseModel):
    """A training run's settings (METHOD.md). One line per field: its type, default and why."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # model
    backbone: str = "inception_v3"
    weights: str = "imagenet"  # imagenet | none | path to a weights file (stage 1 only)
    image_size: int | None = None  # override the backbone's input size; resize scales as 342/299
    freeze_backbone: bool = False  # train the new head only (backbone fixed, BatchNorm in eval mode)
    train_blocks: NonNegative = 0  # 0 = the whole trunk trains; N > 0 = only its last N blocks (tasks/training/setup.py)
    trunk_lr_scale: Annotated[float, Field(ge=0)] = 1.0  # the trunk's learning rate is lr * trunk_lr_scale (the head's is lr)
    head_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.75  # NIMA's dropout before its last layer; the trunk's own dropout is removed
    # optimisation (METHOD.md)
    epochs: AtLeastOne = 100
    batch_size: AtLeastOne = 32  # images per step and rank (MPEMD: each brings n_patches patches); the paper is silent
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    lr_step_epochs: int = 10
    lr_gamma: float = 0.95
    # stage 2's own schedule (MPEMD, and the NIMA run continued for the same budget). The seed's text
    # stops before its stage-2 settings; ours: 10 epochs (x |P| = 8 patches: about stage 1's compute)
    # from the converged stage 1, at stage 1's lr and decay (MPEMD_ada's gradients are already ~10x
    # smaller than EMD's at typical patch EMDs, so the same lr is a fine-tuning step). See README.
    mpemd_epochs: AtLeastOne = 10
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
    n_patches: AtLeastOne = 8
    loss: Literal["ada", "avg"] = "ada"
    k: float = 1.2
    gamma: float = 0.4
    eps: float = 1e-6
    detach_weight: bool = False
    eval_patch_mode: PatchMode = "random"  # random: seeded per image
    patch_seed: int = 0
    # selection and stopping
    best_metric: str = "emd2"
    early_stopping_patience: int = 0  # epochs without val improvement before stopping; 0 = never
    # data
    num_workers: Annotated[int, Field(ge=-1)] = 4  # loader processes; -1 = auto (``auto_workers``)
    mp_context: Literal["", "fork", "spawn", "forkserver"] = ""  # "": the platform's default
    max_train_samples: int = 0  # 0 = all; a cap for smoke runs
    max_val_samples: int = 0
    eval_batch_size: int = 0  # 0 = batch_size
    # devices
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: Literal["auto", "bf16", "fp16", "none"] = "auto"  # auto: bf16 on CUDA if supported, else fp16; none on CPU
    channels_last: bool = True
    compile: bool = False
    cudnn_benchmark: bool = True
    seed: int = 0

    @field_validator("best_metric")
    @classmethod
    def _known_metric(cls, value: str) -> str:
        if value not in LOWER_IS_BETTER | HIGHER_IS_BETTER:
            raise ValueError(f"best_metric {value!r} is not one of {sorted(LOWER_IS_BETTER | HIGHER_IS_BETTER)}")
        return value

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
        return self.model_copy(update={"loss": arm}).schedule("mpemd").lr

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()


# Every swept stage-2 learning rate, in one place: each arm's best by validation EMD with
# benchmarks/lr_sweep.py (sweeps and commands: docs/results.md "Learning rates", docs/performance.md).
# They differ by data, so each set is named by the data it was swept on; `reproduce --tune-lr`
# chooses them again on any other data.
STAGE2_LRS: dict[str, dict[str, float]] = {
    # 3,000 real photographs in AVA's format (benchmarks/real_photos.py); NIMA continued: swept on
    # the synthetic set only (below), the one rate this set borrows.
    "real_photos": {"mpemd_lr": 0.32, "mpemd_avg_lr": 0.02, "nima_continue_lr": 0.08},
    # The synthetic AVA of the embedded demo (tasks/ingest/synth.py), small size, seed 0.
    "synthetic": {"mpemd_lr": 0.08, "mpemd_avg_lr": 0.02, "nima_continue_lr": 0.08},
}

PRESETS: dict[str, TrainConfig] = {
    "paper": TrainConfig(),
    # cpu: fine-tunes the last 4 trunk blocks at a tenth of the head's lr (a fresh head needs a large
    # lr to move in a few epochs); each stage-2 arm (both MPEMD losses, NIMA continued) at its own lr,
    # chosen by validation EMD with benchmarks/lr_sweep.py (the sweeps: docs/results.md, docs/method.md
    # "Presets"); `reproduce --tune-lr` chooses them on any data. Loader workers: see auto_workers.
    "cpu": TrainConfig(backbone="efficientnet_lite0", weights="imagenet", epochs=10, batch_size=32, lr=0.02,
                       train_blocks=4, trunk_lr_scale=0.1, num_workers=-1, n_patches=4, mpemd_epochs=5,
                       **STAGE2_LRS["real_photos"], head_dropout=0.2),
    "cpu-smoke": TrainConfig(backbone="mobilenet_v3_small", weights="none", image_size=96, epochs=3,
                             batch_size=16, lr=1e-2, num_workers=0, n_patches=4, mpemd_epochs=3, mpemd_lr=1e-2,
                             head_dropout=0.2),
}


def auto_workers(cpu_count: int | None = None) -> int:
    """``num_workers=-1``: one loader worker when there are two cores or more, else none.

    On CPU the data path (fetch, decode, resize, crop) is much faster than the training step (cpu
    preset, docs/performance.md), so one worker hides it behind the step; each further worker
    is one more process (fork, memory, its share of the cores) with nothing left to hide. A GPU run
    needs more (the ``paper`` preset sets 4).
    """
    cores = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    return 1 if cores >= 2 else 0


def list_presets() -> list[str]:
    return sorted(PRESETS)


# A run's changes to a preset: every TrainConfig field, optional. Unset (None) keeps the preset's value;
# a field that may itself be None (image_size, mpemd_avg_lr) is cleared with the word "none".
CLEAR = "none"


@functools.cache
def overrides_model(config: type[TrainConfig] = TrainConfig) -> type[BaseModel]:
    """The model of changes to ``config``, derived field by field (never declared twice)."""
    fields: dict[str, Any] = {}
    for name, info in config.model_fields.items():
        annotation = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        if _allows_none(info.annotation):
            annotation = annotation | Literal["none"]  # type: ignore[operator]
        default = info.get_default(call_default_factory=True)
        fields[name] = (annotation | None, Field(None, description=f"{config.__name__}.{name} "
                                                 f"(the paper preset's: {default})"))
    return create_model(f"{config.__name__}Overrides", __config__=ConfigDict(extra="forbid"), **fields)


def _allows_none(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in typing.get_args(annotation)


def changes(overrides: BaseModel | Mapping[str, Any] | None,
            config: type[TrainConfig] = TrainConfig) -> dict[str, Any]:
    """The fields an overrides model (or a plain mapping) sets; "none" is read as None only for a field
    that may be None (``amp=none`` stays the word: it is one of amp's choices)."""
    if overrides is None:
        return {}
    items = overrides.model_dump(exclude_none=True) if isinstance(overrides, BaseModel) else dict(overrides)
    fields = config.model_fields
    return {k: None if (isinstance(v, str) and v.lower() in (CLEAR, "null") and k in fields
                        and _allows_none(fields[k].annotation)) else v
            for k, v in items.items()}


def resolve_config(preset: str, overrides: BaseModel | Mapping[str, Any] | None = None,
                   config: type[TrainConfig] = TrainConfig) -> TrainConfig:
    """The preset with ``overrides`` applied; unknown fields and bad values raise ``ValueError``
    (pydantic's, one line per field)."""
    try:
        base = PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown preset {preset!r}; choose from {list_presets()}") from None
    try:
        return config.model_validate({**base.model_dump(), **changes(overrides, config)})
    except ValidationError as error:
        raise ValueError(settings_error(error)) from None


def settings_error(error: ValidationError) -> str:
    """``--set`` style, one line: ``epochs='five': Input should be a valid integer ...``."""
    return "; ".join(f"{'.'.join(map(str, e['loc']))}={e['input']!r}: {e['msg']}" for e in error.errors())


TrainOverrides = overrides_model(TrainConfig)


class TrainParams(BaseModel):
    """A training run (both stages): METHOD.md's settings by preset, changed by overrides. The
    flows' parameters (flows/params.py) and ``python -m tasks.training``'s command line."""

    model_config = ConfigDict(extra="forbid")
    config_model: ClassVar[type[TrainConfig]] = TrainConfig

    root: str = Field("./data", description="data root URL: reads {root}/manifests, writes {root}/runs/<run_id>")
    preset: str = Field("cpu-smoke", description=f"training preset, one of {list_presets()}")
    overrides: TrainOverrides = Field(default_factory=TrainOverrides,  # type: ignore[valid-type]
                                      description="TrainConfig fields to change; unset: the preset's")
    run_id: str | None = Field(None, description="run folder name; an existing run resumes from its last "
                               "checkpoint (default: derived from the flow run, so a retry resumes)")
    resume: bool = Field(True, description="resume from {run_dir}/checkpoint-last.pt when it exists")

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        if value not in PRESETS:
            raise ValueError(f"unknown preset {value!r}; choose from {list_presets()}")
        return value

    def config(self) -> TrainConfig:
        """The preset with this run's overrides."""
        return resolve_config(self.preset, self.overrides, self.config_model)

    @classmethod
    def for_config(cls, config: type[TrainConfig]) -> type[TrainParams]:
        """This model over another config model (a subclass of ``TrainConfig``): its overrides field,
        and so the CLI, the flow's form and ``config()``, follow that model's fields."""
        info = cls.model_fields["overrides"]
        derived = create_model(cls.__name__, __base__=cls, __doc__=cls.__doc__, __module__=cls.__module__,
                               overrides=(overrides_model(config), Field(default_factory=overrides_model(config),
                                                                         description=info.description)))
        derived.config_model = config
        return derived


class TrainEntryParams(TrainParams):
    """Train NIMA (stage 1) or MPEMD (stage 2) without Prefect; the same entry point works under
    torchrun (``python -m tasks.training``)."""

    method: Literal["nima", "mpemd"] = Field(description="nima: stage 1 (or NIMA continued, with --init); "
                                             "mpemd: stage 2")
    init: str | None = Field(None, description="stage-1 run id, checkpoint URL or 'latest': stage 2's start, "
                             "or for nima the run to continue for mpemd_epochs epochs")


# The command line of a training run, for ``mpemd train-*`` and ``python -m tasks.training`` alike:
# ``--epochs 5`` for each TrainConfig field, and ``--set epochs=5`` for any of them.
TRAIN_CLI = CliSpec(positional=("method",), flags={"overrides": "--set"}, flatten=("overrides",))


def config_from_dict(data: Mapping[str, Any], config: type[TrainConfig] = TrainConfig) -> TrainConfig:
    """Rebuild a config saved with ``to_dict`` (unknown keys from newer versions are ignored)."""
    return config.model_validate({k: v for k, v in data.items() if k in config.model_fields})
