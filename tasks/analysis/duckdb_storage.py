"""How DuckDB reads a data root: local paths natively, anything else through its fsspec filesystem
(``tasks.analysis.sql.connect`` calls ``register_storage``)."""

from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Any, BinaryIO

import duckdb
import fsspec

from tasks.core import storage
from tasks.scoring.layout import partition_of

logger = logging.getLogger("mpemd")
# Whole small files kept per connection (bytes in all; a file over a quarter of it is never kept).
FILE_CACHE_BYTES = 256 * 2**20
# A batch of a group's files fetched at one open holds at most this share of the cache: the files a
# batch fetched for DuckDB's scan threads are then still held when the next batch comes. A batch that
# filled the whole cache let go of the last one's unread files, and a version bigger than the cache
# (5,008 shard files, 473 MB, over S3) fetched ~255 MB again at nearly every open.
BATCH_SHARE = 4
# Files let go of the memory cache are kept on local disk (``spill_dir``), up to this many bytes and while
# SPILL_DISK_RESERVE stays free: a version bigger than the cache is then fetched once a connection, not
# once a scan (5,008 shard files, 473 MB, over S3: the second scan fetched 4,400 of them again).
FILE_SPILL_BYTES = 8 * 2**30
SPILL_DISK_RESERVE = 2**30


def register_storage(con: duckdb.DuckDBPyConnection, root: str, use_httpfs: bool = False,
                     spill_dir: str | None = None) -> fsspec.AbstractFileSystem | None:
    """Let DuckDB read ``root``: local paths natively, anything else through its fsspec filesystem
    (files let go of its memory cache kept in ``spill_dir``, a private folder the caller removes).
    The filesystem view DuckDB was given (``info_once_per_path``), None where DuckDB reads by itself."""
    protocol = storage.protocol_of(root)
    if protocol == "file":
        return None
    if use_httpfs and protocol in ("s3", "http", "https", "gs"):
        installed = con.execute(
            "SELECT installed FROM duckdb_extensions() WHERE extension_name = 'httpfs'").fetchone()
        if installed and installed[0]:
            # Credentials then come from DuckDB's own persistent secrets (CREATE PERSISTENT SECRET).
            con.execute("LOAD httpfs")
            return None
        logger.warning("DuckDB's httpfs extension is not installed; reading %s through fsspec", root)
    fs, _ = storage.filesystem(root)
    view = info_once_per_path(fs, FILE_CACHE_BYTES, spill_dir=spill_dir)  # the budget read now, not at import
    con.register_filesystem(view)
    return view


def read_groups(files: dict[str, list[str]]) -> list[list[str]]:
    """The files ``tasks.analysis.sql.data_files`` listed, grouped as a query reads them: the manifests
    with the rejected list, and each model version's predictions (``version_files`` in views.sql)."""
    groups: dict[str | None, list[str]] = {}
    for path in files.get("predictions", []):
        partition = partition_of(path)
        groups.setdefault(partition[0] if partition else None, []).append(path)
    return [[*files.get("manifests", []), *files.get("rejected", [])], *groups.values()]


class FileCache:
    """Whole small files of one connection, at most ``cache_bytes`` in all, the least recently read let
    go first; a file's group (``group``) is fetched with it in one batch of concurrent GETs.

    DuckDB opens its files one at a time, so fetching each at its open ran the GETs in series, each a
    round trip and the server's time to send it. s3fs's ``cat`` of a list runs them together on its
    event loop. A batch takes at most ``batch_bytes`` (default: BATCH_SHARE), and room is made before it
    is fetched: the cache never holds more than ``cache_bytes``. It takes the files that follow the one
    opened first, in the group's order (the order DuckDB opens them in), then those before it: taken
    from the group's start, a batch for a version bigger than the cache fetched again the files just let
    go (5,008 shard files, 473 MB, over S3). Files fetched and not read yet are let go last
    (``_make_room``). A file let go is written to ``spill_dir`` where one is given and ``spill_bytes``
    allow, and read from there after (``_spill``)."""

    def __init__(self, fs: fsspec.AbstractFileSystem, cache_bytes: int, batch_bytes: int | None = None,
                 spill_dir: str | None = None, spill_bytes: int = FILE_SPILL_BYTES) -> None:
        self.fs, self.cache_bytes, self.largest = fs, cache_bytes, cache_bytes // 4
        self.batch_bytes = batch_bytes or cache_bytes // BATCH_SHARE
        self.spill_dir, self.spill_bytes = spill_dir, spill_bytes
        self.spill_folder: str | None = None  # this cache's own folder in spill_dir, made at the first spill
        self.spilled: dict[str, str] = {}  # a path let go of memory -> its copy on local disk
        self.spill_held = 0  # bytes in spilled
        self.files: OrderedDict[str, bytes] = OrderedDict()
        self.held = 0  # bytes in files
        self.unread: set[str] = set()  # fetched in a batch, not read yet: let go last
        self.together: dict[str, tuple[tuple[str, ...], int]] = {}  # a path -> its group and its place there
        self.lock = threading.Lock()  # DuckDB's scan threads open files at once: one fetch, not two

    def group(self, groups: Iterable[Sequence[str]]) -> None:
        for keys in map(tuple, groups):
            self.together.update((key, (keys, place)) for place, key in enumerate(keys))

    def open(self, view: fsspec.AbstractFileSystem, key: str) -> BinaryIO:
        """``key``'s bytes, to read: from memory, from its spilled copy, or fetched now with its batch."""
        with self.lock:
            if key not in self.files:
                if key in self.spilled:
                    # Read whole, not handed over as an open file: DuckDB read wrong bytes from an open
                    # disk file ("invalid TType", 5,008 shard files, 2 threads), never from a BytesIO.
                    # Likely its threads share the file object and a disk read lets go of the GIL
                    # between another thread's seek and read; a BytesIO holds it.
                    with open(self.spilled[key], "rb") as file:
                        return io.BytesIO(file.read())
                self._fetch(view, key)
            self.files.move_to_end(key)
            self.unread.discard(key)
            return io.BytesIO(self.files[key])

    def _fetch(self, view: fsspec.AbstractFileSystem, key: str) -> None:
        """``key`` and the small files of its group not held yet (those after it first), in one batch that fits
        the budget."""
        batch, sizes = [key], [view.info(key)["size"]]
        total = sizes[0]
        keys, place = self.together.get(key, ((), 0))
        for other in (*keys[place + 1:], *keys[:place]):  # the files after it first, then those before
            size = view.info(other).get("size")
            if other in self.files or other in self.spilled or size is None or size > self.largest:
                continue
            if total + size > self.batch_bytes:
                break
            batch.append(other)
            sizes.append(size)
            total += size
        self._make_room(total)
        for path, data in zip(batch, self._get_whole(batch, sizes), strict=True):
            if isinstance(data, bytes):
                self.files[path] = data
                self.held += len(data)
                self.unread.add(path)
            elif path == key:
                raise data if isinstance(data, BaseException) else FileNotFoundError(key)

    def _get_whole(self, paths: list[str], sizes: list[int]) -> list[bytes | BaseException]:
        """Each file of ``paths`` whole, in concurrent GETs; a file that failed (gone since the listing) as
        its exception, which fails its own open only. A file of size 0 (``sizes``, from the listing) is
        not asked for: S3 refuses a range of an empty object (416), where DuckDB should say "not Parquet".

        Asked as the range from byte 0 on: s3fs's whole-file ``cat`` looks each file's size up in its
        listing cache first, a scan of the folder's whole listing (~0.3 ms a file in a folder of 2,500,
        1.2 ms in one of 10,000: quadratic in the folder's files; ``storage.read_bytes(small=True)``
        skips the same lookup for images)."""
        asked = [path for path, size in zip(paths, sizes, strict=True) if size]
        got = self.fs.cat_ranges(asked, [0] * len(asked), [None] * len(asked), on_error="return") if asked else []
        by_path = dict(zip(asked, got, strict=True))
        return [by_path.get(path, b"") for path in paths]

    def _make_room(self, needed: int) -> None:
        """Let go of files until ``needed`` more bytes fit: those read longest ago first, then (only if that
        is not enough) those fetched and not read yet, which a scan is about to open (let go first, the
        files a batch fetched ahead of one scan thread were fetched again for the next)."""
        for unread_too in (False, True):
            for path in [p for p in self.files if unread_too or p not in self.unread]:
                if self.held + needed <= self.cache_bytes:
                    return
                data = self.files.pop(path)
                self.held -= len(data)
                self.unread.discard(path)
                self._spill(path, data)

    def _spill(self, path: str, data: bytes) -> None:
        """Keep ``data`` (``path``'s bytes, let go of memory) on local disk, if a folder was given, the
        budget allows and the disk keeps SPILL_DISK_RESERVE free; else it is fetched again if read again."""
        if self.spill_dir is None or self.spill_held + len(data) > self.spill_bytes:
            return
        try:
            if self.spill_folder is None:
                # one folder a cache (connections of one process share spill_dir), gone with the cache
                os.makedirs(self.spill_dir, exist_ok=True)
                self.spill_folder = tempfile.mkdtemp(prefix="files-", dir=self.spill_dir)
                weakref.finalize(self, shutil.rmtree, self.spill_folder, True)
            if shutil.disk_usage(self.spill_folder).free - len(data) < SPILL_DISK_RESERVE:
                return
            local = os.path.join(self.spill_folder, f"{len(self.spilled)}.bin")
            with open(local, "wb") as file:
                file.write(data)
        except OSError as error:  # a full or read-only disk: fetched again instead
            logger.debug("not spilling %s: %s", path, error)
            return
        self.spilled[path] = local
        self.spill_held += len(data)


def info_once_per_path(fs: fsspec.AbstractFileSystem, cache_bytes: int = FILE_CACHE_BYTES,
                       batch_bytes: int | None = None, spill_dir: str | None = None,
                       spill_bytes: int = FILE_SPILL_BYTES) -> fsspec.AbstractFileSystem:
    """A view of ``fs`` (same client) that answers each path's facts once (the listing's where it has
    them: ``know_entries``), and reads each small file once. Through fsspec DuckDB asks every file's
    facts ~30 times a query (``info``, ``size``, ``glob`` of the plain path, each open's details and
    last-modified time), and on s3fs each ask is a hand-off to its event-loop thread even when the
    listing cache answers: on 1,000 files on S3, ~19,000 hand-offs and most of the query's CPU. The files
    do not change during a connection's queries; a glob with wildcards, a version or a refresh goes to ``fs``.

    Each scan opens its files again, and an open through s3fs fetched from the first offset read to the
    end of its read-ahead block, at each scan. A file of at most a quarter of ``cache_bytes`` is fetched
    whole at its first open, with the small files of its group (``view.fetch_together(groups)``) in one
    batch, and read from memory after, or from ``spill_dir`` once let go (``FileCache``). A bigger file
    is read by the ranges DuckDB asks, without read-ahead."""
    known: dict[str, dict[str, Any]] = {}
    cache = FileCache(fs, cache_bytes, batch_bytes, spill_dir, spill_bytes)

    class InfoOnce(type(fs)):  # type: ignore[misc]
        def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
            if any(kwargs.values()):
                return fs.info(path, **kwargs)
            key = self._strip_protocol(path)
            if key not in known:
                known[key] = fs.info(path)
            return known[key]

        def know(self, entries: dict[str, dict[str, Any]]) -> None:  # see know_entries
            if not getattr(fs, "version_aware", False):  # (a versioned store's entries differ by version)
                known.update((self._strip_protocol(url), entry) for url, entry in entries.items())

        def size(self, path: str) -> int | None:
            return self.info(path).get("size")

        def glob(self, path: str, **kwargs: Any) -> Any:
            if kwargs or storage.has_glob(path):
                return fs.glob(path, **kwargs)
            try:
                self.info(path)
            except FileNotFoundError:
                return []
            return [self._strip_protocol(path)]

        def _open(self, path: str, mode: str = "rb", *args: Any, **kwargs: Any) -> Any:
            size = self.info(path).get("size") if mode == "rb" else None
            if size is None or size > cache.largest:
                # by the ranges DuckDB asks (2 MB column-chunk pieces): s3fs's read-ahead default
                # fetched from each offset to its 50 MB block's end, 800 MB of GETs for a 94 MB file
                return fs._open(path, mode, *args, **{"cache_type": "none", **kwargs})
            return cache.open(self, self._strip_protocol(path))

        def fetch_together(self, groups: Iterable[Sequence[str]]) -> None:
            """Each group's files are fetched in one batch at the first open of any of them."""
            cache.group([self._strip_protocol(p) for p in group] for group in groups)

    view = object.__new__(InfoOnce)  # not InfoOnce(...): fsspec would make (and cache) another client
    view.__dict__.update(fs.__dict__)
    for name in ("info", "size", "glob"):  # an async filesystem binds its sync methods per instance
        view.__dict__.pop(name, None)
    return view


def know_entries(view: fsspec.AbstractFileSystem | None, entries: dict[str, dict[str, Any]]) -> None:
    """Let ``view`` (``register_storage``'s; None for a local root) answer the listed files' facts from
    their listing entries (by URL, as ``list_root_entries`` gives them). s3fs's own ``info`` scans the
    whole folder's cached listing for a path (~0.3 ms a file in a folder of 2,500 shard files, 1.2 ms in
    one of 10,000: quadratic in the files of a folder), and sends a HEAD where that cache is off."""
    if view is not None:
        view.know(entries)


def fetch_together(view: fsspec.AbstractFileSystem | None, files: dict[str, list[str]]) -> None:
    """Let ``view`` (``register_storage``'s; None for a local root) fetch ``files`` by ``read_groups``."""
    if view is not None:
        view.fetch_together(read_groups(files))
