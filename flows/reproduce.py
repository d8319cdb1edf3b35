"""``reproduce``: the fair NIMA-vs-MPEMD protocol as one flow, and ``make demo`` as its embedded default.

    [synth-ava] -> ingest-ava -> train-nima (stage 1)
        -> from stage 1, each for stage 2's epochs: train-nima --init (NIMA continued: the equal
           budget), train-mpemd loss=ada, train-mpemd loss=avg
        -> score-bucket over the test split: every row of ``tasks/analysis/comparison.py`` (nima,
           nima_equal_budget, nima_patches_<mode>, mpemd_ada_<mode>, mpemd_avg_<mode>)
        -> analyze-errors for the headline pair (plots), and the protocol summary: all rows per bin,
           paired-bootstrap intervals for every comparison (printed; reports/<name>/protocol.md)

Given AVA's labels and an images URL with the ``paper`` preset it is the full reproduction (a GPU
deployment ``reproduce/paper`` in ``infra/prefect.yaml``); with no dataset it first synthesizes one (``tasks/ingest/synth.py``,
whose scores depend on geometry that squashing to a square distorts).

Reruns reuse finished steps from their outputs: the synthetic set is kept when its size and seed
match, ingest skips verified images, training runs resume or return when finished (run ids are
derived from the settings, so other settings train anew), scoring skips what is already scored.
``fresh=True`` deletes the derived folders under ``root`` first. The printed summary holds no
timings (they follow it), so the same seed prints the same summary.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from typing import Any

from prefect import flow

from flows.analyze_errors import analyze_errors
from flows.artifacts import publish_markdown
from flows.ingest_ava import ingest_ava_flow
from flows.params import (  # noqa: F401  (DEMO_SIZES, demo_params: public names here too)
    DEMO_SIZES,
    DemoParams,
    PredictionSetChoice,
    ReproduceParams,
    demo_params,
    one_parameter_per_field,
)
from flows.runtime import run_flow, run_step
from flows.score_bucket import score_bucket
from flows.synth_ava import synth_ava_flow
from flows.train_mpemd import train_mpemd
from flows.train_nima import train_nima
from tasks.analysis import comparison
from tasks.core import markdown, storage
from tasks.training.presets import STAGE2_FIELDS, config_from_dict, resolve_config

logger = logging.getLogger("mpemd")

DERIVED_FOLDERS = ("synth", "ava", "manifests", "stats", "runs", "predictions", "reports")


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
        run_step(synth_ava_flow, out=out, n=params.synth_n, seed=params.synth_seed)
        storage.write_text_atomic(marker, json.dumps(wanted))
    return storage.join(out, "AVA.txt"), storage.join(out, "images")


# The stage-2-budget arms: run key -> (flow, extra overrides, run id prefix, the field holding its lr).
ARMS: dict[str, tuple[Any, dict[str, Any], str, str]] = {
    # train-nima with init continues stage 1 for exactly stage 2's epochs: the equal-budget baseline
    "nima_equal_budget": (train_nima, {}, "nima-equal", "nima_continue_lr"),
    "mpemd_ada": (train_mpemd, {"loss": "ada"}, "mpemd-ada", "mpemd_lr"),
    "mpemd_avg": (train_mpemd, {"loss": "avg"}, "mpemd-avg", "mpemd_avg_lr"),
}


def _train(params: ReproduceParams, labels: str, steps: dict[str, float]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Stage 1; then from it, with the same stage-2 budget: NIMA continued, MPEMD_ada, MPEMD_avg (with
    ``tune_lr``, each at the lr of ``tune_lrs`` with the lowest validation EMD). Returns the runs and,
    per tuned arm, every lr tried with its validation EMD."""
    stage1 = resolve_config(params.preset, params.overrides).to_dict()
    # run ids hash the resolved settings (a preset's values too), stage 1's without the stage-2-only fields
    tag = settings_tag(labels, params.split_seed, params.split_fractions, params.preset,
                       {k: v for k, v in stage1.items() if k not in STAGE2_FIELDS})
    common = {"root": params.root, "preset": params.preset}
    runs = {"nima": _timed(steps, "train nima", lambda: run_step(
        train_nima, **common, overrides=params.overrides, run_id=f"nima-{tag}"))}
    init = runs["nima"].run_id
    stage2 = {**params.overrides, **params.mpemd_overrides}
    tag2 = settings_tag(tag, resolve_config(params.preset, stage2).to_dict())
    tried: dict[str, Any] = {}
    for name, (train, extra, prefix, lr_field) in ARMS.items():
        def one(lr: float | None, train: Any = train, extra: dict = extra, prefix: str = prefix,
                lr_field: str = lr_field) -> Any:
            tuned = {} if lr is None else {lr_field: lr}
            suffix = "" if lr is None else f"-lr{lr:g}"
            return run_step(train, **common, overrides={**stage2, **extra, **tuned}, run_id=f"{prefix}-{tag2}{suffix}",
                        init=init)
        if not params.tune_lr:
            runs[name] = _timed(steps, f"train {name}", one, None)
            continue
        candidates = {lr: _timed(steps, f"train {name} lr {lr:g}", one, lr) for lr in params.tune_lrs}
        tried[name] = {lr: run.best_val.get("emd2") for lr, run in candidates.items()}
        runs[name] = candidates[_lowest(tried[name])]
    return runs, tried


def _lowest(val_emd: dict[float, float | None]) -> float:
    """The lr whose run reached the lowest validation EMD (a run with none never wins)."""
    finite = {lr: v for lr, v in val_emd.items() if v is not None and v == v}
    if not finite:
        raise ValueError(f"no tuned run has a validation EMD: {val_emd}")
    return min(finite, key=lambda lr: (finite[lr], lr))


def arm_learning_rates(runs: dict[str, Any], tried: dict[str, Any]) -> list[dict[str, Any]]:
    """Each trained arm's learning rate as its run used it, and how it was chosen (``protocol.md``)."""
    rows = []
    for name, run in runs.items():
        cfg = config_from_dict(run.config)
        lr = cfg.lr if name == "nima" else cfg.arm_lr("nima" if name == "nima_equal_budget" else name[-3:])
        how = ("validation EMD among " + ", ".join(f"{x:g} ({v:.4f})" if v is not None else f"{x:g} (-)"
                                                    for x, v in tried[name].items())
               if name in tried else "preset and overrides")
        rows.append({"arm": name, "run": run.run_id, "lr": lr, "epochs": run.epochs_run, "chosen_by": how})
    return rows


def _score(params: ReproduceParams, runs: dict[str, Any]) -> dict[str, Any]:
    """Every row's predictions on the test split (score-bucket skips what is already scored)."""
    common = {"source": storage.join(params.root, "manifests", "test.parquet"),
              "out": storage.join(params.root, "predictions"), "batch_size": params.score_batch_size,
              "num_workers": params.score_workers}
    versions = {name: run.model_version for name, run in runs.items()}
    scored = {}
    for row in comparison.protocol_sets(versions, params.patch_modes, params.n_patches):
        run = next(r for name, r in runs.items() if r.model_version == row.model_version)
        patches = {} if row.model == "nima" else {"patch_mode": row.patch_mode, "n_patches": row.n_patches}
        scored[row.name] = run_step(score_bucket, checkpoint=run.best_checkpoint, method=row.model, **patches, **common)
    return scored


def _timed(steps: dict[str, float], name: str, work: Any, *args: Any) -> Any:
    start = time.perf_counter()
    try:
        return work(*args)
    finally:
        steps[name] = round(time.perf_counter() - start, 1)


@flow(name="reproduce", log_prints=True)
@one_parameter_per_field(ReproduceParams)
def reproduce(params: ReproduceParams) -> dict[str, Any]:
    """Run the fair protocol end to end and return every row and comparison (also printed and reported)."""
    steps: dict[str, float] = {}
    if params.fresh:
        _clear_derived(params.root)
    if params.labels is None:
        labels, images, mode = *_timed(steps, "synthesize", _synthesize, params), "reference"
    elif params.images is None:
        raise ValueError("images is required when labels are given")
    else:
        labels, images, mode = params.labels, params.images, "copy"
    ingest = _timed(steps, "ingest", lambda: run_step(
        ingest_ava_flow, labels=labels, images=images, root=params.root, mode=mode,
        split_seed=params.split_seed, split_fractions=params.split_fractions))
    runs, tried = _train(params, labels, steps)
    scored = _score(params, runs)
    versions = {name: run.model_version for name, run in runs.items()}
    sets = comparison.protocol_sets(versions, params.patch_modes, params.n_patches)
    by_name = {s.name: s for s in sets}
    headline = comparison.protocol_pairs(params.patch_modes)[0]
    # The per-bin error report with plots, for the headline pair.
    analysis = _timed(steps, "analyze", lambda: run_step(
        analyze_errors, root=params.root, report_name=params.report_name,
        nima=_choice(by_name[headline.baseline]), mpemd=_choice(by_name[headline.candidate])))
    learning_rates = arm_learning_rates(runs, tried)
    protocol = _timed(steps, "protocol", lambda: comparison.run_protocol(
        params.root, sets, comparison.protocol_pairs(params.patch_modes), report_name=params.report_name,
        learning_rates=learning_rates))
    print(protocol.markdown)
    print(_times_markdown(steps, scored))
    publish_markdown("reproduce-summary", protocol.markdown, description=f"reproduce over {params.root}")
    return {
        "ingest": ingest, "runs": runs, "nima": runs["nima"], "mpemd": runs["mpemd_ada"], "scored": scored,
        "rows": [s.name for s in sets], "by_bin": protocol.by_bin, "overall": protocol.overall,
        "bootstrap": protocol.bootstrap, "markdown": protocol.markdown, "report": protocol.report,
        "analysis_report": analysis["report"], "plots": analysis["plots"], "comparison": analysis["comparison"],
        "learning_rates": learning_rates, "seconds": steps,
    }


def _choice(row: comparison.PredictionSet) -> PredictionSetChoice:
    return PredictionSetChoice(model_version=row.model_version, label=row.name, model=row.model,
                               patch_mode=row.patch_mode, n_patches=row.n_patches)


def _times_markdown(steps: dict[str, float], scored: dict[str, Any]) -> str:
    """Wall time of each step (apart from the summary: timings differ between identical runs)."""
    rows = [*steps.items(), *((f"score {name}", summary.get("seconds", 0)) for name, summary in scored.items())]
    total = sum(steps.values()) + sum(s.get("seconds", 0) for s in scored.values())
    return "## Wall time\n\n" + markdown.table(["step", "seconds"], [*rows, ("total", total)], digits=1) + "\n"


# ---------------------------------------------------------------------------------------------
# CLI: `mpemd reproduce` (any dataset) and `mpemd demo` (the embedded default)


def cli_run(params: ReproduceParams) -> int:
    """``mpemd reproduce``: the comparison is printed by the flow; the report's path on stderr."""
    result = run_flow(reproduce, params)
    print(f"report: {result['report']}", file=sys.stderr)
    return 0


def cli_demo(params: DemoParams) -> int:
    """``mpemd demo``: the reproduce flow at one of the embedded demo sizes."""
    return cli_run(demo_params(params.size, root=params.root, seed=params.seed, fresh=params.fresh))
