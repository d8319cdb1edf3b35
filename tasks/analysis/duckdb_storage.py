"""How DuckDB reads a data root: local paths natively, anything else through its fsspec filesystem
(``tasks.analysis.sql.connect`` calls ``register_storage``)."""

from __future__ import annotations

import io
import logging
from collections import OrderedDict
from typing import Any

import duckdb
import fsspec

from tasks.core import storage

logger = logging.getLogger("mpemd")
# Whole small files kept per connection (bytes in all; a file over a quarter of it is never kept).
FILE_CACHE_BYTES = 256 * 2**20


def register_storage(con: duckdb.DuckDBPyConnection, root: str, use_httpfs: bool = False) -> None:
    """Let DuckDB read ``root``: local paths natively, anything else through its fsspec filesystem."""
    protocol = storage.protocol_of(root)
    if protocol == "file":
        return
    if use_httpfs and protocol in ("s3", "http", "https", "gs"):
        installed = con.execute(
            "SELECT installed FROM duckdb_extensions() WHERE extension_name = 'httpfs'").fetchone()
        if installed and installed[0]:
            # Credentials then come from DuckDB's own persistent secrets (CREATE PERSISTENT SECRET).
            con.execute("LOAD httpfs")
            return
        logger.warning("DuckDB's httpfs extension is not installed; reading %s through fsspec", root)
    fs, _ = storage.filesystem(root)
    con.register_filesystem(info_once_per_path(fs))


def info_once_per_path(fs: fsspec.AbstractFileSystem, cache_bytes: int = FILE_CACHE_BYTES
                       ) -> fsspec.AbstractFileSystem:
    """A view of ``fs`` (same client and listing cache) that answers each path's facts once, and
    reads each small file once.

    Through fsspec DuckDB asks every file's facts ~30 times a query (``info``, ``size``, ``glob`` of the
    plain path, each open's details and last-modified time), and on s3fs each ask is a hand-off to its
    event-loop thread even when the listing cache answers: on 1,000 files on S3, ~19,000 hand-offs and
    most of the query's CPU. The files do not change during a connection's queries, so one answer per
    path serves them all; a glob with wildcards, a version or a refresh still goes to ``fs``.

    Each scan opens its files again, and an open through s3fs fetches from the first offset read to the
    end of its read-ahead block: a query that scans a file twice (prediction_set's second scan for
    tied images) fetched it twice. A file of at most a quarter of ``cache_bytes`` is fetched whole (one
    GET) at its first open and read from memory after, the least recently opened let go first."""
    known: dict[str, dict[str, Any]] = {}
    files: OrderedDict[str, bytes] = OrderedDict()
    held = 0  # bytes in files

    class InfoOnce(type(fs)):  # type: ignore[misc]
        def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
            if any(kwargs.values()):
                return fs.info(path, **kwargs)
            key = self._strip_protocol(path)
            if key not in known:
                known[key] = fs.info(path)
            return known[key]

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
            nonlocal held
            key = self._strip_protocol(path)
            size = self.info(path).get("size") if mode == "rb" else None
            if size is None or size > cache_bytes // 4:
                return fs._open(path, mode, *args, **kwargs)
            if key in files:
                files.move_to_end(key)
            else:
                files[key] = fs.cat_file(path)
                held += len(files[key])
                while held > cache_bytes:
                    held -= len(files.popitem(last=False)[1])
            return io.BytesIO(files[key])

    view = object.__new__(InfoOnce)  # not InfoOnce(...): fsspec would make (and cache) another client
    view.__dict__.update(fs.__dict__)
    for name in ("info", "size", "glob"):  # an async filesystem binds its sync methods per instance
        view.__dict__.pop(name, None)
    return view
