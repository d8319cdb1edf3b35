"""``reproduce``: the whole paper protocol as one flow, and ``make demo`` as its embedded default.

    [synth-ava] -> ingest-ava -> train-nima -> train-mpemd (from the NIMA run)
        -> score-bucket over the test split (NIMA: warp; MPEMD: random and grid patches)
        -> analyze-errors -> the per-aspect-bin comparison table, printed and in a report

Given AVA's labels and an images URL with the ``paper`` preset it is the full reproduction (a GPU
deployment ``reproduce/paper`` in ``infra/prefect.yaml``); with no dataset it first synthesizes one (``tasks/synth.py``,
whose scores depend on geometry that squashing to a square distorts).

Reruns reuse finished steps from their outputs: the synthetic set is kept when its size and seed
match, ingest skips verified images, training runs resume or return when finished (run ids are
derived from the settings, so other settings train anew), scoring skips what is already scored.
``fresh=True`` deletes the derived folders under ``root`` first.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from typing import Any, Literal

from prefect import flow
from pydantic import BaseModel, Field

from flows.analyze_errors import AnalyzeErrorsParams, PredictionSetChoice, analyze_errors
from flows.artifacts import publish_markdown
from flows.ingest_ava import IngestParams, ingest_ava_flow
from flows.score_bucket import ScoreBucketParams, score_bucket
from flows.synth_ava import SynthAvaParams, synth_ava_flow
from flows.train_mpemd import TrainMpemdParams, train_mpemd
from flows.train_nima import TrainNimaParams, train_nima
from flows.training_runs import OverrideValue
from tasks import storage
from tasks.comparison import comparison_markdown, overall_rows

logger = logging.getLogger("mpemd")

DERIVED_FOLDERS = ("synth", "ava", "manifests", "stats", "runs", "predictions", "reports")

# The embedded default (``make demo``): sizes that finish on 2 CPU cores. The backbone is the
# `cpu` preset's ImageNet-pretrained efficientnet_lite0 with a frozen trunk (the head learns).
DEMO_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"synth_n": 160, "overrides": {"image_size": 96, "epochs": 1, "n_patches": 2},
             "mpemd_epochs": 1, "n_patches": 4},
    "small": {"synth_n": 1500, "overrides": {"image_size": 128, "epochs": 4, "n_patches": 4},
              "mpemd_epochs": 2, "n_patches": 8},
    "medium": {"synth_n": 3000, "overrides": {"image_size": 160, "epochs": 6, "n_patches": 4},
               "mpemd_epochs": 3, "n_patches": 8},
    "large": {"synth_n": 8000, "overrides": {"image_size": 224, "epochs": 10, "n_patches": 8},
              "mpemd_epochs": 4, "n_patches": 8},
}
DEMO_COMMON_OVERRIDES: dict[str, OverrideValue] = {
    "freeze_backbone": True, "lr": 0.02, "lr_step_epochs": 100, "batch_size": 32, "num_workers": 0,
}


class ReproduceParams(BaseModel):
    """Parameters of ``reproduce`` (also the form in the Prefect UI)."""

    root: str = Field("./data/reproduce", description="data root for every step's outputs")
    labels: str | None = Field(None, description="AVA.txt-format labels URL; none: synthesize a dataset first")
    images: str | None = Field(None, description="images folder URL or {image_id} template (with labels)")
    synth_n: int = Field(1500, ge=10, description="images to synthesize when no labels are given")
    synth_seed: int = Field(0, description="seed of the synthetic dataset")
    split_seed: int = Field(0, description="seed of the id hash that assigns splits")
    split_fractions: tuple[float, float, float] = Field(
        (0.6, 0.1, 0.3), description="train/val/test; the paper's AVA split is 0.92/0.04/0.04")
    preset: str = Field("cpu", description="training preset for both stages (paper, cpu, cpu-smoke)")
    overrides: dict[str, OverrideValue] = Field(default_factory=dict, description="TrainConfig fields, both stages")
    mpemd_overrides: dict[str, OverrideValue] = Field(default_factory=dict,
                                                      description="TrainConfig fields for stage 2 only")
    n_patches: int = Field(8, ge=1, description="|P| at prediction")
    patch_modes: list[Literal["random", "grid"]] = Field(["random", "grid"],
                                                         description="MPEMD prediction modes scored and reported")
    score_batch_size: int = Field(32, ge=1)
    score_workers: int = Field(0, ge=0, description="decoding processes while scoring")
    report_name: str = Field("reproduce", description="report folder under {root}/reports/")
    fresh: bool = Field(False, description="delete the derived folders under root first")


def settings_tag(*parts: Any) -> str:
    """A short stable hash of settings, so a run id changes exactly when its settings do."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.blake2b(blob, digest_size=4).hexdigest()


def _clear_derived(root: str) -> None:
    fs, path = storage.filesystem(root)
    for name in DERIVED_FOLDERS:
        target = storage.join(path, name)
        if fs.exists(target):
            logger.info("fresh: removing %s", target)
            fs.rm(target, recursive=True)


def _synthesize(params: ReproduceParams) -> tuple[str, str]:
    out = storage.join(params.root, "synth")
    marker = storage.join(out, "_SYNTH.json")
    wanted = {"n": params.synth_n, "seed": params.synth_seed}
    if storage.exists(marker) and json.loads(storage.read_bytes(marker)) == wanted:
        logger.info("reusing the synthetic dataset in %s", out)
    else:
        synth_ava_flow(SynthAvaParams(out=out, n=params.synth_n, seed=params.synth_seed))
        storage.write_text_atomic(marker, json.dumps(wanted))
    return storage.join(out, "AVA.txt"), storage.join(out, "images")


@flow(name="reproduce", log_prints=True)
def reproduce(params: ReproduceParams) -> dict[str, Any]:
    """Run the paper's protocol end to end and return the comparison (also printed and reported)."""
    if params.fresh:
        _clear_derived(params.root)
    if params.labels is None:
        labels, images, mode = *_synthesize(params), "reference"
    elif params.images is None:
        raise ValueError("images is required when labels are given")
    else:
        labels, images, mode = params.labels, params.images, "copy"

    ingest = ingest_ava_flow(IngestParams(labels=labels, images=images, root=params.root, mode=mode,
                                          split_seed=params.split_seed, split_fractions=params.split_fractions))

    tag = settings_tag(labels, params.split_seed, params.split_fractions, params.preset, params.overrides)
    nima = train_nima(TrainNimaParams(root=params.root, preset=params.preset, overrides=params.overrides,
                                      run_id=f"nima-{tag}"))
    mpemd_overrides = {**params.overrides, **params.mpemd_overrides}
    mpemd_tag = settings_tag(tag, params.mpemd_overrides)
    mpemd = train_mpemd(TrainMpemdParams(root=params.root, preset=params.preset, overrides=mpemd_overrides,
                                         run_id=f"mpemd-{mpemd_tag}", init=nima["run_id"]))

    test_manifest = storage.join(params.root, "manifests", "test.parquet")
    predictions = storage.join(params.root, "predictions")
    common = {"source": test_manifest, "out": predictions, "batch_size": params.score_batch_size,
              "num_workers": params.score_workers}
    scored = {"nima": score_bucket(ScoreBucketParams(checkpoint=nima["best_checkpoint"], method="nima", **common))}
    for mode_name in params.patch_modes:
        scored[f"mpemd-{mode_name}"] = score_bucket(ScoreBucketParams(
            checkpoint=mpemd["best_checkpoint"], method="mpemd", patch_mode=mode_name,
            n_patches=params.n_patches, **common))

    primary = params.patch_modes[0]
    analysis = analyze_errors(AnalyzeErrorsParams(
        root=params.root, report_name=params.report_name,
        nima=PredictionSetChoice(model_version=nima["model_version"], label="NIMA", model="nima"),
        mpemd=PredictionSetChoice(model_version=mpemd["model_version"], label="MPEMD", model="mpemd",
                                  patch_mode=primary, n_patches=params.n_patches),
    ))
    overall = overall_rows(analysis["errors"])
    markdown = comparison_markdown(analysis["comparison"], overall, report=analysis["report"])
    print(markdown)
    publish_markdown("reproduce-summary", markdown, description=f"reproduce over {params.root}")
    return {
        "ingest": ingest, "nima": nima, "mpemd": mpemd, "scored": scored,
        "comparison": analysis["comparison"], "overall": overall, "headline": analysis["headline"],
        "report": analysis["report"], "plots": analysis["plots"], "markdown": markdown,
    }


# ---------------------------------------------------------------------------------------------
# CLI: `mpemd reproduce` (any dataset) and `mpemd demo` (the embedded default)


def demo_params(size: str, root: str = "./data/demo", seed: int = 0, fresh: bool = False) -> ReproduceParams:
    """The embedded default at one of ``DEMO_SIZES``."""
    spec = DEMO_SIZES[size]
    return ReproduceParams(
        root=root, synth_n=spec["synth_n"], synth_seed=seed, split_seed=seed,
        overrides={**DEMO_COMMON_OVERRIDES, **spec["overrides"], "seed": seed},
        mpemd_overrides={"epochs": spec["mpemd_epochs"]}, n_patches=spec["n_patches"],
        report_name=f"demo-{size}", fresh=fresh,
    )


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("reproduce", help="the paper protocol end to end (synthesizes data if none given)")
    p.add_argument("--root", default="./data/reproduce", help="data root for every output")
    p.add_argument("--labels", help="AVA.txt-format labels URL (default: synthesize a dataset)")
    p.add_argument("--images", help="images folder URL or {image_id} template")
    p.add_argument("--preset", default="cpu", help="training preset (paper for the GPU reproduction)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="TrainConfig override for both stages (repeatable)")
    p.add_argument("--split", default="0.6,0.1,0.3", help="train,val,test fractions (paper: 0.92,0.04,0.04)")
    p.add_argument("--n-patches", type=int, default=8, help="|P| at prediction")
    p.add_argument("--synth-n", type=int, default=1500)
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data and the split")
    p.add_argument("--fresh", action="store_true", help="delete derived outputs under --root first")
    p.set_defaults(func=_run_reproduce)

    d = subparsers.add_parser("demo", help="run the whole pipeline on a synthetic AVA (the embedded default)")
    d.add_argument("--size", default="small", choices=sorted(DEMO_SIZES),
                   help="small: about 5 minutes on 2 CPU cores; medium/large: longer, clearer")
    d.add_argument("--root", default="./data/demo", help="where everything is written")
    d.add_argument("--seed", type=int, default=0, help="seed of the data, the split and the training")
    d.add_argument("--fresh", action="store_true", help="start over instead of reusing finished steps")
    d.set_defaults(func=_run_demo)


def _run_reproduce(args: argparse.Namespace) -> int:
    from tasks.presets import parse_overrides

    fractions = tuple(float(x) for x in args.split.split(","))
    params = ReproduceParams(root=args.root, labels=args.labels, images=args.images, preset=args.preset,
                             overrides=parse_overrides(args.overrides), split_fractions=fractions,
                             n_patches=args.n_patches, synth_n=args.synth_n, synth_seed=args.seed,
                             split_seed=args.seed, fresh=args.fresh)
    result = reproduce(params)
    print(f"report: {result['report']}", file=sys.stderr)
    return 0


def _run_demo(args: argparse.Namespace) -> int:
    result = reproduce(demo_params(args.size, root=args.root, seed=args.seed, fresh=args.fresh))
    print(f"report: {result['report']}", file=sys.stderr)
    return 0
