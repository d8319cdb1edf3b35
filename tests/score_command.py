"""The real ``mpemd score`` command (the console script: flow, output lock and compaction included)
in a child process, watched from outside through its output folder: when each shard's part appeared,
whether a compaction marker is there; stopped, resumed or SIGKILLed at a chosen moment.

No hook in the child: what the test knows of the run is what a user would see on disk."""

from __future__ import annotations

import json
import os
import posixpath
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.core import storage
from tasks.scoring.layout import COMPACTING_PREFIX, SHARD_KEY_HEX

REPO = Path(__file__).resolve().parents[1]
# A shard's part (five-digit index, SHARD_KEY_HEX hex digits); a merged file's key is longer.
SHARD_PART = re.compile(rf"^part-\d{{5}}-[0-9a-f]{{{SHARD_KEY_HEX}}}\.parquet$")


def mpemd() -> list[str]:
    """The installed console script (``flows.launch.entry``), as a user types it; ``python -m
    flows.cli`` only where the environment has no script."""
    script = Path(sys.executable).parent / "mpemd"
    return [str(script)] if script.exists() else [sys.executable, "-m", "flows.cli"]


def child_env(**extra: str) -> dict[str, str]:
    """This tree's code (PYTHONPATH) and one torch thread (bitwise-equal scores across runs). No Prefect
    API: the flow runs in the process, as ``mpemd score`` does for a user without a server (the same
    flow body, lock and compaction; through the test server a run took ~20 s here instead of ~5)."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    return {**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def _names(partition: str) -> list[str]:
    fs, path = storage.filesystem(partition)
    fs.invalidate_cache(path)
    try:
        return sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))
    except FileNotFoundError:
        return []


def data_files(partition: str) -> list[str]:
    """Every Parquet file a reader could count: shard parts and merged files (not ``.tmp-*``, ``_*``)."""
    return [n for n in _names(partition) if n.endswith(".parquet") and not n.startswith((".", "_"))]


def shard_parts(partition: str) -> list[str]:
    return [n for n in data_files(partition) if SHARD_PART.match(n)]


def markers(partition: str) -> list[str]:
    return [n for n in _names(partition) if n.startswith(COMPACTING_PREFIX)]


def raw_rows(partition: str) -> list[dict]:
    """Every row of every data file, read file by file (no dedup, no skipping), without ``scored_at``
    (the only column that differs between equal runs), sorted by URI."""
    fs, path = storage.filesystem(partition)
    tables = []
    for name in data_files(partition):
        with fs.open(posixpath.join(path, name), "rb") as f:
            tables.append(pq.ParquetFile(f).read())
    if not tables:
        return []
    rows = pa.concat_tables(tables, promote_options="default").drop_columns(["scored_at"]).to_pylist()
    return sorted(rows, key=lambda r: r["uri"])


class ScoreProcess:
    """``mpemd score`` running in its own session; ``commits[i]``: seconds from its start to when the
    (i+1)-th shard part was first seen in ``partition`` (polled every 2 ms)."""

    def __init__(self, argv: list[str], env: dict[str, str], partition: str, logs: Path) -> None:
        self.partition, self.logs = partition, logs
        logs.mkdir(parents=True, exist_ok=True)
        self.start = time.monotonic()
        with open(logs / "stdout", "wb") as out, open(logs / "stderr", "wb") as err:
            self.proc = subprocess.Popen([*mpemd(), *argv], cwd=REPO, env=env, stdout=out, stderr=err,
                                         start_new_session=True)
        self.seen: set[str] = set()
        self.commits: list[float] = []
        self.marker_seen = False

    def poll(self) -> None:
        now = time.monotonic() - self.start
        for name in shard_parts(self.partition):
            if name not in self.seen:
                self.seen.add(name)
                self.commits.append(now)
        self.marker_seen = self.marker_seen or bool(markers(self.partition))

    def wait(self, until: Callable[[ScoreProcess], bool] | None = None, timeout_s: float = 300) -> ScoreProcess:
        """Poll until the process ends or ``until(self)`` holds."""
        deadline = time.monotonic() + timeout_s
        while self.proc.poll() is None:
            self.poll()
            if until is not None and until(self):
                return self
            assert time.monotonic() < deadline, ("mpemd score ran past its deadline", self.stderr()[-3000:])
            time.sleep(0.002)
        self.poll()
        return self

    def due(self, after_commits: int, delay_s: float) -> bool:
        return len(self.commits) >= after_commits and (
            time.monotonic() - self.start >= self.commits[after_commits - 1] + delay_s)

    def send(self, sig: signal.Signals) -> None:
        os.killpg(self.proc.pid, sig)  # the whole session: decoding workers too

    def returncode(self) -> int:
        return self.proc.wait(timeout=120)

    def stderr(self) -> str:
        return (self.logs / "stderr").read_text(errors="replace")

    def summary(self) -> dict:
        printed = (self.logs / "stdout").read_text()
        return json.loads(printed[printed.index("{\n"):])


def score_args(src: str, checkpoint: str, out: str, date: str, *extra: str) -> list[str]:
    """One image per shard and per batch: a kill has many commits to land between, and each image's
    score comes from the same batch shape in every run (bit-equal across runs)."""
    return ["score", src, "--checkpoint", checkpoint, "--out", out, "--shard-size", "1", "--batch-size", "1",
            "--date", date, *extra]
