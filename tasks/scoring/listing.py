"""What to score: the image files under a source URL, with the facts that tell whether they changed.

A source is a folder or prefix (``/data/imgs``, ``s3://bucket/prefix``), a glob
(``s3://bucket/2024-*/**/*.jpg``; fsspec refuses ``**.jpg``) or a manifest Parquet (a ``uri`` column, optionally ``image_id``,
``size``, ``etag``). Size, ETag and modification time come from the LISTING itself
(what ``fs.find``/``fs.glob(detail=True)`` list, one ``ls`` per folder of a manifest), never
from one request per object: a million-object bucket is a few thousand list pages, not a million
HEADs. The order is deterministic (sorted by URI) so shards are stable between runs.

Which files are images: every format the decoder reads (``tasks.core.images.SUPPORTED_FORMATS``: JPEG, PNG,
WEBP, GIF, BMP, TIFF and the rest Pillow opens here). A name with one of their extensions is listed
as is (the decoder goes by content, so a PNG named ``.jpg`` is fine, and a text file named ``.jpg``
becomes an error row). A name without such an extension (``IMG_0001``, ``photo.dat``) is decided by
content: the first bytes, one small ranged read per such file, are matched against the formats'
magic numbers. Files that are not images by name or content are skipped and counted.

Memory: a nightly no-op lists millions of objects. A local folder is walked one directory at a time
and an S3 prefix or ``**`` glob is read one list page at a time (``tasks.core.store_pages``):
``fs.find`` would hold every file's stat or info dict at once, ~1-2 KB each. The listing keeps its facts
as columns (``SourceObjects``: the URIs and numpy arrays), not one Python object per image.
"""

from __future__ import annotations

import posixpath
import struct
from array import array
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, overload

import fsspec
import numpy as np
from PIL import Image

from tasks.core import storage, store_pages
from tasks.core.errors import missing_path
from tasks.core.images import SUPPORTED_FORMATS

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    ext for ext, fmt in Image.registered_extensions().items() if fmt in SUPPORTED_FORMATS)
_HEAD_BYTES = 64  # Pillow's format checks look at the first 16 bytes at most
_CHUNK = 10_000  # listed entries split at a time (bounds the transient stat dicts and ranged reads)


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


class SourceObjects(Sequence[SourceObject]):
    """Listed objects held as columns (a URI string and ~25 bytes of arrays each), not as Python objects.

    Indexing builds the ``SourceObject`` (a slice builds a list of them); a missing fact (None) is kept
    by a flag, so every object reads back exactly as it was listed."""

    def __init__(self, objects: Iterable[SourceObject] = ()) -> None:
        self._uris: list[str] = []
        self._etags: list[str | None] = []
        self._size: Any = array("q")  # array.array while appending; numpy once sorted
        self._mtime: Any = array("d")
        self._id: Any = array("q")
        self._flags: Any = bytearray()  # per object: which of size, mtime, image_id is not None
        for obj in objects:
            self.append(obj)

    def append(self, obj: SourceObject) -> None:
        self._uris.append(obj.uri)
        self._etags.append(obj.etag)
        self._size.append(obj.size or 0)
        self._mtime.append(obj.mtime or 0.0)
        self._id.append(obj.image_id or 0)
        self._flags.append((obj.size is not None) | (obj.mtime is not None) << 1 | (obj.image_id is not None) << 2)

    def __len__(self) -> int:
        return len(self._uris)

    @overload
    def __getitem__(self, index: int) -> SourceObject: ...

    @overload
    def __getitem__(self, index: slice) -> list[SourceObject]: ...

    def __getitem__(self, index: int | slice) -> SourceObject | list[SourceObject]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        flags = int(self._flags[index])
        return SourceObject(uri=self._uris[index], size=int(self._size[index]) if flags & 1 else None,
                            etag=self._etags[index], mtime=float(self._mtime[index]) if flags & 2 else None,
                            image_id=int(self._id[index]) if flags & 4 else None)

    def __iter__(self) -> Iterator[SourceObject]:
        return (self[i] for i in range(len(self)))

    def sort_by_uri(self) -> None:
        """Put the objects in URI order (Python's string order, as ``sorted`` gives)."""
        order = np.argsort(np.array(self._uris, dtype=object), kind="stable")
        self._uris = [self._uris[i] for i in order]
        self._etags = [self._etags[i] for i in order]
        self._size, self._mtime, self._id, self._flags = (
            np.asarray(column)[order] for column in (self._size, self._mtime, self._id,
                                                     np.frombuffer(bytes(self._flags), np.uint8)))


@dataclass
class Listing:
    """Listed images (sorted by URI) and the non-image files that were skipped."""

    source: str
    objects: Sequence[SourceObject]
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
    """Images and skipped files of ``entries``, consumed a chunk at a time (the stat dicts of a chunk
    are let go before the next one is read)."""
    objects, examples = SourceObjects(), []
    skipped = by_content = 0
    entries = iter(entries)
    while chunk := list(islice(entries, _CHUNK)):
        # a key ending in "/" is a folder placeholder (what S3 consoles make), not an image: its empty
        # ranged read fails, and a read that fails lists it (scoring then writes an error row for it)
        files = [(path, info) for path, info in chunk if info.get("type", "file") == "file" and not path.endswith("/")]
        del chunk
        unnamed = _images_by_content(fs, [path for path, _ in files if not is_image_name(path)])
        by_content += len(unnamed)
        others = []
        for path, info in files:
            if is_image_name(path) or path in unnamed:
                objects.append(_object(fs, path, info, (image_ids or {}).get(path)))
            else:
                others.append(storage.unstrip(fs, path))
        skipped += len(others)
        examples = sorted(examples + others)[:10]
    objects.sort_by_uri()
    return Listing(source, objects, skipped, examples, by_content=by_content)


def _walk_files(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """What ``fs.find(path, detail=True)`` lists, one directory at a time on a local disk and one list
    page at a time on S3 (find holds every file's info dict at once); other stores' own ``find``."""
    if store_pages.lists_by_page(fs):
        yield from store_pages.find_entries(fs, path)
        return
    if "file" not in ((fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol):
        yield from fs.find(path, detail=True).items()
        return
    listed = False
    for _, _, files in fs.walk(path, detail=True):
        for info in files.values():
            listed = True
            yield info["name"], info
    if not listed and fs.isfile(path):  # as find does: a file is its own listing (with no facts)
        yield path, {}


def list_source(source: str, **storage_options: Any) -> Listing:
    """List the images of a folder/prefix, a glob or a manifest Parquet (see the module doc)."""
    fs, path = storage.filesystem(source, **storage_options)
    fs.invalidate_cache()  # a long-lived process must see tonight's bucket, not a cached listing
    if path.endswith(".parquet") and fs.isfile(path):
        return _list_manifest(fs, path, source)
    if storage.has_glob(path):
        paged = store_pages.glob_entries(fs, path) if store_pages.lists_by_page(fs) else None
        return _split(fs, fs.glob(path, detail=True).items() if paged is None else paged, source)
    if not fs.exists(path):
        raise missing_path("source", source)
    return _split(fs, _walk_files(fs, path), source)


def _list_manifest(fs: fsspec.AbstractFileSystem, path: str, source: str) -> Listing:
    """A manifest names its images; their facts come from one ``ls`` per folder (or its own columns)."""
    table = storage.read_parquet_file(fs, path)  # fs carries the listing's storage options
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
