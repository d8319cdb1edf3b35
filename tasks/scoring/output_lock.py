"""One writer per output: an atomic lock object with an owner and a heartbeat, and stale-lock takeover.

Two scoring runs on the same output would each plan the same pending images and both commit them
(different shard keys, so readers would see every image twice). ``output_lock(out)`` makes the
second run wait (``wait_s``) or refuse with ``OutputLocked`` naming the holder.

- Every change of the lock object is conditional on the state it was decided on
  (``tasks.core.versioned``): creation only where nothing is (a hard link of a written private
  file locally, ``If-None-Match: *`` on S3); the heartbeat, rewritten every ``ttl_s / 4`` seconds
  from a daemon thread, only over the version this run last wrote; a takeover or a release deletes
  only the version it read (locally compare and rename or unlink under a ``flock`` of the output
  folder, ``If-Match`` on S3). A lock whose heartbeat is older than ``ttl_s`` (a lost machine), or
  whose holder was a process on this host that no longer exists (SIGKILL), belongs to a dead run:
  the next run takes it over, so a crash never blocks the nightly job.
- A holder that finds its lock gone or owned by another run (taken over after a long stall) has
  lost it: ``assert_held(url)``, called before every part is committed (``tasks.scoring.predictions.write_part``),
  raises ``OutputLockLost`` from then on, so the writer stops instead of interleaving with the new
  holder. Writers in other processes (Dask workers) run inside ``writing_for(out, owner)`` and read
  the lock before each commit.

Guarantee: at any moment at most one run holds the lock object, and no run's write of the lock
ever replaces or deletes another run's (local disks and S3; other object stores keep a window
between the read and the write). What a lock cannot give is fencing of the parts themselves: a
writer that checked the lock just before a takeover can still land the part it was committing (one
per writer, in the time of one upload), and writes outside ``writing_for`` (compaction, in the
holder's process) trust the heartbeat's last look, up to ``ttl_s / 2`` old (then storage is asked).
A takeover only happens to a run whose heartbeat stalled for ``ttl_s``, so these windows open only
after such a stall; the stalled run then stops at its next check.
- The lock lives at ``{out}/_scoring.lock``: a name readers skip (parts match ``part-*.parquet``,
  SQL views skip ``_*``).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from tasks.core import storage, versioned

logger = logging.getLogger("mpemd")

LOCK_NAME = "_scoring.lock"
DEFAULT_TTL_S = float(os.environ.get("MPEMD_LOCK_TTL_S", 300))
# The clock of heartbeats and of staleness judgements: tests inject one, so what they prove about
# ttls does not depend on how promptly this machine schedules a thread.
_now: Callable[[], float] = time.time


class OutputLocked(RuntimeError):
    """Another live run holds the output."""


class OutputLockLost(PermissionError):
    """This run's lock was taken over (its heartbeat stalled): it must not write any more. A
    PermissionError, so the flows' retry rule (``tasks.core.errors.is_retryable``) never retries it."""


@dataclass(frozen=True)
class LockInfo:
    url: str
    owner: str
    host: str
    pid: int
    started: float
    heartbeat: float
    version: str = field(default="", compare=False)  # of the lock object as read (tasks.core.versioned)

    def describe(self) -> str:
        age = _now() - self.heartbeat
        return f"owner {self.owner} (pid {self.pid} on {self.host}), heartbeat {age:.0f} s ago"


def lock_url(out: str) -> str:
    return storage.join(out, LOCK_NAME)


def _encode(info: LockInfo) -> bytes:
    return json.dumps({k: v for k, v in info.__dict__.items() if k not in ("url", "version")}).encode()


def read_lock(url: str) -> LockInfo | None:
    """The current holder, or None when there is no lock (or it is unreadable garbage: treated as stale)."""
    found = versioned.read(url)
    if found is None:
        return None
    raw_bytes, version = found
    try:
        raw = json.loads(raw_bytes)
        return LockInfo(url=url, owner=str(raw["owner"]), host=str(raw["host"]), pid=int(raw["pid"]),
                        started=float(raw["started"]), heartbeat=float(raw["heartbeat"]), version=version)
    except (ValueError, KeyError, TypeError):
        return LockInfo(url=url, owner="?", host="?", pid=-1, started=0.0, heartbeat=0.0, version=version)


def _create_exclusive(url: str, data: bytes) -> bool:
    """Write ``data`` at ``url`` only if nothing is there; True if this call created it."""
    return versioned.create(url, data) is not None


def _remove(url: str) -> None:
    """Remove the lock whoever holds it (tests: what a takeover does)."""
    fs, path = storage.filesystem(url)
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(path)
    fs.invalidate_cache(path)


def holder_is_dead(holder: LockInfo, ttl_s: float) -> bool:
    """No heartbeat for ``ttl_s``, or the holder was a process on this host that no longer exists
    (a SIGKILLed run: its rerun must not wait out the ttl)."""
    if _now() - holder.heartbeat > ttl_s:
        return True
    if holder.host == socket.gethostname() and holder.pid > 0:
        try:
            os.kill(holder.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, owned by another user
            return False
    return False


def _take_over(stale: LockInfo) -> None:
    """Remove a stale lock, but only if it is still the one judged stale (not refreshed, not a new
    holder's since): one conditional delete, so it never removes a lock written after the read."""
    if versioned.remove(stale.url, stale.version):
        logger.warning("taking over stale output lock %s: %s", stale.url, stale.describe())


# Locks this process holds: output prefix -> heartbeat (whose ``lost`` says whether it still holds).
_HELD: dict[str, _Heartbeat] = {}


# The output and lock owner this context commits for, when the lock is held by another process (a
# Dask worker commits for the flow run that handed it the shard). A context variable: one worker
# process may run tasks of several runs, each in its own thread.
_WRITING_FOR: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar(
    "mpemd_output_lock_writing_for", default=None)


def _under(url: str, out: str) -> bool:
    return url == out or url.startswith(out.rstrip("/") + "/")


@contextlib.contextmanager
def writing_for(out: str, owner: str) -> Iterator[None]:
    """Commit under ``out`` in this block only while the run ``owner`` holds its lock: for writers in
    another process than the holder's, which have no heartbeat to tell them it was taken over."""
    token = _WRITING_FOR.set((out, owner))
    try:
        yield
    finally:
        _WRITING_FOR.reset(token)


def assert_held(url: str) -> None:
    """Raise ``OutputLockLost`` if ``url`` lies under an output whose lock this process held and lost,
    or (inside ``writing_for``) whose lock is no longer its run's.

    A heartbeat older than half the ttl means this process was stalled (stopped, starved): the lock
    may have been taken over meanwhile and the heartbeat thread may not have run yet, so storage is
    asked now rather than trusting the last refresh. Inside ``writing_for`` storage is asked every
    time: nothing in this process watches the lock."""
    if (expected := _WRITING_FOR.get()) is not None and _under(url, expected[0]):
        current = read_lock(lock_url(expected[0]))
        if current is None or current.owner != expected[1]:
            raise OutputLockLost(f"the output lock of {expected[0]} is no longer held by run {expected[1]} "
                                 f"(taken over, now {current.describe() if current else 'absent'}); "
                                 f"not writing {url}")
    for out, heartbeat in list(_HELD.items()):
        if not _under(url, out):
            continue
        if not heartbeat.lost and _now() - heartbeat.info.heartbeat > 2 * heartbeat.every_s:
            heartbeat.check()
        if heartbeat.lost:
            raise OutputLockLost(f"the output lock of {out} was taken over by another run; not writing {url}")


def _landed(mine: LockInfo) -> str | None:
    """The lock's version if it holds exactly ``mine``: a conditional write that landed but whose
    answer was lost, so that its retry was refused (S3 behind a connection reset). Else None."""
    current = read_lock(mine.url)
    if current is not None and current.owner == mine.owner and current.heartbeat == mine.heartbeat:
        return current.version
    return None


class _Heartbeat(threading.Thread):
    def __init__(self, info: LockInfo, every_s: float) -> None:
        super().__init__(daemon=True, name="output-lock-heartbeat")
        self.info = info
        self.every_s = every_s
        self.stop = threading.Event()
        self.lost = False

    def check(self) -> bool:
        """Whether the lock on storage is still this run's; marks it lost (for good) if not."""
        current = read_lock(self.info.url)
        if current is None or current.owner != self.info.owner:
            if not self.lost:
                logger.error("output lock %s was lost (now %s)", self.info.url,
                             current.describe() if current else "absent")
            self.lost = True
        return not self.lost

    def beat(self) -> bool:
        """Refresh the heartbeat, only over the lock object this run last wrote: a run that took the
        lock over while this thread stalled between its check and its write keeps it."""
        if not self.check():
            return False
        fresh = replace(self.info, heartbeat=_now())
        version = versioned.replace(fresh.url, _encode(fresh), self.info.version) or _landed(fresh)
        if version is None:
            self.check()  # says who holds it now
            self.lost = True
            return False
        self.info = replace(fresh, version=version)
        return True

    def run(self) -> None:
        while not self.stop.wait(self.every_s):
            if not self.beat():
                return


@contextlib.contextmanager
def output_lock(out: str, *, ttl_s: float = DEFAULT_TTL_S, wait_s: float = 0.0, poll_s: float = 0.5
                ) -> Iterator[LockInfo]:
    """Hold ``{out}/_scoring.lock`` for the block; wait up to ``wait_s`` for a live holder, then refuse."""
    url = lock_url(out)
    now = _now()
    mine = LockInfo(url=url, owner=uuid.uuid4().hex, host=socket.gethostname(), pid=os.getpid(),
                    started=now, heartbeat=now)
    deadline = time.monotonic() + wait_s
    while (version := versioned.create(url, _encode(mine))) is None:
        holder = read_lock(url)
        if holder is None:
            continue  # released between our attempt and the read: try again at once
        if holder.owner == mine.owner:  # our create landed, its answer was lost, the retry refused
            version = holder.version
            break
        if holder_is_dead(holder, ttl_s):
            _take_over(holder)
            continue
        if time.monotonic() >= deadline:
            raise OutputLocked(f"output {out} is being written by another run: {holder.describe()}; "
                               f"it is released when that run ends, or taken over {ttl_s:.0f} s after its "
                               f"last heartbeat")
        time.sleep(poll_s)
    heartbeat = _Heartbeat(replace(mine, version=version), max(0.05, ttl_s / 4))
    heartbeat.start()
    _HELD[out] = heartbeat
    logger.info("output lock %s taken (%s)", url, mine.owner)
    try:
        yield mine
    finally:
        heartbeat.stop.set()
        heartbeat.join()
        if _HELD.get(out) is heartbeat:
            del _HELD[out]
        versioned.remove(url, heartbeat.info.version)  # only the lock this run last wrote
