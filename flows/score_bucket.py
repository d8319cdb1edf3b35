"""Flow ``score-bucket``: score every new or changed image of a bucket with a checkpoint, nightly.

    list the source  ->  read what the output already holds  ->  shard the rest  ->  score each shard
    (in this process, or on a Dask cluster)  ->  one atomic Parquet part per shard  ->  summary

The output is its own state, so a second run over an unchanged bucket does no model work, and a
run killed at any moment leaves only whole shards behind: the rerun scores exactly what is missing.
``mpemd score SOURCE --checkpoint URL --out URL`` runs this same flow.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import time
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field, field_validator

from flows.artifacts import publish_markdown, publish_table
from tasks.listing import Listing, SourceObject, list_source
from tasks.output_lock import output_lock
from tasks.predictions import ScoringPlan, partition_url, plan_scoring, run_date
from tasks.scoring import (
    DEFAULT_MAX_BYTES,
    ScoringConfig,
    ShardResult,
    config_from_checkpoint,
    read_checkpoint_info,
    score_shard,
    score_shards,
)


class ScoreBucketParams(BaseModel):
    """Parameters of ``score-bucket`` (also the form in the Prefect UI). Unset method/patch fields come
    from the checkpoint's metadata (how it was trained)."""

    source: str = Field(description="folder/prefix, glob or manifest Parquet: any fsspec URL")
    checkpoint: str = Field(description="checkpoint URL (local path, s3://...)")
    out: str = Field(description="predictions root; parts go to {out}/model_version=<v>/date=<d>/")
    method: Literal["nima", "mpemd"] | None = None
    patch_mode: Literal["random", "grid"] | None = None
    n_patches: int | None = Field(None, ge=1, le=256)
    patch_seed: int | None = None
    batch_size: int = Field(32, ge=1, description="images per forward pass")
    num_workers: int = Field(0, ge=0, description="decoding processes per shard (0: decode in-process)")
    shard_size: int = Field(1000, ge=1, description="images per shard: the unit of commit and of fan-out")
    device: str = "auto"
    amp: bool = True
    compile: bool = False
    max_bytes: int = Field(DEFAULT_MAX_BYTES, ge=1)
    dask_address: str | None = Field(None, description="tcp://scheduler:8786 to fan shards out to a cluster")
    use_local_dask: bool = Field(False, description="start a local Dask cluster for the shards")
    dask_workers: int = Field(2, ge=1, description="workers of the local Dask cluster")
    dask_processes: bool = Field(True, description="local Dask workers as processes (else threads)")
    date: str | None = Field(None, description="date= partition (YYYY-MM-DD); default today in UTC")
    shard_retries: int = Field(2, ge=0)
    lock_wait_s: float = Field(0.0, ge=0, description="wait this long for another run holding the output, "
                               "then refuse (tasks/output_lock.py)")

    @field_validator("date")
    @classmethod
    def _iso_date(cls, value: str | None) -> str | None:
        return dt.date.fromisoformat(value).isoformat() if value else value


def _list(source: str) -> Listing:
    return list_source(source)


def _plan(objects: list[SourceObject], out: str, model_version: str, config: ScoringConfig, shard_size: int
          ) -> ScoringPlan:
    return plan_scoring(objects, out, model_version, config.settings, shard_size)


def _score_in_process(shards: list[list[SourceObject]], checkpoint: str, out: str, date: str,
                      config: ScoringConfig) -> list[ShardResult]:
    return list(score_shards(shards, checkpoint=checkpoint, out=out, date=date, config=config))


list_task = task(_list, name="list-source", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
plan_task = task(_plan, name="plan-scoring", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
# A retried shard is safe: a committed part is recognised by its content key and not written twice.
score_shard_task = task(score_shard, name="score-shard", retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE)
# In-process, one task streams all shards so decoding workers start once; a retry skips committed parts.
score_shards_task = task(_score_in_process, name="score-shards", retries=2, retry_delay_seconds=10,
                         cache_policy=NO_CACHE)


def _dask_runner(params: ScoreBucketParams) -> Any:
    from prefect_dask import DaskTaskRunner

    if params.dask_address:
        return DaskTaskRunner(address=params.dask_address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": params.dask_workers, "threads_per_worker": 1,
                                          "processes": params.dask_processes, "dashboard_address": None})


def _score_shards(plan: ScoringPlan, params: ScoreBucketParams, config: ScoringConfig, date: str
                  ) -> list[ShardResult]:
    common = {"checkpoint": params.checkpoint, "out": params.out, "date": date, "config": config}
    if not plan.shards:
        return []
    if params.dask_address or params.use_local_dask:
        # One task run per shard on the cluster; only the shard's listing rows travel, never pixels.
        shard_task = score_shard_task.with_options(retries=params.shard_retries)
        with _dask_runner(params) as runner:
            futures = [runner.submit(shard_task, {"objects": shard, "shard_index": i, **common})
                       for i, shard in enumerate(plan.shards)]
            return [f.result() for f in futures]
    return score_shards_task.with_options(retries=params.shard_retries)(plan.shards, **common)


def _markdown(summary: dict[str, Any]) -> str:
    lines = ["# score-bucket", "", "| | |", "| --- | --- |"]
    lines += [f"| {k} | {v} |" for k, v in summary.items() if k not in ("parts", "non_image_examples")]
    if summary["non_image_examples"]:
        lines += ["", "Skipped (not an image extension), first few:", ""]
        lines += [f"- `{u}`" for u in summary["non_image_examples"]]
    return "\n".join(lines) + "\n"


# A dead run must not hold the nightly slot forever (the deployment allows one run at a time).
SCORE_TIMEOUT_S = float(os.environ.get("MPEMD_SCORE_TIMEOUT_S", 12 * 3600))


@flow(name="score-bucket", log_prints=True, timeout_seconds=SCORE_TIMEOUT_S)
def score_bucket(params: ScoreBucketParams) -> dict[str, Any]:
    """Score new and changed images of ``params.source`` into ``params.out``; returns the run summary."""
    logger = get_run_logger()
    start = time.perf_counter()
    info = read_checkpoint_info(params.checkpoint)
    version = info["model_version"]
    config = config_from_checkpoint(
        info, method=params.method, patch_mode=params.patch_mode, n_patches=params.n_patches,
        patch_seed=params.patch_seed, batch_size=params.batch_size, num_workers=params.num_workers,
        device=params.device, amp=params.amp, compile=params.compile, max_bytes=params.max_bytes,
    )
    date = run_date(params.date)
    listing = list_task(params.source)
    logger.info("listed %d images (%d other files skipped) under %s", len(listing.objects),
                listing.skipped_non_image, params.source)
    # One writer per output: a second run planning the same pending images would commit them twice.
    with output_lock(params.out, wait_s=params.lock_wait_s):
        plan = plan_task(listing.objects, params.out, version, config, params.shard_size)
        logger.info("model_version=%s %s: %d to score in %d shards, %d unchanged", version, config.settings,
                    plan.pending, len(plan.shards), plan.skipped_unchanged)
        results = _score_shards(plan, params, config, date)
    written = [r for r in results if not r.reused]
    summary = {
        "model_version": version, "method": config.settings.method, "patch_mode": config.settings.patch_mode,
        "n_patches": config.settings.n_patches, "date": date, "listed": len(listing.objects),
        "skipped_unchanged": plan.skipped_unchanged, "scored": sum(r.images for r in written),
        "ok": sum(r.ok for r in written), "errors": sum(r.errors for r in written),
        "reused_shards": len(results) - len(written), "non_image_skipped": listing.skipped_non_image,
        "shards": len(results), "output": partition_url(params.out, version, date),
        "seconds": round(time.perf_counter() - start, 3),
        "parts": [r.part_url for r in results], "non_image_examples": listing.skipped_examples,
    }
    publish_markdown("score-bucket-summary", _markdown(summary), description=f"score-bucket {params.source}")
    if results:
        publish_table("score-bucket-shards", [{"shard": r.shard_index, "images": r.images, "ok": r.ok,
                                               "errors": r.errors, "reused": r.reused, "seconds": round(r.seconds, 2),
                                               "part": r.part_url} for r in results])
    return summary


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("score", help="score new and changed images of a bucket/folder into Parquet",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="folder/prefix, glob or manifest Parquet (any fsspec URL)")
    p.add_argument("--checkpoint", required=True, help="checkpoint URL")
    p.add_argument("--out", required=True, help="predictions root URL")
    p.add_argument("--method", choices=["nima", "mpemd"], help="default: from the checkpoint")
    p.add_argument("--patch-mode", choices=["random", "grid"], help="default: from the checkpoint, else random")
    p.add_argument("--n-patches", type=int, help="|P|; default: from the checkpoint, else 8")
    p.add_argument("--patch-seed", type=int)
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--num-workers", type=int, default=0, help="decoding processes (default 0)")
    p.add_argument("--shard-size", type=int, default=1000, help="images per committed part (default 1000)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="no autocast on CUDA")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--dask-address", help="scheduler address of a Dask cluster for the shards")
    p.add_argument("--local-dask", dest="use_local_dask", action="store_true", help="start a local Dask cluster")
    p.add_argument("--dask-workers", type=int, default=2)
    p.add_argument("--date", help="date= partition (YYYY-MM-DD); default today (UTC)")
    p.set_defaults(func=_run_cli)


def _run_cli(args: argparse.Namespace) -> int:
    fields = ScoreBucketParams.model_fields
    params = ScoreBucketParams(**{k: v for k, v in vars(args).items() if k in fields and v is not None})
    summary = score_bucket(params)
    print(json.dumps({k: v for k, v in summary.items() if k != "parts"}, indent=2))
    return 0
