"""Flow ``ingest-ava``: raw AVA (``AVA.txt`` + an image mirror) -> manifests, histogram, artifacts.

    mpemd ingest --labels ./AVA.txt --images /mirror/images --root ./data
    mpemd ingest --labels s3://raw/AVA.txt --images 'https://mirror/{image_id}.jpg' --root s3://bucket/ava-run
    mpemd ingest ... --split-files val=AVA_val_labels.txt --split-files test=AVA_test_labels.txt

The stages are the plain functions of ``tasks/ingest/pipeline.py``; here they are Prefect tasks (the image
stage with retries: it is resumable, so a retry only redoes unfinished batches).
"""

from __future__ import annotations

import json
from typing import Any

from prefect import flow, task
from prefect.utilities.annotations import quote

from flows.artifacts import publish_markdown, publish_table
from flows.params import IngestParams, one_parameter_per_field
from flows.runtime import TASK_OPTIONS, run_flow, run_step
from tasks.core import storage
from tasks.ingest.fetch import ImageSource, fetch_images
from tasks.ingest.histogram import analysis_bin_counts
from tasks.ingest.pipeline import stage_labels, stage_manifests

# Only the image stage retries: it is resumable (a retry redoes unfinished batches only), and the
# other two fail on bad input (labels, split lists), which a retry cannot fix.
parse_labels_task = task(stage_labels, name="parse-labels", **TASK_OPTIONS | {"retries": 0})
fetch_images_task = task(fetch_images, name="fetch-images", **TASK_OPTIONS | {"retry_delay_seconds": 10})
manifests_task = task(stage_manifests, name="write-manifests", **TASK_OPTIONS | {"retries": 0})


@flow(name="ingest-ava", log_prints=True)
@one_parameter_per_field(IngestParams)
def ingest_ava_flow(params: IngestParams) -> dict[str, Any]:
    """Parse labels, fetch and verify images, write manifests and the aspect-ratio histogram."""
    parsed = run_step(parse_labels_task, params.labels, params.root, params.tags, params.challenges)
    fetched = run_step(fetch_images_task, quote(parsed.labels.column("image_id")),  # AVA: 255,530 ids, as Arrow
                   ImageSource.parse(params.images), params.root, params.fetch_settings())
    summary = run_step(manifests_task, parsed, fetched, params.root, params.split_seed, params.split_fractions,
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


def cli_run(params: IngestParams) -> int:
    """``mpemd ingest``."""
    summary = run_flow(ingest_ava_flow, params)
    print(json.dumps({k: summary[k] for k in ("splits", "rejected", "aspect_bins", "paths")}, indent=2))
    return 0
