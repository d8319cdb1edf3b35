"""Compaction: merge a ``date=`` partition's part files into one, exactly once (like Delta/Iceberg OPTIMIZE).

Scoring commits one Parquet part per 1,000-image shard, so 5 M rows become ~5,000 files and every
DuckDB query pays a per-file cost. ``compact_partition`` rewrites the partition's parts as ONE part
(same ``PREDICTION_SCHEMA``, zstd, row groups of ``ROW_GROUP_ROWS``), rows unchanged, then deletes
the merged sources. ``compact_output`` does it for every partition of an output under the output lock.

The name of the merged file
    ``part-<lowest source shard index:05d>-<32 hex>.parquet``: the key is the first 32 hex digits of
    the SHA-256 of the sorted source names. It is a part name (``tasks.scoring.layout.is_part``), so
    ``list_parts``, ``read_state``, ``read_predictions`` and the SQL views read it like any part.
    A shard's key is always 16 hex digits (``shard_key``), so a merged name can never equal a shard's
    name: a retried shard looks for its own 16-hex name, and finds it only if that shard itself is
    still committed (``reused``), never a merged file holding other rows. The name is a function of
    the source set, so redoing a compaction that died before its commit writes the same name again.
    Merging a merged file with newer parts gives a new name (its source set differs).

Crash safety (one writer: the caller holds ``tasks.scoring.output_lock``; ``assert_held`` before each write)
    1. a marker ``_compacting-<merged stem>.json`` is written (readers skip ``_*``; it lists the sources);
    2. the merged file is written to a temporary name and committed atomically (rename locally, one
       PUT or a completed multipart upload on object stores), with the source names in its Parquet
       key-value metadata (``mpemd.compacted_from``); its footer row count is checked against the
       rows read, source by source;
    3. the sources are deleted, then the marker.
    A death before 2 leaves the sources untouched and no merged file (the marker alone is dropped
    later). A death between 2 and the end of 3 leaves the merged file AND some sources, i.e. each
    of those rows twice. Whoever next holds the lock finishes it before anything else: every
    compaction, and every scoring run in its plan step (``finish_interrupted``), deletes the sources
    that a committed merged file lists while its marker exists, then the marker.

    Why a marker as well as the metadata: a source name can come back after the compaction ended
    (a shard whose only row was a transient fetch error is planned again the same day with the same
    images: same index, same key, same name). Without the marker, "delete what a merged file lists"
    would delete that new part. The marker bounds the time a merged file's list is acted upon to the
    interrupted compaction itself; it also makes detection free: a plain listing shows it.

What readers see in the crash window
    ``list_parts`` (hence ``read_state``, ``read_predictions``, scoring's plan) hides the sources a
    marked, committed merged file lists: it reads only those merged files' footers, and only while a
    marker is in the listing (never in normal operation). The SQL views (``tasks.analysis.sql.data_files``)
    skip them by the same rule, so raw counts over ``predictions`` do not see them twice either.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import signal
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.core import storage
from tasks.core.errors import missing_path
from tasks.core.schemas import PREDICTION_SCHEMA, conform
from tasks.scoring.layout import (
    MERGED_KEY_HEX,
    PARTITION_RE,
    SOURCES_KEY,
    Listed,
    is_marker,
    list_entries,
    marker_name,
    merged_of_marker,
    part_name,
    part_paths,
    partition_url,
    shard_index,
    sources_of,
)
from tasks.scoring.output_lock import assert_held, output_lock

# Fault injection for tests: a process whose MPEMD_KILL_AT names this point SIGKILLs itself there (a
# real kill at a moment no drawn time hits reliably; tests/test_compaction.py). Unset: one lookup.
KILL_AT_WRITING_MERGED = "compaction-writing-merged"
DELETE_BATCH = 1_000  # files a delete call on object stores: S3's DeleteObjects takes at most 1,000 keys


def _kill_point(name: str) -> None:
    if os.environ.get("MPEMD_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)


# DuckDB's unit of parallel scan is the row group (its own writer uses 122,880 rows): 2^17 rows give a
# 16-thread query enough groups on a day's output and keep the merge's memory low (docs/performance.md).
ROW_GROUP_ROWS = 1 << 17
COMPRESSION = "zstd"  # as storage.write_parquet_atomic
# Source tables waiting for a row group are copied into one table this many at a time: a part of 10
# rows held ~19 KB as its own table (wrappers, buffers, allocator pages), so 10^4 such parts pending
# took 186 MB, and 28 MB combined (docs/performance.md). Each row is copied once.
COMBINE_TABLES = 256


@dataclass(frozen=True)
class PartitionCompaction:
    """What compacting one partition did."""

    partition: str
    files_before: int  # part files before (sources of an interrupted compaction excluded)
    files_after: int
    rows: int  # rows in the merged file (0: nothing merged)
    merged: str | None  # the merged file's URL
    finished_sources: int  # sources of an interrupted compaction deleted first


def merged_name(sources: Iterable[str]) -> str:
    """The merged file's name: lowest shard index of the sources, 32-hex key of their sorted names."""
    names = sorted(posixpath.basename(s) for s in sources)
    key = hashlib.sha256("\n".join(names).encode()).hexdigest()[:MERGED_KEY_HEX]
    return part_name(min(map(shard_index, names)), key)


def _url(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return storage.unstrip(fs, path)


def _delete(fs: fsspec.AbstractFileSystem, path: str | list[str]) -> None:
    """Delete one file, or a list of files in one call (already gone is fine). A module function so
    fault tests can fail it."""
    with contextlib.suppress(FileNotFoundError):  # a batch that stopped there: _delete_all lists what is left
        if isinstance(path, str):
            fs.rm_file(path)
        else:
            fs.rm(path)


def _delete_all(fs: fsspec.AbstractFileSystem, paths: list[str], guard: str) -> None:
    """Delete ``paths`` (files of one folder), the lock checked before each call: one file a call on a
    local disk, up to ``DELETE_BATCH`` a call on object stores (s3fs sends a list as one DeleteObjects
    request; a file a call cost a request each: 1,000 requests a partition at 10^6 images a night).

    A batch's failures are not reported: s3fs asks for a quiet reply and ignores its errors, and other
    backends stop at a file already gone. So the folder is listed again (a request per 1,000 keys) and
    whatever is still there is deleted one file at a time, where a failure raises."""
    if not paths or storage.protocol_of(_url(fs, paths[0])) == "file":
        batches: list[str | list[str]] = list(paths)
    else:
        batches = [paths[i:i + DELETE_BATCH] for i in range(0, len(paths), DELETE_BATCH)]
    for batch in batches:
        assert_held(guard)
        _delete(fs, batch)
    if len(batches) < len(paths):
        folder = posixpath.dirname(paths[0])
        fs.invalidate_cache(folder)
        left = set(fs.find(folder))  # not list_files: its check that the folder exists is a HEAD
        for path in (p for p in paths if p in left):
            assert_held(guard)
            _delete(fs, path)


def _is_scratch_of(path: str, merged: str) -> bool:
    name = posixpath.basename(path)
    return (posixpath.dirname(path) == posixpath.dirname(merged) and name.startswith(".tmp-")
            and name.endswith(f"-{posixpath.basename(merged)}"))


def _finish(fs: fsspec.AbstractFileSystem, paths: list[str], guard: str) -> tuple[list[str], int]:
    """Finish the interrupted compactions in a listing: delete the sources a committed, marked merged
    file lists, then the marker (a marker without its merged file died before the commit: dropped,
    with the scratch file it was writing).
    Returns the listing without what was deleted, and how many sources were deleted. ``guard``: the
    folder's URL as the caller wrote it (under the locked output's URL, for ``assert_held``)."""
    gone: set[str] = set()
    deleted = 0
    for marker in list(filter(is_marker, paths)):
        merged = merged_of_marker(marker)
        if merged in paths:
            folder = posixpath.dirname(marker)
            listed = set(paths) - gone
            sources = [s for s in dict.fromkeys(posixpath.join(folder, s) for s in sources_of(fs, merged))
                       if s in listed and s != merged]
            _delete_all(fs, sources, guard)
            gone.update(sources)
            deleted += len(sources)
        # The dead compaction's scratch file (``_scratch``: beside the target on local disks).
        for leftover in [p for p in paths if _is_scratch_of(p, merged)]:
            assert_held(guard)
            _delete(fs, leftover)
            gone.add(leftover)
        assert_held(guard)
        _delete(fs, marker)
        gone.add(marker)
    return [p for p in paths if p not in gone], deleted


def finish_interrupted(out: str, model_version: str) -> Listed:
    """Scoring's plan step, under the output lock: finish any interrupted compaction of this model
    version and return its committed parts with their listing entries (one listing, as
    ``listed_parts``; nothing read otherwise)."""
    url = partition_url(out, model_version)
    fs, path = storage.filesystem(url)
    listing = list_entries(fs, path)
    paths = list(listing)
    if any(map(is_marker, paths)):
        paths, _ = _finish(fs, paths, url)
    return {p: listing[p] for p in part_paths(paths)}


def _source_batches(fs: fsspec.AbstractFileSystem, sources: Listed) -> Iterator[pa.Table]:
    """Every row of every source, file by file; raises if a file yields fewer rows than its footer says.

    ``sources``: each file's listing entry. Opened with it, a file is not looked up first (s3fs: a HEAD
    a file here, since writing the marker dropped the folder's listing cache); the sources do not
    change under the output lock."""
    for source, entry in sources.items():
        with storage.open_parquet(fs, source, entry) as reader:
            seen = 0
            for batch in reader.iter_batches(batch_size=65_536):
                seen += batch.num_rows
                yield conform(batch)  # an older writer's missing column: nulls
            if seen != reader.metadata.num_rows:
                raise RuntimeError(f"{source}: read {seen} rows, footer says {reader.metadata.num_rows}")


def _write_merged(fs: fsspec.AbstractFileSystem, sources: Listed, local_file: str) -> int:
    """Stream the sources into one Parquet file at ``local_file``; returns its row count."""
    rows = 0
    pending: list[pa.Table] = []
    buffered = fresh = 0  # rows pending; tables read since the last combine
    with pq.ParquetWriter(local_file, PREDICTION_SCHEMA, compression=COMPRESSION) as writer:
        for table in _source_batches(fs, sources):
            pending.append(table)
            buffered, fresh = buffered + table.num_rows, fresh + 1
            if fresh == COMBINE_TABLES:  # small sources: each table held ~19 KB besides its rows
                pending[-fresh:], fresh = [pa.concat_tables(pending[-fresh:]).combine_chunks()], 0
            while buffered >= ROW_GROUP_ROWS:  # full row groups only, the rest waits for more rows
                whole = pa.concat_tables(pending)  # no copy: a row group may span chunks
                writer.write_table(whole.slice(0, ROW_GROUP_ROWS), row_group_size=ROW_GROUP_ROWS)
                pending, buffered, fresh = [whole.slice(ROW_GROUP_ROWS)], buffered - ROW_GROUP_ROWS, 0
            rows += table.num_rows
        if buffered:
            writer.write_table(pa.concat_tables(pending), row_group_size=ROW_GROUP_ROWS)
        _kill_point(KILL_AT_WRITING_MERGED)  # the rows are in the temporary file, its footer is not
        names = [posixpath.basename(s) for s in sources]
        writer.add_key_value_metadata({SOURCES_KEY: json.dumps(names), "mpemd.compacted_rows": str(rows)})
    return rows


def _commit(fs: fsspec.AbstractFileSystem, local_file: str, target: str, guard: str) -> None:
    """Move the finished file into place atomically: a rename locally, one upload elsewhere (an
    object appears whole or not at all, multipart uploads included)."""
    assert_held(guard)
    if storage.protocol_of(_url(fs, target)) == "file":
        with open(local_file, "rb") as f:
            os.fsync(f.fileno())
        os.replace(local_file, target)
    else:
        fs.put_file(local_file, target)
        fs.invalidate_cache(posixpath.dirname(target))


@contextlib.contextmanager
def _scratch(fs: fsspec.AbstractFileSystem, folder: str, name: str) -> Iterator[str]:
    """A temporary file for the merged rows: beside the target locally (same disk: rename is atomic;
    ``.tmp-*`` is a name readers skip), in the temp folder for object stores. Removed if left over."""
    if storage.protocol_of(_url(fs, folder)) == "file":
        path = posixpath.join(folder, f".tmp-{uuid.uuid4().hex}-{name}")
    else:
        path = os.path.join(tempfile.gettempdir(), f"mpemd-compact-{uuid.uuid4().hex}-{name}")
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def _merge(fs: fsspec.AbstractFileSystem, folder: str, sources: Listed,
           guard: str) -> tuple[str, int]:
    """Steps 1-3 of the module docstring for one partition's ``sources`` (path: listing entry); returns
    (merged path, rows)."""
    name = merged_name(sources)
    merged, marker = posixpath.join(folder, name), posixpath.join(folder, marker_name(name))
    assert_held(guard)
    storage.write_bytes_atomic(_url(fs, marker), json.dumps({"merged": name, "sources": [
        posixpath.basename(s) for s in sources]}).encode())
    try:
        with _scratch(fs, folder, name) as local_file:
            rows = _write_merged(fs, sources, local_file)
            _commit(fs, local_file, merged, guard)
    except BaseException:
        if not fs.exists(merged):  # failed before the commit: sources untouched, the marker goes too
            _delete(fs, marker)
        raise
    with storage.open_parquet(fs, merged) as committed_file:  # what readers will see: the committed footer
        committed = committed_file.metadata.num_rows
    if committed != rows:
        raise RuntimeError(f"{merged}: {committed} rows committed, {rows} read; sources kept")
    _delete_all(fs, list(sources), guard)
    assert_held(guard)
    _delete(fs, marker)
    return merged, rows


def _compact_listed(fs: fsspec.AbstractFileSystem, folder: str, listing: Listed,
                    url: str) -> PartitionCompaction:
    """One partition: ``folder`` (the filesystem's path), its listing (path: entry), and its URL as the
    caller wrote it."""
    paths, finished = _finish(fs, list(listing), url)
    parts = part_paths(paths)
    if len(parts) < 2:  # nothing to merge: listed, never read
        return PartitionCompaction(url, len(parts), len(parts), 0, None, finished)
    merged, rows = _merge(fs, folder, {p: listing[p] for p in parts}, url)
    return PartitionCompaction(url, len(parts), 1, rows, storage.join(url, posixpath.basename(merged)), finished)


def compact_partition(partition: str) -> PartitionCompaction:
    """Merge the part files of one ``{out}/model_version=<v>/date=<d>`` partition into one.

    The caller holds the output lock (``tasks.scoring.output_lock.output_lock``). A partition with fewer
    than 2 parts is only listed. An interrupted earlier compaction is finished first.
    """
    fs, folder = storage.filesystem(partition)
    return _compact_listed(fs, folder.rstrip("/"), list_entries(fs, folder), partition.rstrip("/"))


def _partitions(fs: fsspec.AbstractFileSystem, root: str) -> dict[str, Listed]:
    """``model_version=<v>/date=<d>`` folders under ``root`` -> their files' entries (one recursive listing)."""
    found: dict[str, Listed] = {}
    for path, entry in list_entries(fs, root).items():
        folder = posixpath.dirname(path)
        if PARTITION_RE.search(folder):
            found.setdefault(folder, {})[path] = entry
    return found


def compact_output(out: str, model_version: str | None = None, *, lock_wait_s: float = 0.0) -> dict[str, Any]:
    """Compact every ``date=`` partition of ``out`` (or of one model version), under the output lock
    (waits ``lock_wait_s`` for a run holding it, then raises ``OutputLocked``). Returns a summary:
    partitions, files before/after, rows merged, and one entry per partition."""
    start = time.perf_counter()
    root = partition_url(out, model_version) if model_version else out
    if not storage.exists(out):  # a mistyped root: not created by the lock file, nor reported as tidy
        raise missing_path("predictions root", out)
    with output_lock(out, wait_s=lock_wait_s):
        fs, path = storage.filesystem(root)
        path = path.rstrip("/")
        done = [_compact_listed(fs, folder, paths, storage.join(root, posixpath.relpath(folder, path)))
                for folder, paths in sorted(_partitions(fs, path).items())]
    return {
        "out": out, "model_version": model_version, "partitions": len(done),
        "partitions_compacted": sum(p.merged is not None for p in done),
        "files_before": sum(p.files_before for p in done), "files_after": sum(p.files_after for p in done),
        "rows": sum(p.rows for p in done), "finished_interrupted": sum(p.finished_sources for p in done),
        "seconds": round(time.perf_counter() - start, 3),
        "details": [asdict(p) for p in done],
    }
