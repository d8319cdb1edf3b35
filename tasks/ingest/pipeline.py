"""Raw AVA (labels file + image mirror) -> ``{root}`` laid out as DESIGN.md says, without Prefect.

The stages, each a plain function that the ``ingest-ava`` flow wraps as a Prefect task:

1. ``stage_labels``: parse ``AVA.txt`` strictly and keep a copy at ``{root}/ava/AVA.txt``;
2. ``tasks.ingest.fetch.fetch_images``: copy or reference the images, verified, resumable;
3. ``stage_manifests``: join, split, write ``{root}/manifests/*.parquet`` and the histogram.

``ingest_ava`` runs them in order (for callers without Prefect, such as the GPU machine).
"""

from __future__ import annotations

import logging

from tasks.core import storage
from tasks.core.errors import missing_path
from tasks.core.memory import release_freed_memory
from tasks.ingest.fetch import FetchResult, ImageSource, fetch_images
from tasks.ingest.histogram import write_histogram
from tasks.ingest.labels import LabelTable, join_names, parse_labels_bytes, read_names
from tasks.ingest.manifest_files import write_manifests
from tasks.ingest.manifests import DEFAULT_FRACTIONS, ManifestJoin
from tasks.ingest.settings import IngestParams

logger = logging.getLogger("mpemd")


def stage_labels(labels_url: str, root: str, tags: str | None = None,
                 challenges: str | None = None) -> LabelTable:
    """Parse the labels and keep the exact file at ``{root}/ava/AVA.txt`` (atomic)."""
    try:
        data = storage.read_bytes(labels_url)
    except FileNotFoundError as exc:
        raise missing_path("labels file", labels_url) from exc
    parsed = parse_labels_bytes(data, uri=labels_url)  # a block of lines at a time, never all as str
    target = storage.join(root, "ava", "AVA.txt")
    if storage.filesystem(target)[1] != storage.filesystem(labels_url)[1]:
        storage.write_bytes_atomic(target, data)
    del data
    if tags or challenges:
        labelled = join_names(parsed.labels, read_names(tags) if tags else None,
                              read_names(challenges) if challenges else None)
        parsed = LabelTable(labels=labelled, rejected=parsed.rejected, n_lines=parsed.n_lines)
    logger.info("labels: %s", parsed.summary())
    release_freed_memory()  # the parse's dead heap would sit under the fetch's peak
    return parsed


def stage_manifests(parsed: LabelTable, fetched: FetchResult, root: str, split_seed: int = 0,
                    split_fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
                    split_files: dict[str, str] | None = None) -> dict:
    """Write the manifests and the histogram; return the summary dict ``ingest_ava`` returns."""
    join = ManifestJoin(parsed.labels, fetched.images, [parsed.rejected, fetched.rejected],
                        seed=split_seed, fractions=split_fractions, split_files=split_files or None)
    written = write_manifests(join, root)  # a block of rows at a time, never every manifest at once
    del join
    paths = dict(written.paths)
    paths.update(write_histogram(written.aspect_ratio, root))
    counts = written.counts
    rejected = written.rejected_by_stage()
    n_out = sum(counts.values()) + sum(rejected.values())
    if n_out != parsed.n_lines:  # every non-blank line ends in exactly one manifest row
        raise RuntimeError(f"count mismatch: {parsed.n_lines} label lines in, {n_out} rows out")
    summary = {
        "lines": parsed.n_lines, "splits": counts, "rejected": rejected,
        "fetched": fetched.n_fetched, "skipped": fetched.n_skipped, "paths": paths,
        "aspect_bins": written.aspect_bins,
    }
    logger.info("ingest: splits %s, rejected %s", counts, rejected)
    return summary


def ingest_ava(params: IngestParams) -> dict:
    """Labels -> verified images -> manifests + histogram. Returns counts per split, rejected per
    stage and the written paths."""
    parsed = stage_labels(params.labels, params.root, params.tags, params.challenges)
    fetched = fetch_images(parsed.labels.column("image_id"), ImageSource.parse(params.images),
                           params.root, params.fetch_settings())
    return stage_manifests(parsed, fetched, params.root, params.split_seed, params.split_fractions,
                           params.split_files)
