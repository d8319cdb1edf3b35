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
import random
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import pyarrow as pa

from tasks.core import storage
from tasks.core.errors import is_retryable, missing_path
from tasks.core.images import ImageError, probe_image
from tasks.core.progress import Progress
from tasks.core.schemas import FETCH_REJECTED_SCHEMA, IMAGE_SCHEMA
from tasks.ingest.settings import FetchConfig

logger = logging.getLogger("mpemd")

PLACEHOLDER = "{image_id}"

_VERIFY_LEVEL = {"header": 0, "full": 1}


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

    @property
    def listable_folder(self) -> str | None:
        """The folder to list once (names -> sizes) instead of asking per file; None for HTTP."""
        folder, name = posixpath.split(self.template)
        if PLACEHOLDER in folder or storage.protocol_of(self.template) in ("http", "https"):
            return None
        return folder if PLACEHOLDER in name else None


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
            return storage.read_bytes(uri)
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


def _state_folder(root: str) -> str:
    return storage.join(root, "ava", "_fetch")


def images_folder(root: str) -> str:
    return storage.join(root, "ava", "images")


def load_state(root: str) -> dict[int, dict]:
    """Rows recorded by earlier runs, by image id (the latest part wins)."""
    fs, path = storage.filesystem(_state_folder(root))
    if not fs.exists(path):
        return {}
    parts = sorted(p for p in fs.ls(path, detail=False) if p.endswith(".parquet"))
    state: dict[int, dict] = {}
    for part in parts:
        for row in storage.read_parquet(storage.unstrip(fs, part)).to_pylist():
            state[row["image_id"]] = row
    return state


def _list_sizes(folder: str | None) -> dict[str, int] | None:
    """{file name: size} of one folder, or None when it cannot be listed."""
    if folder is None:
        return None
    fs, path = storage.filesystem(folder)
    if not fs.exists(path):
        return {}
    return {posixpath.basename(info["name"]): int(info.get("size") or 0)
            for info in fs.ls(path, detail=True) if info.get("type") != "directory"}


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


def _reusable(row: dict | None, src: str, dest_sizes: dict[str, int] | None, settings: FetchConfig) -> bool:
    if row is None or row["source_uri"] != src:
        return False
    if _VERIFY_LEVEL[row["verified"]] < _VERIFY_LEVEL["full" if settings.full_decode else "header"]:
        return False
    if settings.mode == "reference":
        return row["uri"] == src
    name = f"{row['image_id']}.jpg"
    return dest_sizes is not None and dest_sizes.get(name) == row["bytes"] and row["uri"] != src


def _plan(ids: list[int], source: ImageSource, root: str, settings: FetchConfig
          ) -> tuple[list[dict], list[dict], list[int]]:
    """(rows an earlier run verified, ids missing at a listable source, ids to fetch)."""
    state = load_state(root)
    dest_sizes = _list_sizes(images_folder(root)) if settings.mode == "copy" else None
    source_sizes = _list_sizes(source.listable_folder)
    if source_sizes == {} and ids and not any(i in state for i in ids) and not storage.exists(source.listable_folder):
        # A typo in --images would otherwise reject every image one by one as "missing".
        raise missing_path("images folder", source.listable_folder)
    reused: list[dict] = []
    missing: list[dict] = []
    todo: list[int] = []
    for image_id in ids:
        src = source.uri(image_id)
        if _reusable(state.get(image_id), src, dest_sizes, settings):
            reused.append(state[image_id])
        elif source_sizes is not None and posixpath.basename(src) not in source_sizes:
            missing.append({"image_id": image_id, "uri": src, "stage": "fetch",
                            "reason": "missing file (not found at source)"})
        else:
            todo.append(image_id)
    return reused, missing, todo


class _StateRecorder:
    """Verified rows written to the state folder a part of ``batch_size`` rows at a time."""

    def __init__(self, root: str, batch_size: int) -> None:
        self.folder, self.batch_size, self.pending = _state_folder(root), batch_size, []

    def add(self, row: dict) -> None:
        self.pending.append(row)
        if len(self.pending) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            # Time-ordered names: load_state lets the newest record of an image win.
            name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
            storage.write_parquet_atomic(pa.Table.from_pylist(self.pending, schema=IMAGE_SCHEMA),
                                         storage.join(self.folder, name))
            self.pending.clear()


def _fetch_all(todo: list[int], source: ImageSource, root: str, settings: FetchConfig
               ) -> Iterator[tuple[int, dict | ImageError | _Permanent]]:
    """Each id with its row, or the error that rejects it, in the order they finish."""
    with ThreadPoolExecutor(max_workers=max(1, settings.max_concurrency)) as pool:
        futures: dict[Future, int] = {}
        queue = iter(todo)
        # Keep at most 2x the thread count in flight so a million ids never sit in memory as futures.
        limit = 2 * max(1, settings.max_concurrency)
        while True:
            while len(futures) < limit:
                image_id = next(queue, None)
                if image_id is None:
                    break
                futures[pool.submit(_fetch_one, image_id, source, root, settings)] = image_id
            if not futures:
                break
            done, _ = wait(futures, return_when=FIRST_COMPLETED)
            for fut in done:
                image_id = futures.pop(fut)
                try:
                    outcome: dict | ImageError | _Permanent = fut.result()
                except (ImageError, _Permanent) as exc:
                    outcome = exc
                yield image_id, outcome


def _rejection(image_id: int, uri: str, error: ImageError | _Permanent) -> dict:
    stage, reason = (error.stage, error.reason) if isinstance(error, ImageError) else ("fetch", str(error))
    return {"image_id": image_id, "uri": uri, "stage": stage, "reason": reason}


def fetch_images(image_ids: Iterable[int], source: ImageSource | str, root: str,
                 settings: FetchConfig | None = None) -> FetchResult:
    """Fetch (or reference) and verify every image; one row per id in ``images`` or ``rejected``."""
    settings = settings or FetchConfig()
    if settings.mode not in ("copy", "reference"):
        raise ValueError(f"mode must be copy or reference, not {settings.mode!r}")
    source = ImageSource.parse(source) if isinstance(source, str) else source
    ok_rows, rejected, todo = _plan(list(dict.fromkeys(int(i) for i in image_ids)), source, root, settings)
    n_skipped = len(ok_rows)
    if n_skipped:
        logger.info("fetch: %d images already verified by an earlier run, %d to fetch", n_skipped, len(todo))
    recorder = _StateRecorder(root, settings.batch_size)
    with Progress(total=len(todo), desc="fetch images") as progress:
        for image_id, outcome in _fetch_all(todo, source, root, settings):
            if isinstance(outcome, dict):
                ok_rows.append(outcome)
                recorder.add(outcome)
            else:
                rejected.append(_rejection(image_id, source.uri(image_id), outcome))
            progress.update(1, rejected=len(rejected))
        recorder.flush()

    images = pa.Table.from_pylist(ok_rows, schema=IMAGE_SCHEMA).sort_by("image_id")
    rejected_table = pa.Table.from_pylist(rejected, schema=FETCH_REJECTED_SCHEMA).sort_by("image_id")
    return FetchResult(images=images, rejected=rejected_table, n_skipped=n_skipped,
                       n_fetched=len(todo))
