"""tasks/scoring/output_lock.py under races: each test drives one interleaving of two runs by hand, so
what it proves does not depend on how this machine schedules threads."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tasks.core import storage
from tasks.scoring import output_lock as output_lock_module
from tasks.scoring.output_lock import OutputLockLost, assert_held, lock_url, output_lock, read_lock

REPO = Path(__file__).resolve().parents[1]

# Another run, in another process, that finds the lock stale and takes it over the ordinary way.
_CONTENDER = """
import sys
from tasks.scoring.output_lock import output_lock
with output_lock(sys.argv[1], ttl_s=60) as mine:
    print(mine.owner, flush=True)
    sys.stdin.read()  # holds the lock until the test closes stdin
"""


class InjectedClock:
    """``output_lock._now`` for this process: the holder's heartbeats carry this time, far in the past
    of the contender's real clock, so the contender judges the holder stalled."""

    def __init__(self, monkeypatch) -> None:
        self.t = 1_000_000.0
        monkeypatch.setattr(output_lock_module, "_now", self)

    def __call__(self) -> float:
        return self.t


def _held_by_another_host(out: str, ttl_s: float, monkeypatch):
    """Take the lock as if from another machine: only its heartbeat then says the holder is alive."""
    lock = output_lock(out, ttl_s=ttl_s)
    with monkeypatch.context() as patched:
        patched.setattr(socket, "gethostname", lambda: "another-host")
        lock.__enter__()
    return lock


def _start_contender(out: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-c", _CONTENDER, out], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    owner = proc.stdout.readline().strip()
    assert owner, "the contender did not take the lock"
    return proc, owner


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def out(request, tmp_path) -> str:
    """An output on a local disk or on S3 (the contender process finds moto through AWS_ENDPOINT_URL)."""
    root = request.getfixturevalue("s3_bucket") if request.param == "s3" else str(tmp_path)
    return storage.join(root, "out")


def test_a_heartbeat_never_overwrites_a_lock_taken_over_between_its_read_and_its_write(out, monkeypatch):
    """The holder's heartbeat has read the lock (still its own) when it stalls; meanwhile another run
    takes the stale lock over; then the heartbeat's write lands. The new owner's lock must survive and
    the old holder must know it lost: else both runs believe they own the output."""
    InjectedClock(monkeypatch)
    ttl = 0.4  # the heartbeat thread beats every 0.1 s (real)
    url, part = lock_url(out), f"{out}/model_version=v/date=d/part-00000-{'a' * 16}.parquet"
    real_read, calls, contender = output_lock_module.read_lock, [], []

    def read_lock_then_stall(lock: str):
        found = real_read(lock)
        if threading.current_thread().name == "output-lock-heartbeat":
            calls.append(found)
            if len(calls) == 1:  # the racing order: the takeover lands between the read and the write
                contender.append(_start_contender(out))
        return found

    monkeypatch.setattr(output_lock_module, "read_lock", read_lock_then_stall)
    lock = _held_by_another_host(out, ttl, monkeypatch)
    heartbeat = output_lock_module._HELD[out]
    try:
        deadline = time.monotonic() + 60
        while heartbeat.is_alive() and len(calls) < 2:  # the beat after the takeover is done
            assert time.monotonic() < deadline, "the heartbeat thread never beat"
            time.sleep(0.01)
        # the second read is the beat's own recheck, before it marks the lock lost: let that beat end (a
        # heartbeat that lost its lock stops; one that overwrote the new owner's beats on, and fails below)
        heartbeat.join(timeout=5)
        (proc, thief), = contender
        assert read_lock(url).owner == thief, "the stalled heartbeat overwrote the new owner's lock"
        with pytest.raises(OutputLockLost, match="taken over"):
            assert_held(part)
    finally:
        lock.__exit__(None, None, None)
        for proc, _ in contender:
            proc.stdin.close()
            proc.wait(timeout=30)
    assert read_lock(url) is None  # the contender released its own lock; the loser removed nothing


def _answer_lost(monkeypatch, name: str) -> None:
    """``versioned.<name>`` writes, then answers as if refused: what a retried conditional request
    says when its first try landed and the answer was lost (a connection reset)."""
    from tasks.core import versioned

    real = getattr(versioned, name)

    def landed_but_refused(*args, **kwargs):
        real(*args, **kwargs)
        return None

    monkeypatch.setattr(versioned, name, landed_but_refused)


def test_a_lock_whose_creation_answer_was_lost_is_still_taken(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    with monkeypatch.context() as patched:
        _answer_lost(patched, "create")
        lock = output_lock(out, ttl_s=600)
        mine = lock.__enter__()
    try:
        assert read_lock(lock_url(out)).owner == mine.owner
    finally:
        lock.__exit__(None, None, None)
    assert read_lock(lock_url(out)) is None  # released: the version it adopted was the right one


def test_a_heartbeat_whose_answer_was_lost_keeps_the_lock(tmp_path, monkeypatch):
    clock = InjectedClock(monkeypatch)
    out = str(tmp_path / "out")
    with output_lock(out, ttl_s=600):  # the heartbeat thread sleeps 150 s: beats are driven here
        heartbeat = output_lock_module._HELD[out]
        clock.t += 1
        with monkeypatch.context() as patched:
            _answer_lost(patched, "replace")
            assert heartbeat.beat() and not heartbeat.lost
        clock.t += 1
        assert heartbeat.beat() and read_lock(lock_url(out)).heartbeat == clock.t
    assert read_lock(lock_url(out)) is None


def test_a_takeover_deletes_only_the_lock_it_judged_stale(out):
    """Two contenders judge the same dead run's lock stale; the first takes it over and writes its
    own; the second's takeover, acting on what it read before, must leave the first's lock alone.
    (Main re-read the lock just before deleting it, so this order passed there too; the conditional
    delete also closes the gap between that re-read and the delete, which no test here drives.)"""
    from tasks.scoring.output_lock import LockInfo, _create_exclusive, _encode, _take_over

    url = lock_url(out)
    dead = LockInfo(url=url, owner="dead", host="another-host", pid=1, started=0.0, heartbeat=0.0)
    assert _create_exclusive(url, _encode(dead))
    judged_by_second = read_lock(url)
    _take_over(read_lock(url))  # the first contender
    first = LockInfo(url=url, owner="first", host="another-host", pid=2, started=1.0, heartbeat=1.0)
    assert _create_exclusive(url, _encode(first))
    _take_over(judged_by_second)
    assert read_lock(url).owner == "first"


@pytest.mark.s3
def test_a_lock_in_a_bucket_that_does_not_exist_is_refused_at_once(s3_bucket, monkeypatch):
    """S3 answers a create (``If-None-Match: *``) in a missing bucket with NoSuchBucket, which s3fs
    makes a FileNotFoundError: read as "not created, and no lock there", the acquirer tried again
    without end (1,664 PUTs in 40 s from ``mpemd score ... --out s3://nobucket/out``)."""
    from tasks.core.errors import MissingPathError

    reads = []
    real_read = output_lock_module.read_lock

    def counted(url):  # the old loop read the (absent) lock after every refused create: stop it
        reads.append(url)
        if len(reads) > 20:
            raise RuntimeError("the acquirer is spinning")
        return real_read(url)

    monkeypatch.setattr(output_lock_module, "read_lock", counted)
    missing = f"s3://{s3_bucket.removeprefix('s3://')}-gone/out"
    with pytest.raises(MissingPathError, match=r"bucket .*-gone does not exist"), output_lock(missing):
        pass
    assert len(reads) <= 1

