"""What a data root holds for the SQL views: its manifest, rejected and prediction files, and their sizes
(``tasks.analysis.sql.create_views`` points the views at them; ``read_plan`` chooses by the sizes)."""

from __future__ import annotations

import posixpath

import fsspec

from tasks.core import storage
from tasks.scoring.layout import Listed, prediction_data_entries

MANIFEST_SPLITS = ("train", "val", "test")


def data_files(root: str) -> dict[str, list[str]]:
    """The Parquet files of each view under ``root`` (full URLs; empty lists where none)."""
    return list_root(root)[0]


def list_root(root: str) -> tuple[dict[str, list[str]], dict[str, int]]:
    """``data_files(root)``, and the size in bytes of each file where its listing gave one (the read
    plan's input: one listing serves both)."""
    files, entries = list_root_entries(root)
    return files, listed_sizes(entries)


def list_root_entries(root: str) -> tuple[dict[str, list[str]], Listed]:
    """``data_files(root)``, and each file's listing entry by its URL (size; ETag on an object store): a
    remote root's DuckDB view answers its lookups of these files with them (``register_storage``)."""
    fs, base = storage.filesystem(root)
    folder = storage.join(base, "manifests")
    manifests = _file_entries(fs, folder)
    url = {name: storage.unstrip(fs, storage.join(folder, name)) for name in manifests}
    predictions = {storage.unstrip(fs, p): e for p, e in prediction_data_entries(fs, base).items()}
    files = {
        "manifests": sorted(url[n] for n in (f"{s}.parquet" for s in MANIFEST_SPLITS) if n in url),
        "rejected": [url["rejected.parquet"]] if "rejected.parquet" in url else [],
        "predictions": sorted(predictions),
    }
    return files, {url[name]: entry for name, entry in manifests.items()} | predictions


def listed_sizes(entries: Listed) -> dict[str, int]:
    """The size of each listed file whose entry gives one."""
    return {path: e["size"] for path, e in entries.items() if e.get("size") is not None}


def _file_entries(fs: fsspec.AbstractFileSystem, folder: str) -> Listed:
    """The names of the files in ``folder`` with their entries, from one listing (none when it is missing). On an
    object store this replaces a HEAD (and a LIST for a missing name) per manifest, and DuckDB's opens
    of these files ask no HEAD each (4-6 per file otherwise)."""
    try:
        entries = fs.ls(folder, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    return {posixpath.basename(e["name"].rstrip("/")): e for e in entries if e.get("type") != "directory"}
