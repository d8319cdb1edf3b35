"""Flow ``score-bucket``: score every new or changed image of a bucket with a checkpoint, nightly.

    list the source  ->  read what the output already holds  ->  shard the rest  ->  score each shard
    (in this process, or on a Dask cluster)  ->  one atomic Parquet part per shard  ->  merge the
    run's date= partition into one file (``compact``)  ->  summary

The output is its own state, so a second run over an unchanged bucket does no model work, and a
run killed at any moment leaves only whole shards behind: the rerun scores exactly what is missing.
``mpemd score SOURCE --checkpoint URL --out URL`` runs this same flow.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from prefect import flow, task
from prefect.utilities.annotations import quote

from flows.artifacts import publish_markdown, publish_table
from flows.params import ScoreBucketParams, one_parameter_per_field
from flows.runtime import TASK_OPTIONS, run_flow, run_logger, run_step
from tasks.core import markdown, storage
from tasks.scoring import checkpoint_cache
from tasks.scoring.compaction import compact_partition, finish_interrupted
from tasks.scoring.layout import partition_url
from tasks.scoring.listing import SourceObject, list_source
from tasks.scoring.output_lock import output_lock, writing_for
from tasks.scoring.predictions import (
    ScoringPlan,
    ScoringSettings,
    dates_with_several_parts,
    plan_scoring,
    run_date,
)

if TYPE_CHECKING:  # torch: imported only when there is something to score (a no-op rerun never does)
    from tasks.scoring.scorer import ScoringConfig, ShardResult


# Retries (TASK_OPTIONS) are safe: a retried plan or compaction first finishes what the failed try
# left (tasks/scoring/compaction.py), and a retried shard finds its committed part by content key.
list_task = task(list_source, name="list-source", **TASK_OPTIONS)
compact_task = task(compact_partition, name="compact-partition", **TASK_OPTIONS)


@task(name="plan-scoring", **TASK_OPTIONS)
def plan_task(objects: Sequence[SourceObject], out: str, model_version: str, settings: ScoringSettings,
              shard_size: int) -> ScoringPlan:
    """What is left to score; an interrupted compaction is finished first (its rows are otherwise held
    twice), with the same one listing."""
    parts = finish_interrupted(out, model_version)
    plan = plan_scoring(objects, out, model_version, settings, shard_size, files=parts)
    return replace(plan, untidy_dates=dates_with_several_parts(parts))


# The scoring tasks import torch when they run: a no-op rerun never does.
@task(name="score-shards", **TASK_OPTIONS | {"retry_delay_seconds": 10})
def score_shards_task(shards: list[list[SourceObject]], checkpoint: str, out: str, date: str,
                      config: ScoringConfig, lock_owner: str) -> list[ShardResult]:
    """In this process: one task streams all shards, so decoding workers start once."""
    from tasks.scoring.scorer import score_shards

    with writing_for(out, lock_owner):
        return list(score_shards(shards, checkpoint=checkpoint, out=out, date=date, config=config))


@task(name="score-shard", **TASK_OPTIONS | {"retry_delay_seconds": 10})
def score_shard_task(objects: list[SourceObject], shard_index: int, checkpoint: str, out: str, date: str,
                     config: ScoringConfig, lock_owner: str) -> ShardResult:
    """On a Dask cluster: one task run per shard. The worker commits only while the run that handed it
    the shard (``lock_owner``) still holds the output's lock: it has no heartbeat of its own."""
    from tasks.scoring.scorer import score_shard

    with writing_for(out, lock_owner):
        return score_shard(objects, shard_index=shard_index, checkpoint=checkpoint, out=out, date=date,
                           config=config)


def _dask_runner(params: ScoreBucketParams) -> Any:
    from prefect_dask import DaskTaskRunner

    if params.dask_address:
        return DaskTaskRunner(address=params.dask_address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": params.dask_workers, "threads_per_worker": 1,
                                          "processes": params.dask_processes, "dashboard_address": None})


def _score_shards(plan: ScoringPlan, params: ScoreBucketParams, config: ScoringConfig, date: str,
                  lock_owner: str) -> list[ShardResult]:
    common = {"checkpoint": params.checkpoint, "out": params.out, "date": date, "config": config,
              "lock_owner": lock_owner}
    if not plan.shards:
        return []
    if params.dask_address or params.use_local_dask:
        # One task run per shard on the cluster; only the shard's listing rows travel, never pixels.
        shard_task = score_shard_task.with_options(retries=params.shard_retries)
        with _dask_runner(params) as runner:
            futures = [runner.submit(shard_task, {"objects": shard, "shard_index": i, **common})
                       for i, shard in enumerate(plan.shards)]
            return [f.result() for f in futures]
    return run_step(score_shards_task.with_options(retries=params.shard_retries), quote(plan.shards), **common)


def _scoring_config(params: ScoreBucketParams) -> tuple[str, ScoringConfig]:
    """The checkpoint's model_version and the scoring configuration (reads and validates the checkpoint)."""
    from tasks.scoring.scorer import config_from_checkpoint, read_checkpoint_info

    info = read_checkpoint_info(params.checkpoint)
    return info["model_version"], config_from_checkpoint(
        info, method=params.method, patch_mode=params.patch_mode, n_patches=params.n_patches,
        patch_seed=params.patch_seed, **params.knobs())


def _checkpoint_settings(params: ScoreBucketParams) -> tuple[str, ScoringSettings, ScoringConfig | None]:
    """model_version and prediction settings: from the cache when this version of the checkpoint file
    was seen with these choices (config None: loaded only if something is to be scored)."""
    choices = params.model_dump(include={"method", "patch_mode", "n_patches", "patch_seed"})
    key = checkpoint_cache.cache_key(params.checkpoint, choices)
    if (hit := checkpoint_cache.lookup(key)) is not None:
        return (*hit, None)
    version, config = _scoring_config(params)
    checkpoint_cache.store(key, version, config.settings)
    return version, config.settings, config


def _markdown(summary: dict[str, Any]) -> str:
    rows = [(k, str(v)) for k, v in summary.items() if k not in ("parts", "non_image_examples")]
    lines = ["# score-bucket", "", markdown.table(["", ""], rows)]
    if summary["non_image_examples"]:
        lines += ["", "Skipped (not an image by name or content), first few:", ""]
        lines += [f"- `{u}`" for u in summary["non_image_examples"]]
    return "\n".join(lines) + "\n"


# A dead run must not hold the nightly slot forever (the deployment allows one run at a time).
SCORE_TIMEOUT_S = float(os.environ.get("MPEMD_SCORE_TIMEOUT_S", 12 * 3600))


@flow(name="score-bucket", log_prints=True, timeout_seconds=SCORE_TIMEOUT_S)
@one_parameter_per_field(ScoreBucketParams)
def score_bucket(params: ScoreBucketParams) -> dict[str, Any]:
    """Score new and changed images of ``source`` into ``out``; returns the run summary."""
    logger = run_logger()
    start = time.perf_counter()
    version, settings, config = _checkpoint_settings(params)
    date = run_date(params.date)
    listing = run_step(list_task, params.source)
    others = f"{listing.skipped_non_image} other file{'' if listing.skipped_non_image == 1 else 's'} skipped"
    if listing.objects:
        logger.info("listed %d images (%s) under %s", len(listing.objects), others, params.source)
    else:  # a wrong folder or an upload that has not landed yet: say it, the run itself succeeds
        logger.warning("no images under %s; %s", params.source, others)
    # One writer per output: a second run planning the same pending images would commit them twice.
    with output_lock(params.out, wait_s=params.lock_wait_s) as held:
        # quote: the listing goes to the task as is, not visited object by object (flows/runtime.run_step)
        plan = run_step(plan_task, quote(listing.objects), params.out, version, settings, params.shard_size)
        logger.info("model_version=%s %s: %d to score in %d shards, %d unchanged", version, settings,
                    plan.pending, len(plan.shards), plan.skipped_unchanged)
        if plan.shards and config is None:
            version, config = _scoring_config(params)
        results = _score_shards(plan, params, config, date, held.owner) if plan.shards else []
        # Under the lock: a run waiting on it plans from the compacted state. Besides its own
        # partition, a run merges those a killed run left in shards (found by the plan's listing).
        dates = set(plan.untidy_dates) | ({date} if any(not r.reused for r in results) else set())
        compacted = [run_step(compact_task, partition_url(params.out, version, d))
                     for d in sorted(dates)] if params.compact else []
    written = [r for r in results if not r.reused]
    # Where this run's rows are now: its partition's merged file once compacted, else the shard parts.
    own = partition_url(params.out, version, date)
    merged = next((c.merged for c in compacted if c.merged and c.partition == own), None)
    if not written and not storage.exists(own):
        own = None  # nothing written today and nothing there before: name no folder that does not exist
    summary = {
        "model_version": version, "method": settings.method, "patch_mode": settings.patch_mode,
        "n_patches": settings.n_patches, "date": date, "listed": len(listing.objects),
        "skipped_unchanged": plan.skipped_unchanged, "scored": sum(r.images for r in written),
        "ok": sum(r.ok for r in written), "errors": sum(r.errors for r in written),
        "reused_shards": len(results) - len(written), "non_image_skipped": listing.skipped_non_image,
        "shards": len(results), "output": own,
        "compacted_files": sum(c.files_before for c in compacted if c.merged),
        "compacted_rows": sum(c.rows for c in compacted if c.merged),
        "seconds": round(time.perf_counter() - start, 3),
        "parts": [merged] if merged else [r.part_url for r in results],
        "non_image_examples": listing.skipped_examples,
    }
    publish_markdown("score-bucket-summary", _markdown(summary), description=f"score-bucket {params.source}")
    if results:
        publish_table("score-bucket-shards", [{"shard": r.shard_index, "images": r.images, "ok": r.ok,
                                               "errors": r.errors, "reused": r.reused, "seconds": round(r.seconds, 2),
                                               "part": r.part_url, "merged_into": merged or ""}
                                              for r in results])
    return summary


def cli_run(params: ScoreBucketParams) -> int:
    """``mpemd score``. A Dask fan-out runs as Prefect task runs, so it always takes the Prefect path."""
    summary = run_flow(score_bucket, params, needs_engine=bool(params.dask_address or params.use_local_dask))
    print(json.dumps({k: v for k, v in summary.items() if k != "parts"}, indent=2))
    return 0
