"""Flow ``ingest-ava``: raw AVA (``AVA.txt`` + an image mirror) -> manifests, histogram, artifacts.

    mpemd ingest --labels ./AVA.txt --images /mirror/images --root ./data
    mpemd ingest --labels s3://raw/AVA.txt --images 'https://mirror/{image_id}.jpg' --root s3://bucket/ava-run
    mpemd ingest ... --split-files val=AVA_val_labels.txt --split-files test=AVA_test_labels.txt

The stages are the plain functions of ``tasks/ingest.py``; here they are Prefect tasks (the image
stage with retries: it is resumable, so a retry only redoes unfinished batches).
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Literal

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field, field_validator

from flows.artifacts import publish_markdown, publish_table
from tasks import storage
from tasks.fetch import FetchSettings, ImageSource, fetch_images
from tasks.histogram import analysis_bin_counts
from tasks.ingest import stage_labels, stage_manifests
from tasks.manifests import DEFAULT_FRACTIONS


class IngestParams(BaseModel):
    labels: str = Field(description="AVA.txt-format labels file (any fsspec URL)")
    images: str = Field(description="image folder URL, or a template with {image_id} (e.g. https://host/{image_id}.jpg)")
    root: str = Field("./data", description="output root: {root}/ava, {root}/manifests, {root}/stats")
    mode: Literal["copy", "reference"] = Field("copy", description="copy into {root}/ava/images, or reference in place")
    full_decode: bool = Field(False, description="decode every image fully (slower) instead of the header check")
    max_concurrency: int = Field(16, ge=1, le=256, description="images fetched at once")
    retries: int = Field(3, ge=0, le=20, description="retries per image on transient errors")
    backoff_s: float = Field(0.5, ge=0, description="first retry delay (doubles each attempt)")
    batch_size: int = Field(256, ge=1, description="images per resume record")
    split_seed: int = Field(0, description="seed of the id hash that assigns train/val/test")
    split_fractions: tuple[float, float, float] = Field(DEFAULT_FRACTIONS, description="train, val, test")
    split_files: dict[str, str] = Field(default_factory=dict,
                                        description="{split: URL of an id list}; unlisted ids go to train "
                                        "unless a train list is given")
    tags: str | None = Field(None, description="optional AVA tags.txt")
    challenges: str | None = Field(None, description="optional AVA challenges.txt")

    @field_validator("split_fractions")
    @classmethod
    def _sum_to_one(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(f < 0 for f in v) or abs(sum(v) - 1.0) > 1e-6:
            raise ValueError("split fractions must be non-negative and sum to 1")
        return v


parse_labels_task = task(stage_labels, name="parse-labels", cache_policy=NO_CACHE)
fetch_images_task = task(fetch_images, name="fetch-images", retries=2, retry_delay_seconds=10, cache_policy=NO_CACHE)
manifests_task = task(stage_manifests, name="write-manifests", cache_policy=NO_CACHE)


@flow(name="ingest-ava", log_prints=True)
def ingest_ava_flow(params: IngestParams) -> dict[str, Any]:
    """Parse labels, fetch and verify images, write manifests and the aspect-ratio histogram."""
    parsed = parse_labels_task(params.labels, params.root, params.tags, params.challenges)
    settings = FetchSettings(mode=params.mode, full_decode=params.full_decode,
                             max_concurrency=params.max_concurrency, retries=params.retries,
                             backoff_s=params.backoff_s, batch_size=params.batch_size)
    fetched = fetch_images_task(parsed.labels.column("image_id").to_pylist(), ImageSource.parse(params.images),
                                params.root, settings)
    summary = manifests_task(parsed, fetched, params.root, params.split_seed, params.split_fractions,
                             params.split_files)
    print(f"ingest-ava: {summary['lines']} label lines -> splits {summary['splits']}, "
          f"rejected {summary['rejected'] or 'none'}")
    _publish(summary, fetched.rejected.slice(0, 50).to_pylist(), parsed.rejected.slice(0, 50).to_pylist())
    return summary


def _publish(summary: dict[str, Any], fetch_rejected: list[dict], parse_rejected: list[dict]) -> None:
    markdown = storage.read_bytes(summary["paths"]["markdown"]).decode()
    splits = " | ".join(f"{k}: {v}" for k, v in summary["splits"].items())
    rejected = ", ".join(f"{k}: {v}" for k, v in summary["rejected"].items()) or "none"
    publish_markdown("ingest-ava-summary", f"# ingest-ava\n\nSplits: {splits}\n\nRejected: {rejected}\n\n"
                     f"Fetched {summary['fetched']}, skipped (already verified) {summary['skipped']}.\n\n"
                     + markdown.replace("# Aspect-ratio histogram", "## Aspect-ratio histogram"))
    bins = storage.read_parquet(summary["paths"]["bins"]).to_pylist() if "bins" in summary["paths"] else []
    publish_table("ingest-ava-aspect-bins", bins or analysis_bin_counts([]).to_pylist(),
                  description="images per METHOD.md aspect-ratio bin")
    sample = [*parse_rejected, *fetch_rejected][:50]
    if sample:
        publish_table("ingest-ava-rejected-sample", sample, description="first rejected rows (all in rejected.parquet)")


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("ingest", help="ingest AVA (labels + image mirror) into manifests (flow ingest-ava)")
    p.add_argument("--labels", required=True, help="AVA.txt URL")
    p.add_argument("--images", required=True, help="image folder URL or template with {image_id}")
    p.add_argument("--root", default="./data", help="output root URL (default ./data)")
    p.add_argument("--reference", action="store_true", help="reference images in place instead of copying")
    p.add_argument("--full-decode", action="store_true", help="decode every image fully to verify it")
    p.add_argument("--max-concurrency", type=int, default=16)
    p.add_argument("--retries", type=int, default=3)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--split", default=",".join(str(f) for f in DEFAULT_FRACTIONS), metavar="TRAIN,VAL,TEST",
                   help="split fractions (default: the paper's 0.92,0.04,0.04)")
    p.add_argument("--split-files", action="append", default=[], metavar="SPLIT=URL",
                   help="an id list for a split (repeatable), e.g. val=val_ids.txt")
    p.add_argument("--tags", default=None, help="AVA tags.txt (optional)")
    p.add_argument("--challenges", default=None, help="AVA challenges.txt (optional)")
    p.set_defaults(func=_run)


def _fractions(text: str) -> tuple[float, float, float]:
    parts = text.split(",")
    if len(parts) != 3:
        raise SystemExit(f"--split wants TRAIN,VAL,TEST fractions, got {text!r}")
    try:
        return (float(parts[0]), float(parts[1]), float(parts[2]))
    except ValueError:
        raise SystemExit(f"--split wants three numbers, got {text!r}") from None


def _run(args: argparse.Namespace) -> int:
    split_files = {}
    for item in args.split_files:
        split, sep, url = item.partition("=")
        if not sep:
            raise SystemExit(f"--split-files wants SPLIT=URL, got {item!r}")
        split_files[split] = url
    params = IngestParams(labels=args.labels, images=args.images, root=args.root,
                          mode="reference" if args.reference else "copy", full_decode=args.full_decode,
                          max_concurrency=args.max_concurrency, retries=args.retries, split_seed=args.split_seed,
                          split_fractions=_fractions(args.split), split_files=split_files, tags=args.tags, challenges=args.challenges)
    summary = ingest_ava_flow(params)
    print(json.dumps({k: summary[k] for k in ("splits", "rejected", "aspect_bins", "paths")}, indent=2))
    return 0
