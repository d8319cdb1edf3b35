"""Small objects changed only if unchanged since they were read: compare-and-swap on storage.

``read`` returns an object's bytes with a version (a name for that one state); ``create``,
``replace`` and ``remove`` act only if the object is absent, or still at the given version, and say
whether they did. Check and change are one step, so a process stalled between deciding and acting
cannot overwrite or delete what another process put there meanwhile.

Identical bytes at the same name can be the same version (an S3 ETag is their MD5; a freed inode
is reused locally), so callers write a token of their own in them (the output lock: its owner).

- Local disks: the version is the file's inode and a digest of its bytes (a rewrite is a new
  inode). ``create`` hard-links a written private file (fails if the name exists); ``replace`` and ``remove`` compare and rename or unlink under an
  exclusive ``flock`` of the object's folder, which every ``replace`` and ``remove`` takes (where
  the filesystem refuses it, some NFS mounts, they go on unguarded, with a warning: a window of
  microseconds between the compare and the change).
- S3: the version is the ETag; conditional requests (``If-None-Match: *`` to create, ``If-Match``
  to replace or delete). S3 answers them on PUT since 2024; If-Match on DELETE is newer, so check
  an S3-compatible store before relying on it (moto 5.2 answers all three, tests/test_versioned.py).
- Other object stores: read, compare, then act. A window remains between the read and the write.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import uuid
from collections.abc import Iterator

from fsspec.asyn import sync

from tasks.core import storage
from tasks.core.errors import MissingPathError

logger = logging.getLogger("mpemd")
_UNGUARDED: set[str] = set()  # folders whose filesystem refused flock (warned once each)
_CONFLICT_CODES = {"PreconditionFailed", "ConditionalRequestConflict", "412", "409"}


def _kind(url: str) -> str:
    protocol = storage.protocol_of(url)
    return "s3" if protocol in ("s3", "s3a") else "file" if protocol == "file" else "other"


def _local_version(fd: int, data: bytes) -> str:
    return f"{os.fstat(fd).st_ino}-{hashlib.sha256(data).hexdigest()[:32]}"


def _failed_condition(exc: BaseException) -> bool:
    """A 412 (the object is not at the version asked) or a 409 (a concurrent conditional write won)."""
    cause = exc.__cause__ or exc
    code = str(getattr(cause, "response", {}).get("Error", {}).get("Code", ""))
    return isinstance(exc, FileExistsError) or code in _CONFLICT_CODES or "PreconditionFailed" in str(exc)


def read(url: str) -> tuple[bytes, str] | None:
    """The bytes at ``url`` and their version, or None if nothing is there."""
    fs, path = storage.filesystem(url)
    try:
        if _kind(url) == "file":
            with open(path, "rb") as f:  # bytes and inode from one open file: one state
                data = f.read()
                return data, _local_version(f.fileno(), data)
        if _kind(url) == "s3":
            return _s3_get(fs, path)
        data = fs.cat_file(path)
        return data, hashlib.sha256(data).hexdigest()
    except FileNotFoundError:
        return None


def _s3_get(fs, path: str) -> tuple[bytes, str]:
    bucket, key, _ = fs.split_path(path)

    async def get() -> tuple[bytes, str]:
        resp = await fs._call_s3("get_object", Bucket=bucket, Key=key)
        try:
            return await resp["Body"].read(), resp["ETag"]
        finally:
            resp["Body"].close()

    return sync(fs.loop, get)


def create(url: str, data: bytes) -> str | None:
    """Write ``data`` at ``url`` only if nothing is there; its version, or None if something was."""
    fs, path = storage.filesystem(url)
    if _kind(url) == "file":
        return _link_new(path, data)
    if _kind(url) == "s3":
        return _s3_put(fs, path, data, IfNoneMatch="*")
    try:
        fs.pipe_file(path, data, mode="create")
    except Exception as exc:
        if _failed_condition(exc):
            return None
        raise
    fs.invalidate_cache(path)
    return hashlib.sha256(data).hexdigest()


def _s3_put(fs, path: str, data: bytes, **condition: str) -> str | None:
    bucket, key, _ = fs.split_path(path)
    try:
        resp = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)
    except FileNotFoundError as exc:
        if "IfNoneMatch" in condition:  # only the bucket can be missing for a create: a lock's
            # acquirer read "not created, no lock there" and tried again, forever (1,664 PUTs in 40 s)
            raise MissingPathError(f"cannot write s3://{path}: bucket {bucket} does not exist") from exc
        return None  # If-Match on an object that is gone
    except Exception as exc:
        if _failed_condition(exc):
            return None
        raise
    finally:
        fs.invalidate_cache(path)
    return resp["ETag"]


def _written_private(path: str, data: bytes) -> tuple[str, int]:
    """A file beside ``path`` holding ``data`` (on disk), and an open descriptor of it."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"  # "<name>.*": a name readers skip when they skip <name>
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp)
        raise
    return tmp, fd


def _link_new(path: str, data: bytes) -> str | None:
    """The file appears with its content: created empty and then written, it could be read empty."""
    tmp, fd = _written_private(path, data)
    try:
        os.link(tmp, path)
        return _local_version(fd, data)
    except FileExistsError:
        return None
    finally:
        os.close(fd)
        os.unlink(tmp)


@contextlib.contextmanager
def _folder_locked(path: str) -> Iterator[None]:
    """Exclusive among processes that change files in this folder through this module."""
    fd = os.open(os.path.dirname(path), os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released by close, or by the kernel if the process dies
        except OSError as exc:  # NFS emulates flock with write locks, refused on a read-only folder fd
            if os.path.dirname(path) not in _UNGUARDED:
                _UNGUARDED.add(os.path.dirname(path))
                logger.warning("no flock on the folder of %s (%s): compare and change are two steps", path, exc)
        yield
    finally:
        os.close(fd)


def _local_is_at(path: str, version: str) -> bool:
    try:
        with open(path, "rb") as f:
            return _local_version(f.fileno(), f.read()) == version
    except FileNotFoundError:
        return False


def replace(url: str, data: bytes, version: str) -> str | None:
    """Put ``data`` at ``url`` if the object there is still at ``version``; the new version, or None."""
    fs, path = storage.filesystem(url)
    if _kind(url) == "s3":
        return _s3_put(fs, path, data, IfMatch=version)
    if _kind(url) == "other":
        current = read(url)
        if current is None or current[1] != version:
            return None
        fs.pipe_file(path, data)  # the window: a change between the read and this write is lost
        fs.invalidate_cache(path)
        return hashlib.sha256(data).hexdigest()
    tmp, fd = _written_private(path, data)
    try:
        with _folder_locked(path):
            if not _local_is_at(path, version):
                return None
            os.replace(tmp, path)
            return _local_version(fd, data)
    finally:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def remove(url: str, version: str) -> bool:
    """Delete ``url`` if the object there is still at ``version``; whether it did."""
    fs, path = storage.filesystem(url)
    try:
        if _kind(url) == "file":
            with _folder_locked(path):
                if not _local_is_at(path, version):
                    return False
                os.unlink(path)
                return True
        if _kind(url) == "s3":
            bucket, key, _ = fs.split_path(path)
            fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=version)
            return True
        current = read(url)
        if current is None or current[1] != version:
            return False
        fs.rm_file(path)  # the window, as in ``replace``
        return True
    except FileNotFoundError:
        return False
    except Exception as exc:
        if _failed_condition(exc):
            return False
        raise
    finally:
        fs.invalidate_cache(path)
