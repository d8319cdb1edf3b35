"""The prediction output's layout on storage: folders, part names, markers, and which files readers see.

::

    {out}/model_version=<version>/date=<YYYY-MM-DD>/part-<shard:05d>-<key>.parquet   a committed part
    {out}/model_version=<version>/date=<YYYY-MM-DD>/_compacting-<merged stem>.json     a compaction under way
    {out}/model_version=<version>/date=<YYYY-MM-DD>/.tmp-*                               a writer's temporary

A shard's key has ``SHARD_KEY_HEX`` hex digits, a merged file's (``tasks.scoring.compaction``)
``MERGED_KEY_HEX``: the two can never share a name. Names starting with ``.`` or ``_`` are writers'
temporaries and markers, never data. Scoring reads its own parts only (``is_part``); the SQL views
read every data file a partition holds (``is_data_file``: also Parquet written by other tools).
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import re
from collections.abc import Iterable
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from tasks.core import storage

SHARD_KEY_HEX = 16
MERGED_KEY_HEX = 32
COMPACTING_PREFIX = "_compacting-"
HIDDEN_PREFIXES = (".", "_")  # temporaries (``.tmp-*``) and markers (``_compacting-*``)
SOURCES_KEY = "mpemd.compacted_from"  # Parquet key-value metadata of a merged file: JSON list of its sources
PART_RE = re.compile(r"^part-(?P<shard>\d+)-(?P<key>[0-9a-f]+)\.parquet$")
SCHEMA_RECORD = "_schema.json"  # {out}/model_version=<v>/_schema.json: the columns of every part of v
# What SCHEMA_RECORD holds for today's schema (tasks.scoring.predictions.schema_record_text of
# PREDICTION_SCHEMA, which tests/test_schema_record.py holds it to), as text: a reader checks a record
# without loading pyarrow (`mpemd sql` does not otherwise: ~0.17 s of every connect to a scored root).
PREDICTION_SCHEMA_RECORD = (
    '[["uri", "string"], ["image_id", "int64"], ["model", "string"], ["patch_mode", "string"], '
    '["n_patches", "int32"], ["dist", "fixed_size_list<item: float>[10]"], ["score", "double"], '
    '["score_std", "double"], ["width", "int32"], ["height", "int32"], ["aspect_ratio", "double"], '
    '["source_etag", "string"], ["source_size", "int64"], ["source_mtime", "double"], '
    '["scored_at", "timestamp[us, tz=UTC]"], ["status", "string"], ["error", "string"]]')
PARTITION_RE = re.compile(r"(^|/)model_version=[^/]+/date=[^/]+$")


def partition_url(out: str, model_version: str, date: str | None = None) -> str:
    url = storage.join(out, f"model_version={model_version}")
    return storage.join(url, f"date={date}") if date else url


def partition_of(path: str) -> tuple[str, str] | None:
    """``(model_version, date)`` of a file from its ``model_version=<v>/date=<d>/<file>`` path, else None."""
    parts = path.rsplit("/", 3)
    if len(parts) == 4 and parts[1].startswith("model_version=") and parts[2].startswith("date="):
        return parts[1].split("=", 1)[1], parts[2].split("=", 1)[1]
    return None


def part_name(shard_index: int, key: str) -> str:
    return f"part-{shard_index:05d}-{key}.parquet"


def part_url(out: str, model_version: str, date: str, shard_index: int, key: str) -> str:
    return storage.join(partition_url(out, model_version, date), part_name(shard_index, key))


def is_part(path: str) -> bool:
    """True for a part committed by scoring or compaction (by its name alone)."""
    return bool(PART_RE.match(posixpath.basename(path)))


def shard_index(path: str) -> int:
    """The shard index a part's name starts with (``part-<index>-<key>.parquet``)."""
    return int(PART_RE.match(posixpath.basename(path))["shard"])  # type: ignore[index]


def is_merged(path: str) -> bool:
    """True for a file written by compaction (by its name alone)."""
    match = PART_RE.match(posixpath.basename(path))
    return bool(match) and len(match["key"]) == MERGED_KEY_HEX


def is_data_file(path: str) -> bool:
    """True for any committed Parquet file (a reader's rule: temporaries and markers are not data)."""
    name = posixpath.basename(path)
    return name.endswith(".parquet") and not name.startswith(HIDDEN_PREFIXES)


def is_marker(path: str) -> bool:
    return posixpath.basename(path).startswith(COMPACTING_PREFIX)


def marker_name(merged: str) -> str:
    return f"{COMPACTING_PREFIX}{posixpath.basename(merged).removesuffix('.parquet')}.json"


def merged_of_marker(marker: str) -> str:
    """The merged file a marker announces (same folder)."""
    name = posixpath.basename(marker).removeprefix(COMPACTING_PREFIX).removesuffix(".json")
    return posixpath.join(posixpath.dirname(marker), f"{name}.parquet")


def schema_recorded(fs: fsspec.AbstractFileSystem, version_path: str) -> bool:
    """True when ``version_path`` (a ``model_version=`` folder) holds the record of today's schema."""
    try:
        return fs.cat_file(posixpath.join(version_path, SCHEMA_RECORD)).decode() == PREDICTION_SCHEMA_RECORD
    except FileNotFoundError:
        return False


def list_files(fs: fsspec.AbstractFileSystem, path: str) -> list[str]:
    """Every file under ``path`` (parts, temporaries, compaction markers), sorted; none if it is absent."""
    return list(list_entries(fs, path))


Listed = dict[str, dict[str, Any]]  # files by path, each with its listing entry (``list_entries``)


def list_entries(fs: fsspec.AbstractFileSystem, path: str) -> Listed:
    """``list_files`` with each file's listing entry (size, ETag...: ``fs.find(detail=True)``'s), by
    path: a reader opens a listed file with it (``storage.open_listed``) and looks nothing up."""
    fs.invalidate_cache(path)  # files committed by other processes (Dask workers, earlier runs)
    if not fs.exists(path):
        return {}
    found = fs.find(path, detail=True)
    return {p: found[p] for p in sorted(found)}


def part_paths(paths: Iterable[str]) -> list[str]:
    """The committed part files of a listing (temporary and foreign files are ignored)."""
    return sorted(p for p in paths if is_part(p))


def sources_of(fs: fsspec.AbstractFileSystem, merged: str) -> list[str]:
    """The part names a merged file lists in its footer (only the footer is read)."""
    with storage.open_parquet(fs, merged) as part:  # (pyarrow loaded there: `mpemd sql` lists without it)
        meta = part.metadata.metadata or {}
    return json.loads(meta.get(SOURCES_KEY.encode(), b"[]"))


def superseded(fs: fsspec.AbstractFileSystem, paths: Iterable[str]) -> set[str]:
    """Of ``paths`` (a listing), the sources of interrupted compactions whose merged file is committed:
    readers skip them, since the merged file holds their rows. Reads one footer per marker."""
    paths = set(paths)
    hidden: set[str] = set()
    for marker in filter(is_marker, paths):
        merged = merged_of_marker(marker)
        if merged in paths:
            with contextlib.suppress(FileNotFoundError):  # merged again meanwhile: nothing to hide
                folder = posixpath.dirname(marker)
                hidden.update(posixpath.join(folder, s) for s in sources_of(fs, merged))
    return hidden


def _unsuperseded(fs: fsspec.AbstractFileSystem, listing: list[str], files: list[str]) -> list[str]:
    """``files`` less the sources of a compaction caught between its commit and its deletes (the merged
    file holds their rows: counted twice otherwise). Reads footers only while a marker is listed."""
    if not any(map(is_marker, listing)):  # never in normal operation
        return files
    hidden = superseded(fs, listing)
    return [p for p in files if p not in hidden]


def visible_parts(fs: fsspec.AbstractFileSystem, listing: list[str]) -> list[str]:
    """The committed parts of a listing that readers count (scoring's rule)."""
    return _unsuperseded(fs, listing, part_paths(listing))


def visible_entries(fs: fsspec.AbstractFileSystem, listing: Listed) -> Listed:
    """``visible_parts`` of a listing with entries, with their entries."""
    return {p: listing[p] for p in visible_parts(fs, list(listing))}


def prediction_data_entries(fs: fsspec.AbstractFileSystem, base: str) -> Listed:
    """The prediction data files under a root's ``predictions/`` that readers count (the SQL views'
    rule), in path order, each with its listing entry: its size, and on an object store its ETag too
    (``fs.find(detail=True)``'s; a reader of a remote root answers DuckDB's lookups with them).

    One recursive listing (``find``; s3fs: a request per 1,000 keys): a glob of
    ``model_version=*/date=*/*`` asked one listing per version and one per date folder, one after
    another (5 for one version of two dates). A local root is walked with ``os.scandir`` (fsspec's
    local ``find`` cost ~16 us a file, ~80 ms over 5,008 shard files).

    A root with no prediction file there that holds ``model_version=<v>/`` folders itself is read as
    the predictions folder: ``mpemd score --out ./scores`` then ``mpemd sql ... --root ./scores`` (was:
    0 rows, silently)."""
    found = _prediction_files_under(fs, storage.join(base, "predictions"))
    if not found and any(posixpath.basename(p.rstrip("/")).startswith("model_version=") for p in _folders(fs, base)):
        found = _prediction_files_under(fs, base)
    return found


def _prediction_files_under(fs: fsspec.AbstractFileSystem, url: str) -> Listed:
    folder = fs._strip_protocol(url).rstrip("/")
    if isinstance(fs, LocalFileSystem):
        found = _partition_files(folder)
    else:
        try:
            found = fs.find(folder, detail=True)
        except FileNotFoundError:
            found = {}
    listing = sorted(p for p in found if p.rsplit("/", 3)[0] == folder and partition_of(p))
    return {p: found[p] for p in _unsuperseded(fs, listing, [p for p in listing if is_data_file(p)])}


def _folders(fs: fsspec.AbstractFileSystem, url: str) -> list[str]:
    """The folders directly in ``url`` (none where it is missing or not a folder)."""
    try:
        return [e["name"] for e in fs.ls(fs._strip_protocol(url), detail=True) if e.get("type") == "directory"]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _partition_files(folder: str) -> Listed:
    """Each file two folders below the local ``folder`` (``model_version=<v>/date=<d>/<file>``) with its
    size, as fsspec's local entry. As fsspec's ``find``: a link to a file is listed (its target's
    size), a link to a folder is not entered."""
    found: Listed = {}
    for version in _subfolders(folder):
        for partition in _subfolders(version):
            with contextlib.suppress(FileNotFoundError, NotADirectoryError), os.scandir(partition) as entries:
                for entry in entries:
                    with contextlib.suppress(OSError):  # gone since the scan, or a broken link
                        if entry.is_file():
                            path = f"{partition}/{entry.name}"
                            found[path] = {"name": path, "size": entry.stat().st_size, "type": "file"}
    return found


def _subfolders(folder: str) -> list[str]:
    try:
        with os.scandir(folder) as entries:
            return [f"{folder}/{e.name}" for e in entries if e.is_dir(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []
