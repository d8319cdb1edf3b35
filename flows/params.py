"""The flows' parameters: one pydantic model per flow, the one definition of each setting.

A model is three things at once: the flow's keyword parameters (``@one_parameter_per_field`` below
gives the flow one typed parameter per field, Prefect's convention: ``prefect deployment run --param k=v`` merges
per key and the UI shows a form), the validation of those values, and the ``mpemd`` command line
(``tasks/core/cli_args.py`` builds each subcommand from ``model_fields``). This module imports neither
torch nor Prefect, so ``mpemd --help`` and argument errors answer at once.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from model.aspect_bins import ASPECT_BIN_EDGES, TYPICAL_ASPECT_BIN, format_edges, parse_edges
from model.patch_modes import PATCH_MODES, PatchMode
from tasks.analysis.bootstrap import HEADLINE_MIN_N
from tasks.ingest.settings import IngestParams
from tasks.scoring.settings import ScoringKnobs
from tasks.training.presets import STAGE2_LRS, TrainOverrides, TrainParams, list_presets, settings_error

OverrideValue = str | int | float | bool | None


class FlowParams(BaseModel):
    """Base of the flows' parameter models: unknown names are errors (a typo must not pass silently)."""

    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------------------------------
# The flow signature


P = TypeVar("P", bound=BaseModel)
R = TypeVar("R")


def _parameter(name: str, info: FieldInfo) -> inspect.Parameter:
    annotation = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
    default = (Field(description=info.description) if info.is_required()
               else Field(info.get_default(call_default_factory=True), description=info.description))
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)


def one_parameter_per_field(model: type[P]) -> Callable[[Callable[[P], R]], Callable[..., R]]:
    """Turn ``body(params: Model)`` into a function of one keyword parameter per field of ``Model``.

    Prefect reads the generated signature (types, defaults, descriptions) for the parameter schema
    and the UI form; the call validates the values with ``Model`` and hands ``body`` the model.
    Callers holding a model write ``flow(**params.model_dump())``.
    """

    def wrap(body: Callable[[P], R]) -> Callable[..., R]:
        @functools.wraps(body)
        def with_settings(**settings: Any) -> R:
            # Prefect may pass a signature default through unresolved; the model's default applies.
            given = {k: (v.default if isinstance(v, FieldInfo) else v) for k, v in settings.items()}
            return body(model(**{k: v for k, v in given.items() if v is not PydanticUndefined}))

        del with_settings.__wrapped__  # inspect.signature must see the generated one, not body's
        with_settings.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
            [_parameter(name, info) for name, info in model.model_fields.items()],
            return_annotation=inspect.signature(body).return_annotation)
        with_settings.params_model = model  # type: ignore[attr-defined]
        return with_settings

    return wrap


# ---------------------------------------------------------------------------------------------
# The models, one per flow (IngestParams lives in tasks/ingest/settings.py: tasks.ingest.pipeline reads it too)


class SynthAvaParams(FlowParams):
    """Write a synthetic AVA-format dataset: labels, JPEGs and their generative parameters
    (tasks/ingest/synth.py documents the rule)."""

    out: str = Field(description="output URL: {out}/AVA.txt, {out}/images/<id>.jpg, {out}/synth_params.parquet")
    n: int = Field(2000, ge=1, description="number of images")
    seed: int = Field(0, description="seed: the same seed gives the same dataset")
    workers: int | None = Field(None, ge=1, description="render processes (default: CPU count, at most 8)")


class TrainFlowParams(TrainParams):
    """A training flow's parameters: the run's (``TrainParams``, also the torchrun entry's) plus what
    only a flow does before training."""

    synth_if_missing: int = Field(0, ge=0, description="a root with no ingested dataset: synthesize and ingest this "
                                  "many images first (a set-up check, not a result; the smoke deployments set "
                                  "it; stage 2 then also trains its stage 1); 0: refuse, saying what to run")


class TrainNimaParams(TrainFlowParams):
    """Stage 1: train NIMA on {root}/manifests/train.parquet, validate on val.parquet, write
    {root}/runs/<run_id>. Backbone and weights come from the preset and the overrides, unless init
    continues a trained model (the NIMA baseline with stage 2's training budget)."""

    init: str | None = Field(None, description="continue a trained model for exactly mpemd_epochs epochs: a run "
                             "id under {root}/runs, a checkpoint URL, or 'latest' (the newest nima run); "
                             "none: stage 1 from the backbone's weights")


class TrainMpemdParams(TrainFlowParams):
    """Stage 2: fine-tune MPEMD from stage-1 weights, validate with seeded patches, write
    {root}/runs/<run_id>."""

    init: str = Field("latest", description="stage-1 weights: a run id under {root}/runs, a checkpoint URL, "
                      "or 'latest' (the newest nima run under {root}/runs)")


class ScoreBucketParams(ScoringKnobs):
    """Score every new or changed image of a bucket (folder/prefix, glob or manifest) into Parquet parts
    {out}/model_version=<v>/date=<d>/part-*.parquet. A rerun over an unchanged bucket does no model
    work; a killed run leaves only whole shards, and its rerun scores exactly what is missing. Unset
    method/patch settings come from the checkpoint's metadata (how it was trained)."""

    source: str = Field(description="folder/prefix, glob or manifest Parquet: any fsspec URL")
    checkpoint: str = Field(description="checkpoint URL (local path, s3://...)")
    out: str = Field(description="predictions root; parts go to {out}/model_version=<v>/date=<d>/")
    method: Literal["nima", "mpemd"] | None = Field(None, description="model head; default: the checkpoint's")
    patch_mode: PatchMode | None = Field(
        None, description="MPEMD patch placement; default: the checkpoint's, else random")
    n_patches: int | None = Field(None, ge=1, le=256, description="|P|; default: the checkpoint's, else 8")
    patch_seed: int | None = Field(None, description="seed of the random patches; default: the checkpoint's")
    shard_size: int = Field(1000, ge=1, description="images per shard: the unit of commit and of fan-out")
    dask_address: str | None = Field(None, description="tcp://scheduler:8786 to fan shards out to a cluster")
    use_local_dask: bool = Field(False, description="start a local Dask cluster for the shards")
    dask_workers: int = Field(2, ge=1, description="workers of the local Dask cluster")
    dask_processes: bool = Field(True, description="local Dask workers as processes (else threads)")
    date: str | None = Field(None, description="date= partition (YYYY-MM-DD); default today in UTC")
    shard_retries: int = Field(2, ge=0, description="retries of a failed shard (a retry skips committed parts)")
    lock_wait_s: float = Field(0.0, ge=0, description="wait this long for another run holding the output, "
                               "then refuse (tasks/scoring/output_lock.py)")
    compact: bool = Field(True, description="merge this run's date= partition into one file at the end of "
                          "the run, inside the output lock (tasks/scoring/compaction.py)")

    @field_validator("date")
    @classmethod
    def _iso_date(cls, value: str | None) -> str | None:
        import datetime as dt

        return dt.date.fromisoformat(value).isoformat() if value else value


class CompactParams(FlowParams):
    """Merge the part files of each date= partition of a predictions root into one Parquet file
    (rows unchanged, sources deleted after the merged file is committed), under the output lock, as
    ``mpemd score`` does at the end of each run. For outputs written before that, or with --no-compact.
    An interrupted earlier compaction is finished first. Prints a JSON summary."""

    out: str = Field(description="predictions root: {out}/model_version=<v>/date=<d>/part-*.parquet")
    model_version: str | None = Field(None, description="compact this model version only; default all")
    lock_wait_s: float = Field(0.0, ge=0, description="wait this long for a run holding the output, "
                               "then refuse (tasks/scoring/output_lock.py)")


class PredictionSetChoice(BaseModel):
    """One side of the comparison: a model version, narrowed to one prediction set where it has several."""

    model_config = ConfigDict(extra="forbid")

    model_version: str = Field(description="model_version= partition (checkpoint hash) of the predictions")
    label: str = Field(description="name in the report, e.g. NIMA")
    model: str | None = Field(None, description="model column to keep (nima, mpemd); default any")
    patch_mode: str | None = Field(None, description="patch mode to keep (warp, random, grid); default any")
    n_patches: int | None = Field(None, ge=1, description="patch count to keep; default any")


class AnalyzeErrorsParams(FlowParams):
    """The paper's error table by aspect ratio, NIMA against MPEMD, as a report: per-bin errors of each
    prediction set, the comparison, histograms and the worst predictions, written as PNG plots and
    {root}/reports/<report_name>/report.md (and as Prefect artifacts)."""

    root: str = Field(description="data root holding manifests/ and predictions/ (local path or URL)")
    report_name: str = Field("errors", description="the report goes to {root}/reports/<report_name>/")
    nima: PredictionSetChoice = Field(description="the NIMA side (label defaults to NIMA)")
    mpemd: PredictionSetChoice = Field(description="the MPEMD side (label defaults to MPEMD)")
    split: str | None = Field("test", description="manifest split to judge on ('all' or none: every split)")
    # Text, not a list of floats: the open last edge "inf" does not survive JSON parameter storage.
    bin_edges: str = Field(format_edges(ASPECT_BIN_EDGES),
                           description="aspect-ratio (height/width) bin edges, comma separated; inf allowed")
    typical_bin: str = Field(TYPICAL_ASPECT_BIN, description="the bin whose MAE decrease is the unit")
    worst_n: int = Field(20, ge=0, description="largest errors listed per model")
    scatter_n: int = Field(5000, ge=1, description="most points in the predicted-vs-true scatter")
    headline_min_n: int = Field(HEADLINE_MIN_N, ge=1, description="fewest images of a bin in the headline ratio")

    @model_validator(mode="before")
    @classmethod
    def _default_labels(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            for side in ("nima", "mpemd"):
                if isinstance(data.get(side), dict) and "label" not in data[side]:
                    data[side] = {**data[side], "label": side.upper()}
            if data.get("split") == "all":
                data["split"] = None
        return data

    @field_validator("report_name")
    @classmethod
    def _one_path_segment(cls, value: str) -> str:
        import re

        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value) or ".." in value:
            raise ValueError("report_name must be one path segment of letters, digits, '.', '_' or '-'")
        return value

    @field_validator("bin_edges")
    @classmethod
    def _valid_edges(cls, value: str) -> str:
        from tasks.analysis.sql import check_bin_edges  # DuckDB/pyarrow: only when a value is checked

        check_bin_edges(parse_edges(value))  # raises ValueError on bad edges
        return value


class ReproduceParams(FlowParams):
    """The fair protocol end to end: [synth-ava] -> ingest-ava -> train-nima -> from it, for stage 2's
    epochs each: NIMA continued (equal budget), MPEMD_ada, MPEMD_avg -> score-bucket over the test split
    (rows nima, nima_equal_budget, nima_patches_<mode>, mpemd_ada_<mode>, mpemd_avg_<mode>) ->
    analyze-errors and paired-bootstrap intervals. With no labels it first synthesizes a dataset.
    Reruns reuse finished steps."""

    root: str = Field("./data/reproduce", description="data root for every step's outputs")
    labels: str | None = Field(None, description="AVA.txt-format labels URL; none: synthesize a dataset first")
    images: str | None = Field(None, description="images folder URL or {image_id} template (with labels)")
    synth_n: int = Field(1500, ge=10, description="images to synthesize when no labels are given")
    synth_seed: int = Field(0, description="seed of the synthetic dataset")
    split_seed: int = Field(0, description="seed of the id hash that assigns splits")
    split_fractions: tuple[float, float, float] = Field(
        (0.6, 0.1, 0.3), description="train/val/test; the paper's AVA split is 0.92/0.04/0.04")
    preset: str = Field("cpu", description=f"training preset for both stages, one of {list_presets()}")
    overrides: dict[str, OverrideValue] = Field(default_factory=dict,
                                                description="TrainConfig fields for both stages")
    mpemd_overrides: dict[str, OverrideValue] = Field(default_factory=dict,
                                                      description="TrainConfig fields for stage 2 only")
    n_patches: int = Field(8, ge=1, description="|P| at prediction")
    patch_modes: list[PatchMode] = Field(list(PATCH_MODES), description="MPEMD prediction modes scored and reported")
    score_batch_size: int = Field(32, ge=1, description="images per forward pass while scoring")
    score_workers: int = Field(0, ge=0, description="decoding processes while scoring")
    report_name: str = Field("reproduce", description="report folder under {root}/reports/")
    fresh: bool = Field(False, description="delete the derived folders under root first")
    tune_lr: bool = Field(False, description="choose each stage-2-budget arm's lr (NIMA continued, MPEMD_ada, "
                                             "MPEMD_avg) from tune_lrs by validation EMD")
    tune_lrs: list[float] = Field([0.02, 0.08, 0.32], min_length=1,
                                  description="learning rates tried per arm with tune_lr")

    @field_validator("overrides", "mpemd_overrides")
    @classmethod
    def _train_settings(cls, value: dict[str, OverrideValue]) -> dict[str, OverrideValue]:
        try:  # unknown names and bad values fail here, not mid-run
            TrainOverrides.model_validate(value)
        except ValidationError as error:
            raise ValueError(settings_error(error)) from None
        return value  # as given: the run ids hash them


# The embedded default (``make demo``): sizes that finish on 2 CPU cores. The backbone is the
# `cpu` preset's ImageNet-pretrained efficientnet_lite0, fine-tuned: its last 4 blocks train at a
# tenth of the head's learning rate, the rest stays frozen (trunk BatchNorm statistics fixed);
# stage 2 trains each arm (both MPEMD losses, NIMA continued) at its best lr on this synthetic data
# (presets.STAGE2_LRS["synthetic"]; the cpu preset's own are its best on real photographs).
# protocol.md prints every arm's lr as run.
DEMO_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"synth_n": 160, "overrides": {"image_size": 96, "epochs": 1, "n_patches": 2},
             "mpemd_epochs": 1, "n_patches": 4},
    "small": {"synth_n": 1500, "overrides": {"image_size": 112, "epochs": 4, "n_patches": 4},
              "mpemd_epochs": 2, "n_patches": 8},
    "medium": {"synth_n": 3000, "overrides": {"image_size": 160, "epochs": 6, "n_patches": 4},
               "mpemd_epochs": 3, "n_patches": 8},
    "large": {"synth_n": 8000, "overrides": {"image_size": 224, "epochs": 10, "n_patches": 8},
              "mpemd_epochs": 4, "n_patches": 8},
}
DEMO_COMMON_OVERRIDES: dict[str, OverrideValue] = {
    "train_blocks": 4, "trunk_lr_scale": 0.1, "lr": 0.02, "lr_step_epochs": 100,
    "mpemd_lr": STAGE2_LRS["synthetic"]["mpemd_lr"], "mpemd_avg_lr": STAGE2_LRS["synthetic"]["mpemd_avg_lr"],
    "mpemd_lr_step_epochs": 100, "batch_size": 32, "num_workers": 0,
}


class DemoParams(FlowParams):
    """The whole pipeline on a synthetic AVA (the embedded default): the reproduce flow at one of the
    demo sizes."""

    size: Literal["tiny", "small", "medium", "large"] = Field(
        "small", description="small: minutes on 2 CPU cores; medium/large: longer, clearer")
    root: str = Field("./data/demo", description="where everything is written")
    seed: int = Field(0, description="seed of the data, the split and the training")
    fresh: bool = Field(False, description="start over instead of reusing finished steps")


def demo_params(size: str, root: str = "./data/demo", seed: int = 0, fresh: bool = False) -> ReproduceParams:
    """The embedded default at one of ``DEMO_SIZES``."""
    spec = DEMO_SIZES[size]
    return ReproduceParams(
        root=root, synth_n=spec["synth_n"], synth_seed=seed, split_seed=seed,
        overrides={**DEMO_COMMON_OVERRIDES, **spec["overrides"], "seed": seed},
        mpemd_overrides={"mpemd_epochs": spec["mpemd_epochs"]}, n_patches=spec["n_patches"],
        report_name=f"demo-{size}", fresh=fresh,
    )


__all__ = [
    "DEMO_COMMON_OVERRIDES", "DEMO_SIZES", "AnalyzeErrorsParams", "DemoParams", "FlowParams", "IngestParams",
    "OverrideValue", "PredictionSetChoice", "ReproduceParams", "ScoreBucketParams", "SynthAvaParams",
    "TrainFlowParams", "TrainMpemdParams", "TrainNimaParams", "TrainParams", "demo_params", "one_parameter_per_field",
]
