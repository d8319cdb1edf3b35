"""What to score: the image files under a source URL, with the facts that tell whether they changed.

A source is a folder or prefix (``/data/imgs``, ``s3://bucket/prefix``), a glob
(``s3://bucket/2024-*/**.jpg``) or a manifest Parquet (a ``uri`` column, optionally ``image_id``,
``size``, ``etag``). Size, ETag and modification time come from the LISTING itself
(``fs.find(detail=True)``, ``fs.glob(detail=True)``, one ``ls`` per folder of a manifest), never
from one request per object: a million-object bucket is a few thousand list pages, not a million
HEADs. The order is deterministic (sorted by URI) so shards are stable between runs.

Which files are images: every format the decoder reads (``tasks.core.images.SUPPORTED_FORMATS``: JPEG, PNG,
WEBP, GIF, BMP, TIFF and the rest Pillow opens here). A name with one of their extensions is listed
as is (the decoder goes by content, so a PNG named ``.jpg`` is fine, and a text file named ``.jpg``
becomes an error row). A name without such an extension (``IMG_0001``, ``photo.dat``) is decided by
content: the first bytes, one small ranged read per such file, are matched against the formats'
magic numbers. Files that are not images by name or content are skipped and counted.
"""

from __future__ import annotations

import posixpath
import struct
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow.parquet as pq
from PIL import Image

from tasks.core import storage
from tasks.core.errors import missing_path
from tasks.core.images import SUPPORTED_FORMATS

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    ext for ext, fmt in Image.registered_extensions().items() if fmt in SUPPORTED_FORMATS)
_HEAD_BYTES = 64  # Pillow's format checks look at the first 16 bytes at most
_GLOB_CHARS = ("*", "?", "[")


@dataclass(frozen=True)
class SourceObject:
    """One listed image file: where it is and the listing's facts about its current content."""

    uri: str
    size: int | None = None
    etag: str | None = None  # object stores: the ETag without quotes; local files: None
    mtime: float | None = None  # seconds since the epoch (UTC)
    image_id: int | None = None  # from a manifest, or the file stem when it is an integer

    @property
    def fingerprint(self) -> str:
        """A token that changes when the content does: the ETag, else size and mtime."""
        return storage.content_fingerprint(self.etag, self.size, self.mtime)


@dataclass
class Listing:
    """Listed images (sorted by URI) and the non-image files that were skipped."""

    source: str
    objects: list[SourceObject]
    skipped_non_image: int = 0
    skipped_examples: list[str] = field(default_factory=list)  # a few, for the run summary
    by_content: int = 0  # listed although the name has no image extension (its first bytes say image)


def is_image_name(name: str) -> bool:
    return posixpath.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def image_format_of(head: bytes) -> str | None:
    """The decodable format whose magic number starts ``head`` (Pillow's own checks), or None.

    Formats without a magic number (TGA) are recognised by extension only.
    """
    for fmt in sorted(SUPPORTED_FORMATS):
        accept = Image.OPEN.get(fmt, (None, None))[1]
        try:
            if accept is not None and head and accept(head):
                return fmt
        except (SyntaxError, IndexError, TypeError, struct.error):  # a short head, as Image.open allows
            continue
    return None


def _images_by_content(fs: fsspec.AbstractFileSystem, paths: list[str]) -> set[str]:
    """Those of ``paths`` whose first bytes are an image's; one concurrent ranged read each.

    A file that cannot be read now is kept: scoring then records why (a fetch error the next run retries).
    """
    if not paths:
        return set()
    heads = fs.cat_ranges(paths, [0] * len(paths), [_HEAD_BYTES] * len(paths), on_error="return")
    return {p for p, head in zip(paths, heads, strict=True)
            if isinstance(head, Exception) or image_format_of(bytes(head)) is not None}


def image_id_from_name(uri: str) -> int | None:
    """AVA names images ``<image_id>.jpg``: the stem when it is a plain integer, else None."""
    stem = posixpath.splitext(posixpath.basename(uri))[0]
    return int(stem) if stem.isdigit() and len(stem) < 19 else None


def _object(fs: fsspec.AbstractFileSystem, path: str, info: dict[str, Any], image_id: int | None = None
            ) -> SourceObject:
    uri = storage.unstrip(fs, path)
    version = storage.file_version(info)
    return SourceObject(uri=uri, size=version.size, etag=version.etag, mtime=version.mtime,
                        image_id=image_id if image_id is not None else image_id_from_name(uri))


def _split(fs: fsspec.AbstractFileSystem, entries: Iterable[tuple[str, dict[str, Any]]], source: str,
           image_ids: dict[str, int | None] | None = None) -> Listing:
    files = [(path, info) for path, info in entries if info.get("type", "file") == "file"]
    unnamed = [path for path, _ in files if not is_image_name(path)]
    by_content = _images_by_content(fs, unnamed)
    objects, skipped = [], []
    for path, info in files:
        if is_image_name(path) or path in by_content:
            objects.append(_object(fs, path, info, (image_ids or {}).get(path)))
        else:
            skipped.append(storage.unstrip(fs, path))
    objects.sort(key=lambda o: o.uri)
    skipped.sort()
    return Listing(source, objects, len(skipped), skipped[:10], by_content=len(by_content))


def list_source(source: str, **storage_options: Any) -> Listing:
    """List the images of a folder/prefix, a glob or a manifest Parquet (see the module doc)."""
    fs, path = storage.filesystem(source, **storage_options)
    fs.invalidate_cache()  # a long-lived process must see tonight's bucket, not a cached listing
    if path.endswith(".parquet") and fs.isfile(path):
        return _list_manifest(fs, source)
    if any(c in path for c in _GLOB_CHARS):
        found = fs.glob(path, detail=True)
    else:
        if not fs.exists(path):
            raise missing_path("source", source)
        found = fs.find(path, detail=True)
    return _split(fs, found.items(), source)


def _list_manifest(fs: fsspec.AbstractFileSystem, source: str) -> Listing:
    """A manifest names its images; their facts come from one ``ls`` per folder (or its own columns)."""
    with fs.open(storage.filesystem(source)[1], "rb") as f:
        table = pq.read_table(f)
    if "uri" not in table.column_names:
        raise ValueError(f"manifest {source} has no 'uri' column (has {table.column_names})")
    columns = table.to_pydict()
    uris: list[str] = columns["uri"]
    ids = columns.get("image_id") or [None] * len(uris)
    has_facts = "size" in columns and ("etag" in columns or "mtime" in columns)
    entries: list[tuple[str, dict[str, Any]]] = []
    id_by_path: dict[str, int | None] = {}
    by_folder: dict[str, list[str]] = defaultdict(list)
    for i, uri in enumerate(uris):
        path = fs._strip_protocol(uri)
        id_by_path[path] = ids[i]
        if has_facts:
            entries.append((path, {"size": columns["size"][i], "ETag": (columns.get("etag") or [None] * len(uris))[i],
                                   "mtime": (columns.get("mtime") or [None] * len(uris))[i]}))
        else:
            by_folder[posixpath.dirname(path)].append(path)
    for folder, paths in by_folder.items():
        try:
            listed = {info["name"].rstrip("/"): info for info in fs.ls(folder, detail=True)}
        except FileNotFoundError:
            listed = {}
        # A manifest entry that is not there is kept (size None): scoring reports it as a fetch error.
        entries.extend((p, listed.get(p, {"type": "file"})) for p in paths)
    return _split(fs, entries, source, id_by_path)


def cut_into_shards(objects: Sequence[SourceObject], shard_size: int) -> list[list[SourceObject]]:
    """Consecutive runs of ``shard_size`` objects (the last one may be shorter)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    return [list(objects[i:i + shard_size]) for i in range(0, len(objects), shard_size)]
