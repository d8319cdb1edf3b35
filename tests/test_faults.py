"""Faults: a flaky S3 (5xx, slow answers, connection resets) during ingest and scoring, a full disk or
an unwritable output, and two scoring runs on the same output at once."""

from __future__ import annotations

import collections
import contextlib
import http.client
import http.server
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow as pa
import pytest

from tasks.core import storage
from tasks.ingest.manifests import read_manifest_table
from tasks.ingest.pipeline import ingest_ava
from tasks.ingest.settings import IngestParams
from tasks.ingest.synth import synthesize_ava
from tasks.scoring import output_lock as output_lock_module
from tasks.scoring.listing import cut_into_shards, list_source
from tasks.scoring.output_lock import OutputLocked, lock_url, output_lock, read_lock
from tasks.scoring.predictions import list_parts, partition_url, read_predictions
from tasks.scoring.scorer import ScoringConfig, score_shards
from tests.score_command import ScoreProcess, child_env, data_files, raw_rows, score_args, shard_parts
from tests.scoring_fixtures import image_bytes, make_checkpoint, write_images

REPO = Path(__file__).resolve().parents[1]
DATE = "2026-02-03"
_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "proxy-connection", "upgrade"}


# One torch thread: bitwise-equal runs across processes, and a 2-core machine is not oversubscribed.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 in front of an S3 endpoint that fails a fraction of requests.

    The fate of a request is a pure function of (seed, method, path, how many times this exact
    request was seen), so a run is reproducible whatever the thread interleaving. Faults: 500 and
    503 with S3 error bodies, a 0.3 s delay, or a connection reset (RST, no answer). No request
    fails more than ``max_in_a_row`` times running, so retries (botocore's, s3fs's, ours) must win.
    """

    def __init__(self, upstream: str, seed: int, rate: float = 0.3, max_in_a_row: int = 2) -> None:
        self.upstream = urlsplit(upstream)
        self.seed, self.rate, self.max_in_a_row = seed, rate, max_in_a_row
        self.seen: collections.Counter[str] = collections.Counter()
        self.in_a_row: collections.Counter[str] = collections.Counter()
        self.faults: collections.Counter[str] = collections.Counter()
        self.stage = "-"  # set by the test as it moves from stage to stage
        self.faults_by_stage: collections.Counter[tuple[str, str]] = collections.Counter()
        self.lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _body(self) -> bytes:
                if "chunked" in self.headers.get("Transfer-Encoding", ""):
                    chunks = []
                    while (size := int(self.rfile.readline().split(b";")[0], 16)):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    self.rfile.readline()
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                body = self._body()
                # The bucket's name is random per test: left out, a request's fate is the same every run.
                bucketless = "/" + self.path.lstrip("/").partition("/")[2]
                fault = proxy.decide(f"{self.command} {bucketless}")
                if fault == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    return
                if fault in ("500", "503"):
                    code = "InternalError" if fault == "500" else "SlowDown"
                    payload = f"<Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
                    self.send_response(int(fault))
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                if fault == "slow":
                    time.sleep(0.3)
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                try:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
                    headers["Content-Length"] = str(len(body))
                    conn.request(self.command, self.path, body=body, headers=headers)
                    answer = conn.getresponse()
                    data = answer.read()
                finally:
                    conn.close()
                self.send_response(answer.status)
                for k, v in answer.getheaders():
                    if k.lower() not in _HOP:
                        self.send_header(k, v)
                # HEAD answers carry the object's length, not the (empty) body's
                length = answer.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def decide(self, key: str) -> str | None:
        with self.lock:
            n = self.seen[key]
            self.seen[key] += 1
            rng = random.Random(f"{self.seed}|{key}|{n}")
            fault = None
            if self.in_a_row[key] < self.max_in_a_row and rng.random() < self.rate:
                fault = rng.choice(["500", "503", "slow", "reset"])
            failed = fault in ("500", "503", "reset")
            self.in_a_row[key] = self.in_a_row[key] + 1 if failed else 0
            if fault:
                self.faults[fault] += 1
                self.faults_by_stage[self.stage, fault] += 1
            return fault

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def through_proxy(s3_server, monkeypatch):
    """Yields a function that points S3 traffic at a fault proxy (seeded) for the rest of the test."""
    proxies = []

    def start(seed: int) -> FaultProxy:
        proxy = FaultProxy(s3_server, seed).__enter__()
        proxies.append(proxy)
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        return proxy

    yield start
    for proxy in proxies:
        proxy.__exit__()


def _manifest_rows(root: str) -> list[dict]:
    table = pa.concat_tables([read_manifest_table(root, s) for s in ("train", "val", "test", "rejected")
                              if s != "rejected"]).sort_by("image_id")
    return [{**r, "uri": r["uri"].removeprefix(root)} for r in table.to_pylist()]


@pytest.mark.s3
@pytest.mark.slow
def test_ingest_and_scoring_through_a_flaky_s3_equal_a_clean_run(s3_bucket, s3_server, through_proxy, tmp_path):
    src = tmp_path / "ava"
    synthesize_ava(str(src), 16, seed=5, workers=1)
    (src / "images" / sorted(os.listdir(src / "images"))[0]).write_bytes(b"<html>gone</html>")  # one bad file
    fs, _ = storage.filesystem(s3_bucket)
    fs.put(str(src / "images"), f"{s3_bucket[5:]}/raw/images", recursive=True)
    fs.put(str(src / "AVA.txt"), f"{s3_bucket[5:]}/raw/AVA.txt")
    for i in range(6):
        storage.write_bytes_atomic(f"{s3_bucket}/bucket/{i}.jpg", image_bytes(i, 40 + 3 * i, 30))
    checkpoint = str(tmp_path / "model.pt")
    version = make_checkpoint(checkpoint)
    config = ScoringConfig(batch_size=4, progress=False)

    proxy: FaultProxy | None = None

    def stage(name: str) -> None:
        if proxy is not None:
            proxy.stage = name

    def run(tag: str) -> tuple[list[dict], dict, list[dict]]:
        root = f"{s3_bucket}/{tag}"
        stage("ingest")
        summary = ingest_ava(IngestParams(labels=f"{s3_bucket}/raw/AVA.txt", images=f"{s3_bucket}/raw/images",
                                          root=root, max_concurrency=4, backoff_s=0.01))
        stage("scoring")
        listing = list_source(f"{s3_bucket}/bucket")
        list(score_shards(cut_into_shards(listing.objects, 2), checkpoint=checkpoint, out=f"{root}/predictions",
                          date=DATE, config=config))
        stage("checking")
        rows = read_predictions(f"{root}/predictions", version, latest=False).drop_columns(["scored_at"])
        return _manifest_rows(root), summary["rejected"], sorted(rows.to_pylist(), key=lambda r: r["uri"])

    clean = run("clean")
    proxy = through_proxy(seed=7)
    flaky = run("flaky")
    assert sum(proxy.faults[f] for f in ("500", "503", "reset")) >= 10, proxy.faults  # faults really happened
    assert proxy.faults["reset"] and proxy.faults["slow"]
    # Per stage: scoring itself (listing, reads, part commits), not only ingest, met failed requests.
    failed = {stage: sum(n for (s, f), n in proxy.faults_by_stage.items() if s == stage and f != "slow")
              for stage in ("ingest", "scoring")}
    print("faults by stage:", dict(proxy.faults_by_stage))
    assert failed["ingest"] >= 5 and failed["scoring"] >= 3, proxy.faults_by_stage
    uris = [r["uri"] for r in flaky[2]]
    assert len(uris) == len(set(uris)) == 6  # each image written once despite the retried requests
    assert flaky[1] == clean[1] == {"decode": 1}
    assert flaky[0] == clean[0] and len(clean[0]) == 15
    assert flaky[2] == clean[2] and [r["status"] for r in clean[2]] == ["ok"] * 6


# ---- the output cannot be written ----------------------------------------------------------------

_FULL_DISK = textwrap.dedent("""
    import resource, signal, sys
    from tasks.scoring.listing import list_source, cut_into_shards
    from tasks.scoring.scorer import ScoringConfig, score_shards
    src, ckpt, out, limit = sys.argv[1:5]
    objects = list_source(src).objects
    from tasks.scoring.scorer import load_scoring_model
    load_scoring_model(ckpt, "cpu")  # read everything before the limit bites
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill, like ENOSPC
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(limit), int(limit)))
    list(score_shards(cut_into_shards(objects, 5), checkpoint=ckpt, out=out, date="2026-02-03",
                      config=ScoringConfig(batch_size=5, progress=False)))
""")


def _visible_parquet(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*.parquet") if not p.name.startswith((".", "_"))] if folder.exists() else []


def test_full_disk_fails_clearly_and_leaves_no_partial_parquet(tmp_path):
    """RLIMIT_FSIZE makes every write past 3 KB fail (EFBIG, as a full disk fails with ENOSPC), even as root."""
    write_images(tmp_path / "src", 10)
    checkpoint = str(tmp_path / "model.pt")
    version = make_checkpoint(checkpoint)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", _FULL_DISK, str(tmp_path / "src"), checkpoint, str(out), "3000"],
                          cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    assert "File too large" in proc.stderr and f"cannot write {out}" in proc.stderr, proc.stderr[-2000:]
    assert _visible_parquet(out) == [] and list(out.rglob(".tmp-*")) == []  # no partial file, no debris
    assert read_predictions(str(out), version).num_rows == 0
    # With room again, the same call completes and nothing is duplicated: raw rows, file by file
    # (read_predictions' default keeps one row per image and would hide a duplicate).
    list(score_shards(cut_into_shards(list_source(str(tmp_path / "src")).objects, 5), checkpoint=checkpoint,
                      out=str(out), date=DATE, config=ScoringConfig(batch_size=5, progress=False)))
    uris = [r["uri"] for r in raw_rows(partition_url(str(out), version, DATE))]
    assert len(uris) == len(set(uris)) == 10 and len(_visible_parquet(out)) == 2


def test_unwritable_output_fails_clearly(tmp_path):
    """Permission denied, as root: the output's parent is a regular file, so nothing can be created under it."""
    write_images(tmp_path / "src", 3)
    checkpoint = str(tmp_path / "model.pt")
    make_checkpoint(checkpoint)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the output folder should be")
    objects = list_source(str(tmp_path / "src")).objects
    with pytest.raises(OSError, match=r"cannot write .*not-a-folder"):
        list(score_shards([objects], checkpoint=checkpoint, out=str(blocker / "out"), date=DATE,
                          config=ScoringConfig(progress=False)))
    synthesize_ava(str(tmp_path / "ava"), 4, seed=1, workers=1)
    with pytest.raises(OSError, match=r"cannot write .*not-a-folder"):
        ingest_ava(IngestParams(labels=str(tmp_path / "ava" / "AVA.txt"), images=str(tmp_path / "ava" / "images"),
                                root=str(blocker / "root")))
    assert blocker.read_text().startswith("a file")


# ---- two runs on one output ----------------------------------------------------------------------

def test_lock_refuses_waits_and_takes_over_a_stale_one(tmp_path):
    out = str(tmp_path / "out")
    with output_lock(out, ttl_s=60) as held:
        assert read_lock(lock_url(out)).owner == held.owner
        with pytest.raises(OutputLocked, match="being written by another run"), output_lock(out, ttl_s=60):
            pass
    assert read_lock(lock_url(out)) is None  # released

    # A holder that waits: the second one gets the lock once the first lets go.
    got, second = [], output_lock(out, wait_s=20, poll_s=0.05)
    with output_lock(out, ttl_s=60):
        waiter = threading.Thread(target=lambda: got.append(second.__enter__()))
        waiter.start()
        time.sleep(0.3)
        assert not got
    waiter.join(timeout=20)
    assert got and read_lock(lock_url(out)).owner == got[0].owner
    second.__exit__(None, None, None)

    # A dead run's lock (no heartbeat for longer than the ttl) is taken over.
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "_scoring.lock").write_text('{"owner": "dead", "host": "h", "pid": 1, "started": 0, "heartbeat": 0}')
    with output_lock(str(stale), ttl_s=5) as mine:
        assert read_lock(lock_url(str(stale))).owner == mine.owner != "dead"

    # A fresh heartbeat but a holder process on this host that is gone (SIGKILL): taken over at once.
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "_scoring.lock").write_text(
        f'{{"owner": "killed", "host": "{socket.gethostname()}", "pid": {int(gone.stdout)}, '
        f'"started": {time.time()}, "heartbeat": {time.time()}}}')
    with output_lock(str(killed), ttl_s=300) as mine:
        assert read_lock(lock_url(str(killed))).owner == mine.owner


@pytest.mark.s3
def test_lock_on_s3_is_a_conditional_put(s3_bucket):
    out = f"{s3_bucket}/predictions"
    with output_lock(out, ttl_s=60), pytest.raises(OutputLocked), output_lock(out, ttl_s=60):
        pass
    with output_lock(out, ttl_s=60):  # released, so free again
        pass


@pytest.mark.slow
def test_two_scoring_runs_at_once_never_interleave(prefect_harness, tmp_path):
    """Run A is a real ``mpemd score`` process; this process tries the output while A holds it and is
    refused, then runs the flow with a wait and finds A's work done. Every image is scored exactly once."""
    from prefect.settings import PREFECT_API_URL

    from flows.score_bucket import ScoreBucketParams, score_bucket

    n = 30
    write_images(tmp_path / "src", n)
    checkpoint = str(tmp_path / "model.pt")
    version = make_checkpoint(checkpoint)
    out = str(tmp_path / "out")
    cmd = [sys.executable, "-m", "flows.cli", "score", str(tmp_path / "src"), "--checkpoint", checkpoint, "--out", out,
           "--shard-size", "1", "--batch-size", "1", "--date", DATE]
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    params = ScoreBucketParams(source=str(tmp_path / "src"), checkpoint=checkpoint, out=out, date=DATE,
                               shard_size=1, batch_size=1)
    try:
        deadline = time.monotonic() + 120
        while read_lock(lock_url(out)) is None:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.02)
        with pytest.raises(OutputLocked, match=f"pid {proc.pid}"), output_lock(out):
            pass
        waited = score_bucket(**{**params.model_dump(), "lock_wait_s": 120})
        assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert waited["listed"] == n and waited["scored"] == 0 and waited["skipped_unchanged"] == n
    uris = read_predictions(out, version, latest=False).column("uri").to_pylist()
    # A merged its 30 shard parts into one before letting go of the lock: the waiting run saw that state.
    assert len(uris) == len(set(uris)) == n and len(list_parts(out, version)) == 1
    assert read_lock(lock_url(out)) is None
    with output_lock(out), pytest.raises(OutputLocked):  # the flow itself refuses a held output
        score_bucket(**params.model_dump())


def _held_by_another_host(out: str, ttl_s: float, monkeypatch) -> contextlib.AbstractContextManager:
    """Take the lock as if from another machine: then only its heartbeat says the holder is alive
    (a holder on this host is also judged by whether its process exists)."""
    lock = output_lock(out, ttl_s=ttl_s)
    with monkeypatch.context() as patched:
        patched.setattr(socket, "gethostname", lambda: "another-host")
        lock.__enter__()
    return lock


class InjectedClock:
    """The clock of heartbeats and staleness (``output_lock._now``), moved by the test alone: what a
    test proves about ttls then holds however late this machine runs the heartbeat thread."""

    def __init__(self, monkeypatch) -> None:
        self.t = 1_000_000.0
        monkeypatch.setattr(output_lock_module, "_now", self)

    def __call__(self) -> float:
        return self.t


def _heartbeat_reaches(url: str, t: float) -> None:
    """Wait (real time, no bound asserted) until the holder's heartbeat thread has written time ``t``."""
    deadline = time.monotonic() + 120
    while (held := read_lock(url)) is None or held.heartbeat < t:
        assert time.monotonic() < deadline, "the heartbeat thread never refreshed the lock"
        time.sleep(0.01)


def test_the_heartbeat_keeps_a_long_runs_lock(tmp_path, monkeypatch):
    clock = InjectedClock(monkeypatch)
    out, ttl = str(tmp_path / "out"), 0.2  # the heartbeat thread wakes every ttl/4 = 0.05 s (real)
    url = lock_url(out)
    lock = _held_by_another_host(out, ttl, monkeypatch)
    try:
        holder = read_lock(url).owner
        # Five ttls of the injected clock: without refreshes the lock would look dead after one.
        for _ in range(10):
            clock.t += ttl / 2
            _heartbeat_reaches(url, clock.t)
            with pytest.raises(OutputLocked), output_lock(out, ttl_s=ttl):
                pass
        assert read_lock(url).owner == holder
        # The stall, made explicit: the heartbeat stops; one ttl later a contender takes the lock over.
        heartbeat = output_lock_module._HELD[out]
        heartbeat.stop.set()
        heartbeat.join()
        clock.t += ttl * 1.01
        with output_lock(out, ttl_s=ttl) as mine:
            assert read_lock(url).owner == mine.owner != holder
    finally:
        lock.__exit__(None, None, None)


def test_a_holder_resumed_after_a_stall_asks_storage_before_writing(tmp_path, monkeypatch):
    """A stopped process resumes: its main thread may reach a commit before the heartbeat thread has
    looked at the lock again. ``assert_held`` must then read the lock itself, not trust a stale flag."""
    from tasks.scoring.output_lock import (
        LockInfo,
        OutputLockLost,
        _create_exclusive,
        _encode,
        _remove,
        assert_held,
    )

    clock = InjectedClock(monkeypatch)
    out, ttl = str(tmp_path / "out"), 600.0  # the heartbeat thread sleeps 150 s: it will not run here
    url, part = lock_url(out), f"{out}/model_version=v/date=d/part-00000-{'a' * 16}.parquet"
    with output_lock(out, ttl_s=ttl) as mine:
        assert_held(part)
        clock.t += 2 * ttl  # stalled for two ttls; meanwhile another run took the lock over
        _remove(url)
        thief = LockInfo(url=url, owner="thief", host="another-host", pid=1, started=clock.t, heartbeat=clock.t)
        assert _create_exclusive(url, _encode(thief))
        with pytest.raises(OutputLockLost, match="taken over"):
            assert_held(part)
        assert read_lock(url).owner == "thief" != mine.owner


@pytest.mark.slow
def test_a_run_that_loses_its_lock_mid_run_and_the_run_that_takes_over_score_each_image_once(tmp_path):
    """Two whole ``mpemd score`` runs on one output. Run A is stopped (SIGSTOP: a real stall, its
    heartbeat stops with it) after two commits; run B waits for the lock, takes it over once A's
    heartbeat is older than the ttl, scores the rest and compacts. A is then resumed: it must notice
    the loss before its next commit and stop. Over the union of their outputs every image has
    exactly one row."""
    n = 12
    (tmp_path / "src").mkdir()
    for i in range(n):  # real work per shard (decode, 16 patches), so A is stopped mid-run
        (tmp_path / "src" / f"{i:02d}.jpg").write_bytes(image_bytes(i, 320, 240))
    checkpoint = str(tmp_path / "model.pt")
    version = make_checkpoint(checkpoint)
    out = str(tmp_path / "out")
    partition = partition_url(out, version, DATE)
    args = score_args(str(tmp_path / "src"), checkpoint, out, DATE, "--n-patches", "16")
    env = child_env(MPEMD_LOCK_TTL_S="3")  # A's heartbeat every 0.75 s; stale after 3 s without one
    a = ScoreProcess(args, env, partition, tmp_path / "a")
    try:
        a.wait(until=lambda r: len(r.commits) >= 2)
        assert a.proc.poll() is None, ("run A ended before it could be stalled", a.stderr()[-2000:])
        a.send(signal.SIGSTOP)
        a_parts = set(shard_parts(partition))
        assert 2 <= len(a_parts) < n, a_parts
        stalled = read_lock(lock_url(out))
        assert stalled is not None and stalled.pid == a.proc.pid
        b = ScoreProcess([*args, "--lock-wait-s", "300"], env, partition, tmp_path / "b").wait()
        assert b.returncode() == 0, b.stderr()[-3000:]
        assert "taking over stale output lock" in b.stderr(), b.stderr()[-3000:]
        summary = b.summary()
        assert summary["skipped_unchanged"] == len(a_parts) and summary["scored"] == n - len(a_parts), summary
        after_b = data_files(partition)
        a.send(signal.SIGCONT)
        assert a.returncode() != 0, "run A went on writing after losing its lock"
        assert "taken over" in a.stderr(), a.stderr()[-3000:]
    finally:
        if a.proc.poll() is None:
            a.send(signal.SIGKILL)
            a.proc.wait()
    assert data_files(partition) == after_b, "run A committed after it lost its lock"
    uris = [r["uri"] for r in raw_rows(partition)]
    assert len(uris) == len(set(uris)) == n  # exactly once over A's and B's outputs together
    assert read_lock(lock_url(out)) is None


_THIEF = """
import sys
from tasks.scoring.output_lock import _remove, lock_url, output_lock
out = sys.argv[1]
_remove(lock_url(out))  # what a takeover of a stalled holder does
with output_lock(out, ttl_s=60):
    print("taken", flush=True)
    sys.stdin.read()  # until the test closes stdin
"""


def test_a_lost_lock_stops_the_writer(tmp_path, monkeypatch):
    from tasks.scoring.layout import part_url
    from tasks.scoring.output_lock import OutputLockLost, assert_held
    from tasks.scoring.predictions import rows_to_table, write_part

    out, ttl = str(tmp_path / "out"), 0.4
    lock = _held_by_another_host(out, ttl, monkeypatch)
    first = part_url(out, "v1", "2026-01-01", 0, "a" * 16)
    write_part(rows_to_table([]), first)  # while held: commits
    thief = subprocess.Popen([sys.executable, "-c", _THIEF, out], cwd=REPO, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert thief.stdout.readline().strip() == "taken"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the heartbeat notices within ttl/4
            try:
                assert_held(out)
            except OutputLockLost:
                break
            time.sleep(0.05)
        second = part_url(out, "v1", "2026-01-01", 1, "b" * 16)
        with pytest.raises(OutputLockLost, match="taken over"):
            write_part(rows_to_table([]), second)
        assert not storage.exists(second) and storage.exists(first)
    finally:
        thief.stdin.close()
        thief.wait(timeout=30)
        lock.__exit__(None, None, None)


def test_a_lock_being_created_is_never_seen_half_written(tmp_path):
    """A lock file appears with its owner already in it: a reader polling while locks are created must
    never read an empty or partial lock, which it would judge stale (heartbeat 0) and take over from
    its live holder. (Created empty then written, the file was visible empty in between: found as a
    flake of the two-runs test above, where the second run took a live run's lock.)"""
    from tasks.scoring.output_lock import LockInfo, _create_exclusive, _encode, _remove

    url = lock_url(str(tmp_path))
    done, garbled = threading.Event(), []

    def reader() -> None:
        while not done.is_set():
            holder = read_lock(url)
            if holder is not None and holder.owner == "?":
                garbled.append(holder)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(400):
            now = time.time()
            mine = LockInfo(url=url, owner=f"run-{i}", host=socket.gethostname(), pid=os.getpid(), started=now,
                            heartbeat=now)
            assert _create_exclusive(url, _encode(mine))
            _remove(url)
    finally:
        done.set()
        thread.join()
    assert not garbled

