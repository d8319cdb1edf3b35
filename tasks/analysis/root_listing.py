"""What a data root holds for the SQL views: its manifest, rejected and prediction files, and their sizes
(``tasks.analysis.sql.create_views`` points the views at them; ``read_plan`` chooses by the sizes)."""

from __future__ import annotations

import posixpath

import fsspec

from tasks.core import storage
from tasks.scoring.layout import prediction_data_file_sizes

MANIFEST_SPLITS = ("train", "val", "test")


def data_files(root: str) -> dict[str, list[str]]:
    """The Parquet files of each view under ``root`` (full URLs; empty lists where none)."""
    return list_root(root)[0]


def list_root(root: str) -> tuple[dict[str, list[str]], dict[str, int]]:
    """``data_files(root)``, and the size in bytes of each file where its listing gave one (the read
    plan's input: one listing serves both)."""
    fs, base = storage.filesystem(root)
    folder = storage.join(base, "manifests")
    manifest_sizes = _file_sizes(fs, folder)
    url = {name: storage.unstrip(fs, storage.join(folder, name)) for name in manifest_sizes}
    prediction_sizes = {storage.unstrip(fs, p): size for p, size in prediction_data_file_sizes(fs, base).items()}
    files = {
        "manifests": sorted(url[n] for n in (f"{s}.parquet" for s in MANIFEST_SPLITS) if n in url),
        "rejected": [url["rejected.parquet"]] if "rejected.parquet" in url else [],
        "predictions": sorted(prediction_sizes),
    }
    sizes = {url[name]: size for name, size in manifest_sizes.items()} | prediction_sizes
    return files, {path: size for path, size in sizes.items() if size is not None}


def _file_sizes(fs: fsspec.AbstractFileSystem, folder: str) -> dict[str, int | None]:
    """The names in ``folder`` and their sizes, from one listing (none when it is missing). On an object
    store this replaces a HEAD (and a LIST for a missing name) per manifest, and leaves the folder in
    s3fs's listing cache, so DuckDB's opens of these files ask no HEAD each (4-6 per file otherwise)."""
    try:
        entries = fs.ls(folder, detail=True)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    return {posixpath.basename(e["name"].rstrip("/")): e.get("size") for e in entries if e.get("type") != "directory"}
