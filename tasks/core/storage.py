"""One path for every storage backend: local folders, ``s3://`` buckets, any fsspec URL.

Everything in ``tasks/`` reads and writes through these helpers so that local and S3 runs are
the same code. Writes are atomic: data goes to a temporary name beside the target and is then
moved into place (a rename on local disks, a single PUT on object stores, which is atomic there).
"""

from __future__ import annotations

import datetime as dt
import difflib
import io
import os
import posixpath
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

if TYPE_CHECKING:  # pyarrow loads numpy: mpemd sql imports this module, needs neither, and starts faster
    import pyarrow as pa
    import pyarrow.parquet as pq


def filesystem(url: str, **storage_options: Any) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem behind ``url`` and the path inside it.

    S3 endpoints and credentials come from the usual AWS variables (``AWS_ENDPOINT_URL``,
    ``AWS_ACCESS_KEY_ID``...) unless given in ``storage_options``.
    """
    if url.startswith("s3://") and "endpoint_url" not in storage_options:
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            storage_options = {**storage_options, "endpoint_url": endpoint}
    try:
        return url_to_fs(url, **storage_options)
    except (ImportError, ValueError) as exc:  # the user's setup, not a bug: one line at the command line
        unusable = _unusable_protocol(url, exc)
        if unusable is None:
            raise
        raise unusable from exc


class UnusableURLError(ValueError):
    """A URL fsspec cannot open at all: the user's setup, never retried (``tasks.core.errors``)."""


def _unusable_protocol(url: str, exc: ImportError | ValueError) -> UnusableURLError | None:
    """What to say where fsspec cannot open ``url`` at all: its protocol's package is not installed
    (``gs://`` without gcsfs), or no package provides the protocol (a typo)."""
    from fsspec.registry import known_implementations

    protocol = protocol_of(url)
    if isinstance(exc, ImportError):
        return UnusableURLError(f"{url}: {exc} (pip install it into this environment)")
    if protocol not in known_implementations and "Protocol not known" in str(exc):
        close = difflib.get_close_matches(protocol, known_implementations, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(f'{c}://' for c in close)}?" if close else ""
        return UnusableURLError(f"{url}: unknown storage protocol {protocol}://{hint}")
    return None


def protocol_of(url: str) -> str:
    """``"file"`` for local paths, else the URL scheme (``s3``, ``gs``, ``http``...)."""
    return url.split("://", 1)[0] if "://" in url else "file"


GLOB_CHARS = ("*", "?", "[")  # what makes a path a pattern for fsspec's glob


def has_glob(path: str) -> bool:
    """Whether ``path`` is a glob pattern (fsspec's wildcards), not one file or folder."""
    return any(c in path for c in GLOB_CHARS)


def join(url: str, *parts: str) -> str:
    """Join path parts onto a URL or local path with ``/``."""
    head = url.rstrip("/")
    tail = posixpath.join(*[p.strip("/") for p in parts if p]) if parts else ""
    return f"{head}/{tail}" if tail else head


def unstrip(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Turn a path returned by ``fs`` back into a full URL (fsspec strips the scheme); a local path
    stays a plain path. Called once per listed file: the local case asks no fsspec method."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol
    return path if "file" in protocols else fs.unstrip_protocol(path)


def exists(url: str) -> bool:
    fs, path = filesystem(url)
    return fs.exists(path)


def read_bytes(url: str, *, small: bool = False) -> bytes:
    """All bytes at ``url``. ``small`` (an image): one GET on S3, without the size lookup s3fs makes
    first to choose a ranged parallel download. That lookup scans the parent folder's cached listing
    (O(objects in the folder) per read once the run has listed it): an ingest of 10^5 images in one
    folder spent 72% of its CPU there, 15 ms an image and growing (docs/performance.md)."""
    fs, path = filesystem(url)
    if small and protocol_of(url) in ("s3", "s3a"):
        return fs.cat_file(path, max_concurrency=1)
    return fs.cat_file(path)


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write ``data`` so that readers see either nothing or the whole file."""
    if protocol_of(url) == "file":
        try:
            with atomic_local_file(url) as tmp, open(tmp, "wb") as f:
                f.write(data)
        except OSError as exc:
            if exc.errno is not None:
                # Disk full, file too large, read-only: name the target (OSError(errno, ...) keeps the subclass).
                raise OSError(exc.errno, f"cannot write {url}: {exc.strerror or exc}") from exc
            raise
    else:
        # An object-store PUT is atomic: the object appears whole or not at all.
        fs, path = filesystem(url)
        try:
            fs.pipe_file(path, data)
        except FileNotFoundError as exc:  # s3fs: NoSuchBucket ("The specified bucket does not exist"): name it
            raise FileNotFoundError(exc.errno or 2, str(exc.strerror or exc), url) from exc


def write_text_atomic(url: str, text: str) -> None:
    write_bytes_atomic(url, text.encode("utf-8"))


def write_parquet_atomic(table: pa.Table, url: str, **kwargs: Any) -> None:
    """Write a Parquet file atomically (compression zstd unless told otherwise)."""
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression=kwargs.pop("compression", "zstd"), **kwargs)
    write_bytes_atomic(url, buffer.getvalue())


@contextmanager
def atomic_local_file(url: str) -> Iterator[str]:
    """A local path to write ``url``'s content to, for writers that stream to a file (Parquet): it
    appears at ``url`` whole when the block exits cleanly (a rename beside it locally, one upload
    to an object store) and is removed otherwise."""
    fs, path = filesystem(url)
    local = protocol_of(url) == "file"
    if local:
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        tmp = posixpath.join(posixpath.dirname(path), f".tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}")
    else:
        tmp = os.path.join(tempfile.gettempdir(), f"mpemd-{uuid.uuid4().hex}-{posixpath.basename(path)}")
    try:
        yield tmp
        if local:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        else:
            fs.put_file(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def read_parquet(url: str, **kwargs: Any) -> pa.Table:
    """One Parquet file as a table (``kwargs``: ``pq.read_table``'s, e.g. ``columns``)."""
    return read_parquet_file(*filesystem(url), **kwargs)


def read_parquet_file(fs: fsspec.AbstractFileSystem, path: str, **kwargs: Any) -> pa.Table:
    """``read_parquet`` of ``path`` on ``fs`` (a filesystem that carries its own storage options).

    pyarrow decodes on its own worker threads, and whichever of them lets go of the input last frees
    it there. So pyarrow never gets Python memory: neither a Python file (its IO threads call back
    into Python) nor a ``bytes`` object (freeing the ``BufferReader``'s wrapper takes the GIL). A
    worker asking for the GIL once the interpreter has begun to end is stopped by Python with
    ``pthread_exit``, inside that C++ destructor: "terminate called without an active exception",
    exit 134 (docs/performance.md). A local file is read by pyarrow itself; anywhere else the bytes
    come through fsspec in this thread and are copied into an Arrow buffer (a manifest or a state
    part: its bytes held twice for the length of the copy)."""
    import pyarrow.parquet as pq

    if isinstance(fs, LocalFileSystem):
        return pq.read_table(path, **kwargs)
    return pq.read_table(arrow_reader(fs.cat_file(path)), **kwargs)


def arrow_reader(data: bytes) -> pa.BufferReader:
    """A reader over a copy of ``data`` in memory that Arrow owns, so that no pyarrow thread ever
    holds (and has to release, under the GIL) a Python object: see ``read_parquet_file``."""
    import pyarrow as pa

    buffer = pa.allocate_buffer(len(data))
    memoryview(buffer).cast("B")[:] = data
    return pa.BufferReader(buffer)


@contextmanager
def open_url(url: str, mode: str = "rb") -> Iterator[Any]:
    fs, path = filesystem(url)
    with fs.open(path, mode) as f:
        yield f


def open_listed(fs: fsspec.AbstractFileSystem, path: str, entry: Mapping[str, Any] | None) -> Any:
    """``fs.open(path, "rb")`` with the file's facts from a listing ``entry`` (``fs.find(detail=True)``'s),
    so that none is looked up: s3fs asks a file's size at the open and its ETag at the first read, and
    each ask is a HEAD where the folder's listing cache was dropped (any write into the folder drops
    it). Each read asks the server for the listed ETag (``If-Match``), as s3fs's own open asks for the
    one it looked up: a file replaced since the listing is an error (s3fs: ``FileExpired``), not other
    bytes."""
    if not entry or entry.get("size") is None:
        return fs.open(path, "rb")
    f = fs.open(path, "rb", size=entry["size"])
    if isinstance(f, fsspec.spec.AbstractBufferedFile):
        f.details = dict(entry)
    if entry.get("ETag") and isinstance(getattr(f, "read_kw", None), dict):  # s3fs's reads' arguments
        f.read_kw = {**f.read_kw, "IfMatch": entry["ETag"]}
    return f


# A remote Parquet file up to this size is read whole (``open_parquet``): s3fs's read-ahead (50 MB
# blocks) fetched about as much, and 8 readers at once (``tasks.scoring.predictions``) hold 2x this at most.
WHOLE_PARQUET_BYTES = 16 * 2**20


@contextmanager
def open_parquet(fs: fsspec.AbstractFileSystem, path: str,
                 entry: Mapping[str, Any] | None = None) -> Iterator[pq.ParquetFile]:
    """``path`` on ``fs`` as a ``pq.ParquetFile`` that reads only what is asked (a footer, some columns).

    A local file is opened by pyarrow itself: no Python file, whose reads pyarrow's threads call back
    into Python for and whose buffers they release under the GIL (a process whose last act is such a
    read can abort at exit: ``read_parquet_file``), and ~15% less CPU a small file (3,000 shard files'
    nine state columns: 2.7-3.1 against 3.1-3.9 user-s). Elsewhere it is read through fsspec, opened
    with its listing ``entry`` where given (``open_listed``): whole into Arrow memory where the entry
    says it is at most ``WHOLE_PARQUET_BYTES`` (shard files, most merged ones), else as a Python file."""
    import pyarrow.parquet as pq

    if isinstance(fs, LocalFileSystem):
        with pq.ParquetFile(fs._strip_protocol(path)) as part:
            yield part
    elif entry and entry.get("size") is not None and entry["size"] <= WHOLE_PARQUET_BYTES:
        with open_listed(fs, path, entry) as f:  # one GET, as s3fs's read-ahead makes of such a file anyway
            data = f.read()
        with pq.ParquetFile(arrow_reader(data)) as part:
            yield part
    else:
        with open_listed(fs, path, entry) as f:
            yield pq.ParquetFile(f)


def makedirs(url: str) -> None:
    fs, path = filesystem(url)
    fs.makedirs(path, exist_ok=True)


@dataclass(frozen=True)
class FileVersion:
    """What a filesystem's ``info`` (or listing entry) says about a file's current content."""

    size: int | None = None
    etag: str | None = None  # object stores: the ETag without quotes; local files: None
    mtime: float | None = None  # seconds since the epoch (UTC)
    inode: int | None = None  # local files: an atomic overwrite is a new inode

    @property
    def fingerprint(self) -> str:
        """A token that changes when the content does: the ETag, else size and mtime."""
        return content_fingerprint(self.etag, self.size, self.mtime)


def content_fingerprint(etag: str | None, size: int | None, mtime: float | None) -> str:
    """``FileVersion.fingerprint`` from its parts (as prediction rows store them)."""
    if etag:
        return f"etag:{etag}"
    return f"size:{size}|mtime:{mtime!r}"


def _timestamp(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return (value if value.tzinfo else value.replace(tzinfo=dt.timezone.utc)).timestamp()
    if isinstance(value, str):
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return float(value)


def file_version(info: Mapping[str, Any]) -> FileVersion:
    """Read a ``fs.info`` / ``fs.find(detail=True)`` entry, whichever backend's field names it uses
    (local: mtime, ino; S3: ETag, LastModified; GCS: md5Hash, updated)."""
    etag = info.get("ETag", info.get("etag", info.get("md5Hash")))
    mtime = info.get("mtime", info.get("LastModified", info.get("last_modified", info.get("updated"))))
    size, inode = info.get("size"), info.get("ino")
    return FileVersion(size=int(size) if size is not None else None,
                       etag=str(etag).strip('"') if etag else None,  # S3 quotes its ETags
                       mtime=_timestamp(mtime), inode=int(inode) if inode is not None else None)


def stat(url: str) -> FileVersion:
    """The current version of the file at ``url`` (one metadata request); FileNotFoundError if absent."""
    fs, path = filesystem(url)
    return file_version(fs.info(path))
