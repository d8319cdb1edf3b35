"""Bring AVA images under ``{root}/ava/images/`` (or reference them where they are), verified.

Sources: a folder at any fsspec URL (``/data/ava/images``, ``s3://bucket/ava``), or a template
with ``{image_id}`` (``https://mirror.example/ava/{image_id}.jpg``). Each image is read, checked
with ``tasks.core.images.probe_image`` (header size, EXIF orientation, end-of-image marker; a full
decode on request), and then copied (``mode="copy"``, atomic write) or left in place
(``mode="reference"``). Work runs on a bounded thread pool; transient errors (connection resets,
timeouts, HTTP 5xx/429) are retried with exponential back-off and jitter; permanent ones (missing
file, bad image) become ``rejected`` rows at once.

Resumable: every finished batch of verified images is recorded in
``{root}/ava/_fetch/part-*.parquet``. A rerun lists the destination folder once and skips every
image that is recorded, still present with the recorded size, from the same source, and verified
at least as strictly as now asked. An interrupted run therefore loses at most one batch of work,
and since every image has one destination name, a rerun never duplicates anything.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath
import queue
import random
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tasks.core import storage
from tasks.core.errors import is_retryable, missing_path
from tasks.core.images import ImageError, probe_image
from tasks.core.memory import release_freed_memory
from tasks.core.progress import Progress
from tasks.core.schemas import FETCH_REJECTED_SCHEMA
from tasks.ingest.settings import FetchConfig
from tasks.ingest.state import StateRecorder, is_in_sorted, list_files, load_state, reusable, sorted_by_id

logger = logging.getLogger("mpemd")

PLACEHOLDER = "{image_id}"

@dataclass(frozen=True)
class ImageSource:
    """Where image ``<id>`` lives: a template holding ``{image_id}``."""

    template: str

    @classmethod
    def parse(cls, url_or_template: str) -> ImageSource:
        """A folder URL becomes ``<folder>/{image_id}.jpg``; ``{id}`` is accepted for ``{image_id}``."""
        text = url_or_template.replace("{id}", PLACEHOLDER)
        return cls(text if PLACEHOLDER in text else storage.join(text, f"{PLACEHOLDER}.jpg"))

    def uri(self, image_id: int) -> str:
        return self.template.replace(PLACEHOLDER, str(image_id))

    def uris(self, image_ids: np.ndarray) -> pa.Array:
        """``uri`` of every id, as one Arrow string array (no Python string per id)."""
        return _fill(self.template, image_ids)

    def names(self, image_ids: np.ndarray) -> pa.Array:
        """The file name part of every id's URI (what a listing of ``listable_folder`` holds)."""
        return _fill(posixpath.basename(self.template), image_ids)

    @property
    def listable_folder(self) -> str | None:
        """The folder to list once (names -> sizes) instead of asking per file; None for HTTP."""
        folder, name = posixpath.split(self.template)
        if PLACEHOLDER in folder or storage.protocol_of(self.template) in ("http", "https"):
            return None
        return folder if PLACEHOLDER in name else None


def _fill(template: str, image_ids: np.ndarray) -> pa.Array:
    pieces = template.split(PLACEHOLDER)
    ids = pc.cast(pa.array(image_ids, pa.int64()), pa.string())
    args = [pieces[0]]
    for piece in pieces[1:]:
        args += [ids, piece]
    if len(args) == 1:
        return pa.array([template] * len(image_ids), pa.string())
    return pc.binary_join_element_wise(*args, "")


@dataclass(frozen=True)
class FetchResult:
    images: pa.Table  # IMAGE_SCHEMA, one row per verified image
    rejected: pa.Table  # FETCH_REJECTED_SCHEMA
    n_skipped: int  # verified by an earlier run, not fetched again
    n_fetched: int


class _Permanent(Exception):
    """A failure that retrying cannot fix."""


def read_with_retries(uri: str, retries: int, backoff_s: float,
                      sleep: Callable[[float], None] = time.sleep) -> bytes:
    """Read all bytes at ``uri``; transient failures are retried ``retries`` times with back-off."""
    attempt = 0
    while True:
        try:
            return storage.read_bytes(uri, small=True)
        except Exception as exc:
            if not is_retryable(exc):
                raise _Permanent(_describe(exc)) from exc
            if attempt >= retries:
                raise _Permanent(f"gave up after {attempt + 1} attempts: {_describe(exc)}") from exc
            delay = min(30.0, backoff_s * 2 ** attempt) * (0.5 + random.random())
            logger.debug("retrying %s in %.2fs after %s", uri, delay, _describe(exc))
            sleep(delay)
            attempt += 1


def _describe(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError):
        return "missing file (not found at source)"
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def images_folder(root: str) -> str:
    return storage.join(root, "ava", "images")


def _fetch_one(image_id: int, source: ImageSource, root: str, settings: FetchConfig) -> dict:
    src = source.uri(image_id)
    data = read_with_retries(src, settings.retries, settings.backoff_s)
    info = probe_image(data, full_decode=settings.full_decode)  # ImageError -> rejected row
    if settings.mode == "copy":
        uri = storage.join(images_folder(root), f"{image_id}.jpg")
        storage.write_bytes_atomic(uri, data)
    else:
        uri = src
    return {
        "image_id": image_id, "uri": uri, "source_uri": src, "width": info.width, "height": info.height,
        "raw_width": info.raw_width, "raw_height": info.raw_height, "orientation": info.orientation,
        "format": info.format, "bytes": len(data), "checksum": hashlib.md5(data).hexdigest(),
        "verified": "full" if settings.full_decode else "header",
    }


def _unique_ids(image_ids: Iterable[int] | np.ndarray | pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The ids as int64, each once, in first-seen order."""
    if isinstance(image_ids, (pa.Array, pa.ChunkedArray)):
        ids = image_ids.to_numpy()
    elif isinstance(image_ids, np.ndarray):
        ids = image_ids
    else:
        ids = np.fromiter((int(i) for i in image_ids), dtype=np.int64)
    ids = np.asarray(ids, dtype=np.int64)
    _, first = np.unique(ids, return_index=True)
    return ids[np.sort(first)]


def _plan(ids: np.ndarray, source: ImageSource, root: str, settings: FetchConfig
          ) -> tuple[pa.Table, pa.Table, np.ndarray]:
    """(rows an earlier run verified, rejected rows of ids missing at a listable source, ids to fetch).

    One thing at a time, so a rerun holds little beyond the record it keeps (docs/performance.md):
    the source listing becomes one flag per id and is let go before the record is read; the record is
    read for these ids only; the reuse rules go a block of recorded rows at a time."""
    present = _at_source(ids, source)
    release_freed_memory()  # the listing and the names, before the record is read
    state = load_state(root, ids)
    if present is None:  # a typo in --images would otherwise reject every image one by one as "missing"
        if state.num_rows == 0 and len(ids) and not storage.exists(source.listable_folder):
            raise missing_path("images folder", source.listable_folder)
        present = np.zeros(len(ids), dtype=bool)
    dest = list_files(images_folder(root)) if settings.mode == "copy" else None
    keep = reusable(state, source.uris, dest, settings)
    del dest
    reused = state if keep.all() else state.filter(pa.array(keep))
    del state
    rest = ~is_in_sorted(ids, np.sort(reused.column("image_id").to_numpy()))
    lost = rest & ~present
    n_lost = int(lost.sum())
    missing = pa.table({"image_id": pa.array(ids[lost], pa.int64()), "uri": source.uris(ids[lost]),
                        "stage": pa.array(["fetch"] * n_lost, pa.string()),
                        "reason": pa.array(["missing file (not found at source)"] * n_lost, pa.string())},
                       schema=FETCH_REJECTED_SCHEMA)
    return reused, missing, ids[rest & present]


def _at_source(ids: np.ndarray, source: ImageSource) -> np.ndarray | None:
    """Per id, whether the source's listing holds its file (all True where it cannot be listed);
    None where the listing is empty (no id is there, or the folder is not)."""
    listed = list_files(source.listable_folder, sizes=False)
    if listed is None:
        return np.ones(len(ids), dtype=bool)
    if listed.num_rows == 0:
        return None
    return pc.is_in(source.names(ids), value_set=listed.column("name")).to_numpy(zero_copy_only=False)


def _fetch_all(todo: np.ndarray, source: ImageSource, root: str, settings: FetchConfig
               ) -> Iterator[tuple[int, dict | ImageError | _Permanent]]:
    """Each id with its row, or the error that rejects it, in the order they finish.

    On the pool, finished futures arrive through a queue (each one's done-callback puts it there), so
    a completion costs O(1) instead of a ``wait(FIRST_COMPLETED)`` that locks every in-flight future.
    (Measured alone this did not change the kernel time at AVA's size; the GIL hand-offs did: below.)"""
    if settings.mode == "reference" and storage.protocol_of(source.template) == "file":
        # Local reads that stay where they are: no network wait for threads to hide, only Python
        # work under one GIL. 16 threads made a first ingest at AVA's size spend as much time in the
        # kernel (GIL hand-offs) as in Python; in the caller's thread it is faster (performance.md).
        for image_id in todo:
            yield int(image_id), _outcome(_fetch_one, int(image_id), source, root, settings)
        return
    finished: queue.SimpleQueue[Future] = queue.SimpleQueue()
    with ThreadPoolExecutor(max_workers=max(1, settings.max_concurrency)) as pool:
        in_flight: dict[Future, int] = {}
        pending = iter(todo)
        # Keep at most 2x the thread count in flight so a million ids never sit in memory as futures.
        limit = 2 * max(1, settings.max_concurrency)
        while True:
            while len(in_flight) < limit:
                image_id = next(pending, None)
                if image_id is None:
                    break
                future = pool.submit(_fetch_one, int(image_id), source, root, settings)
                in_flight[future] = int(image_id)
                future.add_done_callback(finished.put)
            if not in_flight:
                break
            future = finished.get()
            yield in_flight.pop(future), _outcome(future.result)


def _outcome(fetch: Callable[..., dict], *args: object) -> dict | ImageError | _Permanent:
    try:
        return fetch(*args)
    except (ImageError, _Permanent) as exc:
        return exc


def _rejection(image_id: int, uri: str, error: ImageError | _Permanent) -> dict:
    stage, reason = (error.stage, error.reason) if isinstance(error, ImageError) else ("fetch", str(error))
    return {"image_id": image_id, "uri": uri, "stage": stage, "reason": reason}


def fetch_images(image_ids: Iterable[int] | np.ndarray | pa.Array | pa.ChunkedArray, source: ImageSource | str,
                 root: str, settings: FetchConfig | None = None) -> FetchResult:
    """Fetch (or reference) and verify every image; one row per id in ``images`` or ``rejected``."""
    settings = settings or FetchConfig()
    if settings.mode not in ("copy", "reference"):
        raise ValueError(f"mode must be copy or reference, not {settings.mode!r}")
    source = ImageSource.parse(source) if isinstance(source, str) else source
    reused, missing, todo = _plan(_unique_ids(image_ids), source, root, settings)
    release_freed_memory()  # the record's parts and the listings, read and dropped
    n_skipped = reused.num_rows
    if n_skipped:
        logger.info("fetch: %d images already verified by an earlier run, %d to fetch", n_skipped, len(todo))
    recorder = StateRecorder(root, settings.batch_size)
    rejected: list[dict] = []  # failures only: a few per thousand on a real mirror
    with Progress(total=len(todo), desc="fetch images") as progress:
        for image_id, outcome in _fetch_all(todo, source, root, settings):
            if isinstance(outcome, dict):
                recorder.add(outcome)
            else:
                rejected.append(_rejection(image_id, source.uri(image_id), outcome))
            progress.update(1, rejected=missing.num_rows + len(rejected))
        recorder.flush()

    # Arrow parts, not dicts: the verified rows cost their column bytes (docs/performance.md).
    parts = [reused, *recorder.gathered.tables()]
    del reused, recorder  # the parts list is their only holder: sorted_by_id lets them go column by column
    images = sorted_by_id(parts)
    rejected_table = pa.concat_tables([missing, pa.Table.from_pylist(rejected, schema=FETCH_REJECTED_SCHEMA)]
                                      ).sort_by("image_id").combine_chunks()
    release_freed_memory()  # the per-part tables, now one
    return FetchResult(images=images, rejected=rejected_table, n_skipped=n_skipped, n_fetched=len(todo))
