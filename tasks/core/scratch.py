"""Private scratch folders of one process, removed when it ends, and by a later process when it died.

DuckDB's spill files and the views' empty Parquet files live in such folders under the system's temp
folder (``TMPDIR``). A normal exit removes them (``atexit``, and ``remove_all`` for a process that
ends with ``os._exit``); a process killed outright (SIGKILL, the out-of-memory killer: the very runs
that spilled most) cannot, so each new folder's maker first removes the folders of its prefix whose
owner is gone. A folder's owner holds an exclusive ``flock`` on its ``.owner`` file while it lives;
the kernel drops it when the process dies, however it dies, so "the lock can be taken" is "the
owner is gone" (no PID file, whose number a later process may reuse).
"""

from __future__ import annotations

import atexit
import fcntl
import logging
import os
import shutil
import signal
import tempfile
import time
from pathlib import Path
from typing import IO

logger = logging.getLogger(__name__)

OWNER_FILE = ".owner"
# A folder with no owner file yet is one being made right now, or one left by a version of mpemd
# before this module: removed only once it is this old.
UNOWNED_AGE_S = 24 * 3600

_folders: dict[str, tuple[Path, IO[bytes]]] = {}  # prefix -> (folder, its locked owner file)


def process_folder(prefix: str) -> Path:
    """This process's folder ``<temp folder>/<prefix>XXXXXXXX``, made at the first call (after removing
    the folders of ``prefix`` whose owner is gone) and removed at exit."""
    if prefix not in _folders:
        remove_orphans(prefix)
        # Ctrl-C or SIGTERM held back until the folder is made and known to remove_all (delivered then):
        # raised in between, they would leave a folder no one removes until the next start
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            folder = Path(tempfile.mkdtemp(prefix=prefix))
            _folders[prefix] = (folder, _lock_owner_file(folder))
            if len(_folders) == 1:
                atexit.register(remove_all)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
    return _folders[prefix][0]


def _lock_owner_file(folder: Path) -> IO[bytes]:
    """The folder's owner file, locked by this process: locked under another name, then renamed, so
    no other process ever sees an owner file it could lock in the moment before this one does."""
    pending = folder / f"{OWNER_FILE}.{os.getpid()}"
    owner = open(pending, "wb")  # noqa: SIM115 (held open for the process's life: the lock lives with it)
    fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
    owner.write(f"{os.getpid()}\n".encode())
    owner.flush()
    os.rename(pending, folder / OWNER_FILE)
    return owner


def remove_all() -> None:
    """Remove this process's folders (at exit; ``flows.launch.end_now`` calls it, as it skips atexit)."""
    for folder, owner in _folders.values():
        shutil.rmtree(folder, ignore_errors=True)
        owner.close()
    _folders.clear()


def remove_orphans(prefix: str) -> None:
    """Remove the folders ``<temp folder>/<prefix>*`` of this user whose owner is gone."""
    try:
        entries = list(os.scandir(tempfile.gettempdir()))
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        try:
            if entry.is_dir(follow_symlinks=False) and entry.stat().st_uid == os.getuid():
                _remove_if_orphaned(Path(entry.path))
        except OSError as error:  # removed meanwhile by another process, or not ours to read
            logger.debug("not removing %s: %s", entry.path, error)


def _remove_if_orphaned(folder: Path) -> None:
    """Remove ``folder`` if its owner is gone (its lock can be taken), or it has none and is old."""
    try:
        owner = open(folder / OWNER_FILE, "rb")  # noqa: SIM115 (closed below, after the removal)
    except FileNotFoundError:
        if time.time() - folder.stat().st_mtime >= UNOWNED_AGE_S:
            shutil.rmtree(folder, ignore_errors=True)
        return
    with owner:
        try:
            fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # its owner lives
            return
        shutil.rmtree(folder, ignore_errors=True)  # the lock held meanwhile: no one else judges it now
