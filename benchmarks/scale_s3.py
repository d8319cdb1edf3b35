"""The S3 stages of ``benchmarks/bench_scale.py``: ingest and the nightly no-op against the S3 API.

The same points as the local ``ingest`` and ``noop`` stages (``benchmarks/scale_stages.py``), with the
images, the ingest root and the scoring output in a bucket of a loopback moto server
(``benchmarks/s3_moto.py``, its own process, started on first use and stopped when this process
exits). A point's bucket is filled straight into the server (not measured; the rate is printed), and
each measured run also records the requests it made, by kind (``requests``, ``requests_by_kind``):
the no-op over S3 should cost the listing's pages (one per 1,000 keys) plus a fixed handful.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.s3_moto import MotoServer, restore_environment
from benchmarks.scale_stages import (
    MPEMD,
    Run,
    Stage,
    _expect,
    _score_cmd,
    tiny_checkpoint,
    tiny_jpeg,
    write_labels,
    write_scored_state,
)

_server: MotoServer | None = None
_saved_environment: dict[str, str | None] = {}  # what server() replaced in os.environ, put back by stop_server()


def server() -> MotoServer:
    """The one moto server of this process (started on first use), emptied; its endpoint and
    credentials are set in ``os.environ`` so this process's own s3fs calls reach it too."""
    global _server
    if _server is None:
        _server = MotoServer().__enter__()
        atexit.register(_server.__exit__)
        _saved_environment.update({key: os.environ.get(key) for key in _server.env})
        os.environ.update(_server.env)
    _server.reset()
    return _server


def stop_server() -> None:
    """Stop the server if one was started (bench_scale calls this when its stages are done)."""
    global _server
    if _server is not None:
        atexit.unregister(_server.__exit__)
        _server.__exit__()
        _server = None
        restore_environment(_saved_environment)
        _saved_environment.clear()


def _with_env(cmd: list[str], s3: MotoServer) -> list[str]:
    """``cmd`` under ``env`` with the server's variables: ``/usr/bin/time`` measures the same process
    (``env`` execs it)."""
    return ["env", *(f"{k}={v}" for k, v in s3.env.items()), *cmd]


def _counted(s3: MotoServer, check: Callable[[str], dict | None] | None = None) -> Callable[[str], dict]:
    """``check``, then the requests since the last count (which this zeroes for the next run)."""
    def run_check(stdout: str) -> dict:
        figures = (check(stdout) if check else None) or {}
        kinds = s3.requests(reset=True)
        # when and under what load: this machine is shared, so a point's wall needs its context
        return {**figures, "requests": sum(kinds.values()), "requests_by_kind": dict(sorted(kinds.items())),
                "utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "load_1m": round(os.getloadavg()[0], 1)}

    return run_check


def _fill(s3: MotoServer, bucket: str, template: str, n: int, blob: bytes) -> None:
    start = time.perf_counter()
    s3.fill(bucket, template, n, blob)
    seconds = time.perf_counter() - start
    print(f"[s3] {n:,} objects put into s3://{bucket} in {seconds:.1f} s ({n / seconds:,.0f} objects/s)", flush=True)


def prepare_ingest_s3(folder: Path, n: int) -> list[Run]:
    """The ingest stage's label lines (a local file) with the images and the root in a bucket."""
    s3 = server()
    labels = write_labels(folder, n)
    _fill(s3, "ingest", "images/{i1}.jpg", n, tiny_jpeg(160, 120))
    cmd = _with_env([MPEMD, "ingest", "--labels", str(labels), "--images", "s3://ingest/images", "--root",
                     "s3://ingest/root", "--mode", "reference"], s3)
    s3.requests(reset=True)
    return [("s3 first run", cmd, None, _counted(s3)), ("s3 rerun", cmd, None, _counted(s3))]


def prepare_noop_s3(folder: Path, n: int) -> list[Run]:
    """``prepare_noop`` over a bucket: ``n`` images under ``s3://noop/in/<folder of 1,000>/``, their
    scored rows under ``s3://noop/out``; the rerun must score nothing."""
    s3 = server()
    _fill(s3, "noop", "in/{d:05d}/{i1}.jpg", n, tiny_jpeg(64, 48))
    ckpt = tiny_checkpoint(folder / "tiny.pt")
    write_scored_state("s3://noop/in", "s3://noop/out", ckpt, folder / "seed")
    s3.requests(reset=True)
    cmd = _with_env(_score_cmd("s3://noop/in", ckpt, "s3://noop/out"), s3)
    return [("s3 no-op rerun", cmd, None, _counted(s3, _expect(0, n)))]


def shard_part(rows: int = 10) -> bytes:
    """One part file as scoring commits it (every column, ``rows`` rows): a compaction source."""
    import datetime as dt
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.core.schemas import PREDICTION_SCHEMA

    scored_at = dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc)
    table = pa.Table.from_pylist([{
        "uri": f"s3://in/{i}.jpg", "model": "mpemd", "patch_mode": "random", "n_patches": 5, "score": 5.0,
        "dist": [0.1] * 10, "source_etag": f"e{i}", "source_size": 100, "scored_at": scored_at, "status": "ok",
    } for i in range(rows)], schema=PREDICTION_SCHEMA)
    buffer = io.BytesIO()
    pq.write_table(table, buffer, compression="zstd")
    return buffer.getvalue()


def _fill_shard_parts(s3: MotoServer, bucket: str, n: int) -> None:
    """``n`` parts of 10 rows (``shard_part``) in one ``date=`` partition of ``s3://<bucket>/out``."""
    _fill(s3, bucket, "out/model_version=v/date=2026-12-01/part-{i:05d}-00000000000000aa.parquet", n, shard_part())


def prepare_compact_s3(folder: Path, n: int) -> list[Run]:
    """``n`` shard part files (10 rows each) in one ``date=`` partition of ``s3://compact/out``, as
    ``mpemd score --no-compact`` leaves a night of ``n`` shards; ``mpemd compact`` merges them. Cost
    per file: one GET a source and one DeleteObjects request per 1,000 sources, no HEAD a source."""
    s3 = server()
    _fill_shard_parts(s3, "compact", n)

    def check(stdout: str) -> dict:
        summary = json.loads(stdout)
        assert (summary["files_before"], summary["files_after"], summary["rows"]) == (n, 1, 10 * n), summary
        return {}

    cmd = _with_env([MPEMD, "compact", "--out", "s3://compact/out"], s3)
    s3.requests(reset=True)
    return [("s3 compact", cmd, None, _counted(s3, check))]


READ_STATE = """
import sys
from tasks.scoring.predictions import ScoringSettings, read_state
state = read_state(sys.argv[1], "v", ScoringSettings("mpemd", "random", 5))
print(len(state))
"""


def prepare_state_s3(folder: Path, n: int) -> list[Run]:
    """``n`` parts of 10 rows (``shard_part``) in one ``date=`` partition of ``s3://state/out``, and the
    scoring plan's lookup of what is scored (``read_state``: one listing, then each part read) in a
    process of its own. Cost per part: one GET; the listing cache is not scanned once a part."""
    s3 = server()
    _fill_shard_parts(s3, "state", n)

    def check(stdout: str) -> dict:
        assert stdout.split() == ["10"], stdout  # every part holds the same 10 images
        return {}

    cmd = _with_env([sys.executable, "-c", READ_STATE, "s3://state/out"], s3)
    s3.requests(reset=True)
    return [("s3 state read", cmd, None, _counted(s3, check))]


SIZES = [1_000, 3_000, 10_000, 30_000, 100_000]
STAGES = {
    "ingest-s3": Stage("image", [300, 1_000], SIZES, prepare_ingest_s3),
    "noop-s3": Stage("image", [300, 1_000], SIZES, prepare_noop_s3),
    "compact-s3": Stage("file", [100, 300], [300, 1_000, 3_000, 10_000], prepare_compact_s3),
    "state-s3": Stage("part", [100, 300], [300, 1_000, 3_000, 10_000], prepare_state_s3),
}
