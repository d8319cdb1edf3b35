"""flows/score_bucket.py end to end: incremental, exactly-once, local and S3, in-process and on Dask."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from flows.score_bucket import ScoreBucketParams, score_bucket
from tasks.core import storage
from tasks.scoring.listing import list_source
from tasks.scoring.predictions import PREDICTION_SCHEMA, list_parts, read_predictions
from tasks.scoring.scorer import ScoringConfig, score_shard
from tests.scoring_fixtures import image_bytes, make_checkpoint, write_images

REPO = Path(__file__).resolve().parents[1]
DATE = "2026-01-02"


@pytest.fixture(autouse=True)
def _few_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _rows(out: str, version: str, latest: bool = False) -> list[dict]:
    """Rows without the wall-clock column, sorted, for comparing runs."""
    table = read_predictions(out, version, latest=latest).drop_columns(["scored_at"])
    return sorted(table.to_pylist(), key=lambda r: (r["uri"], str(r["source_mtime"]), str(r["source_etag"])))


def _run(source: str, checkpoint: str, out: str, **kw) -> dict:
    params = ScoreBucketParams(source=source, checkpoint=checkpoint, out=out, **{
        "date": DATE, "batch_size": 4, "shard_size": 3, **kw})
    summary = score_bucket(**params.model_dump())
    assert summary["listed"] == summary["scored"] + summary["skipped_unchanged"]  # count in == count out
    return summary


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    a, b = folder / "a.pt", folder / "b.pt"
    return (str(a), make_checkpoint(a, seed=0)), (str(b), make_checkpoint(b, seed=1))


def _put_bucket(root: str, n: int) -> list[str]:
    """``n`` images plus two non-images under ``root`` (local folder or s3 prefix); returns image URIs."""
    uris = []
    for i in range(n):
        uri = storage.join(root, f"photos/{i + 1}.jpg" if i % 3 else f"photos/sub/{i + 1}.png")
        storage.write_bytes_atomic(uri, image_bytes(i, 40 + 4 * i, 32, "PNG" if i % 3 == 0 else "JPEG"))
        uris.append(uri)
    storage.write_bytes_atomic(storage.join(root, "photos/notes.txt"), b"not an image")
    storage.write_bytes_atomic(storage.join(root, "photos/broken.jpg"), b"\xff\xd8 not really")
    return [*uris, storage.join(root, "photos/broken.jpg")]


@pytest.mark.parametrize("backend", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_incremental_runs(prefect_harness, checkpoints, tmp_path, backend, request):
    root = request.getfixturevalue("s3_bucket") if backend == "s3" else str(tmp_path)
    (ckpt_a, version_a), (ckpt_b, version_b) = checkpoints
    if backend == "s3":  # the checkpoint comes from the bucket too
        for path in (ckpt_a, ckpt_b):
            storage.write_bytes_atomic(storage.join(root, "models", Path(path).name), Path(path).read_bytes())
        ckpt_a, ckpt_b = storage.join(root, "models/a.pt"), storage.join(root, "models/b.pt")
    uris = _put_bucket(root, 7)
    source, out = storage.join(root, "photos"), storage.join(root, "predictions")

    first = _run(source, ckpt_a, out)
    assert (first["listed"], first["scored"], first["skipped_unchanged"], first["non_image_skipped"]) == (8, 8, 0, 1)
    assert first["errors"] == 1 and first["model_version"] == version_a
    rows = _rows(out, version_a)
    assert sorted(r["uri"] for r in rows) == sorted(uris)
    broken = next(r for r in rows if r["uri"].endswith("broken.jpg"))
    assert broken["status"] == "error" and broken["error"].startswith("decode: not an image")
    # Hive layout: keys in the path only; the folder reads as one dataset with them as columns.
    parts = list_parts(out, version_a)
    # 3 shards committed, then merged into one file at the end of the run (compact, the default)
    assert len(parts) == 1 and all(f"/model_version={version_a}/date={DATE}/part-" in p for p in parts)
    fs, path = storage.filesystem(out)
    assert pq.read_schema(fs.open(parts[0])).names == PREDICTION_SCHEMA.names
    hive = ds.dataset(path, filesystem=fs, format="parquet", partitioning="hive").to_table()
    assert set(hive["model_version"].to_pylist()) == {version_a} and hive.num_rows == 8

    second = _run(source, ckpt_a, out)
    assert (second["scored"], second["skipped_unchanged"], second["shards"]) == (0, 8, 0)
    assert list_parts(out, version_a) == parts

    changed = uris[1]
    if backend == "s3":
        storage.write_bytes_atomic(changed, image_bytes(1234, 50, 30))  # new content, new ETag
    else:
        stat = os.stat(changed)
        os.utime(changed, (stat.st_atime, stat.st_mtime + 60))  # touched: same bytes, new mtime
    third = _run(source, ckpt_a, out)
    assert (third["scored"], third["skipped_unchanged"]) == (1, 7)
    history = _rows(out, version_a)
    assert len(history) == 9 and [r["uri"] for r in history].count(changed) == 2
    latest = _rows(out, version_a, latest=True)
    assert sorted(r["uri"] for r in latest) == sorted(uris)

    fourth = _run(source, ckpt_b, out)
    assert fourth["model_version"] == version_b != version_a
    assert (fourth["scored"], fourth["skipped_unchanged"]) == (8, 0)
    assert sorted(r["uri"] for r in _rows(out, version_b)) == sorted(uris)
    assert len(_rows(out, version_a)) == 9  # the old model's partition is untouched


def test_rerunning_a_committed_shard_writes_nothing_twice(checkpoints, tmp_path):
    (ckpt, version), _ = checkpoints
    write_images(tmp_path / "src", 3)
    objects = list_source(str(tmp_path / "src")).objects
    out = str(tmp_path / "out")
    config = ScoringConfig(batch_size=2, progress=False)
    first = score_shard(objects, shard_index=0, checkpoint=ckpt, out=out, date=DATE, config=config)
    again = score_shard(objects, shard_index=0, checkpoint=ckpt, out=out, date=DATE, config=config)
    assert not first.reused and again.reused and again.part_url == first.part_url
    assert len(_rows(out, version)) == 3 and len(list_parts(out, version)) == 1


def test_killed_run_then_rerun_scores_every_image_exactly_once(prefect_harness, checkpoints, tmp_path, capsys):
    from prefect.settings import PREFECT_API_URL

    (ckpt, version), _ = checkpoints
    n = 14
    write_images(tmp_path / "src", n)
    out = str(tmp_path / "out")
    cmd = [sys.executable, "-m", "flows.cli", "score", str(tmp_path / "src"), "--checkpoint", ckpt, "--out", out,
           "--shard-size", "1", "--batch-size", "1", "--date", DATE]
    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value()), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list_parts(out, version) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)  # mid-way: after the first commit, long before the last
    finally:
        proc.wait(timeout=30)
    done_before = len(list_parts(out, version))
    assert 1 <= done_before < n, proc.stderr.read().decode()[-2000:]
    # A write cut off mid-way leaves at most a hidden temporary file: it must never count as output.
    partition = Path(out) / f"model_version={version}" / f"date={DATE}"
    (partition / ".tmp-deadbeef-part-00099-0123456789abcdef.parquet").write_bytes(b"PAR1 half a file")

    from flows.cli import main

    assert main(cmd[3:]) == 0  # the same command, run to the end (in this process)
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("{\n"):])
    assert summary["listed"] == n and summary["non_image_skipped"] == 0
    assert summary["skipped_unchanged"] == done_before and summary["scored"] == n - done_before
    uris = [r["uri"] for r in _rows(out, version)]
    assert sorted(uris) == sorted(str(p) for p in (tmp_path / "src").iterdir())  # no gap, no duplicate
    assert len(uris) == len(set(uris)) == n


def test_local_dask_cluster_gives_the_same_rows(prefect_harness, checkpoints, tmp_path, monkeypatch):
    from prefect.settings import PREFECT_API_URL

    (ckpt, version), _ = checkpoints
    write_images(tmp_path / "src", 6)
    source = str(tmp_path / "src")
    monkeypatch.setenv("PREFECT_API_URL", str(PREFECT_API_URL.value()))  # for the Dask worker processes
    in_process = _run(source, ckpt, str(tmp_path / "a"), shard_size=2)
    on_dask = _run(source, ckpt, str(tmp_path / "b"), shard_size=2, use_local_dask=True, dask_workers=1)
    assert on_dask["scored"] == in_process["scored"] == 6 and on_dask["shards"] == 3
    rows_a, rows_b = _rows(str(tmp_path / "a"), version), _rows(str(tmp_path / "b"), version)
    assert [r["uri"] for r in rows_a] == [r["uri"] for r in rows_b]
    for a, b in zip(rows_a, rows_b, strict=True):
        assert a.pop("dist") == pytest.approx(b.pop("dist"), abs=1e-5)  # thread counts differ
        assert a.pop("score") == pytest.approx(b.pop("score"), abs=1e-5)
        assert a.pop("score_std") == pytest.approx(b.pop("score_std"), abs=1e-5)
        assert a == b


def test_nightly_deployment_is_declared():
    config = yaml.safe_load((REPO / "infra" / "prefect.yaml").read_text())
    (nightly,) = [d for d in config["deployments"] if d["entrypoint"] == "flows/score_bucket.py:score_bucket"]
    assert nightly["name"] == "nightly"
    assert nightly["schedules"][0]["cron"] == "0 2 * * *" and nightly["schedules"][0]["timezone"]
    assert nightly["schedules"][0]["active"] is False  # placeholders below: inactive until a user sets them
    assert nightly["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}
    params = ScoreBucketParams(**nightly["parameters"])
    assert params.source.startswith("s3://") and params.checkpoint.startswith("s3://")
    assert score_bucket.name == "score-bucket" and score_bucket.timeout_seconds


def test_params_validate():
    with pytest.raises(ValueError):
        ScoreBucketParams(source="a", checkpoint="b", out="c", date="2026-13-40")
    with pytest.raises(ValueError):
        ScoreBucketParams(source="a", checkpoint="b", out="c", method="vit")


def test_a_transient_fetch_error_is_retried_by_the_next_run(prefect_harness, checkpoints, tmp_path, monkeypatch):
    (ckpt, version), _ = checkpoints
    paths = write_images(tmp_path / "src", 4)
    (tmp_path / "src" / "broken.jpg").write_bytes(b"\xff\xd8 not a picture")  # a final error: never retried
    flaky, real_read = str(paths[1]), storage.read_bytes

    def read_bytes(url: str, **kwargs: bool) -> bytes:
        if url == flaky:
            raise ConnectionResetError("connection reset by peer")
        return real_read(url, **kwargs)

    monkeypatch.setattr(storage, "read_bytes", read_bytes)
    first = _run(str(tmp_path / "src"), ckpt, str(tmp_path / "out"))
    rows = {r["uri"]: r for r in _rows(str(tmp_path / "out"), version)}
    assert rows[flaky]["error"].startswith("fetch: I/O error: ConnectionResetError")
    assert first["errors"] == 2 and first["scored"] == 5
    monkeypatch.undo()  # the network is back

    second = _run(str(tmp_path / "src"), ckpt, str(tmp_path / "out"))
    assert (second["scored"], second["skipped_unchanged"]) == (1, 4)  # the flaky image only
    latest = {r["uri"]: r for r in _rows(str(tmp_path / "out"), version, latest=True)}
    assert latest[flaky]["status"] == "ok" and latest[str(tmp_path / "src" / "broken.jpg")]["status"] == "error"
    assert len(latest) == 5
    third = _run(str(tmp_path / "src"), ckpt, str(tmp_path / "out"))
    assert third["scored"] == 0  # nothing left to retry


@pytest.mark.slow
def test_dask_address_sends_shards_to_a_started_scheduler(prefect_harness, checkpoints, tmp_path, monkeypatch, capsys):
    from distributed import LocalCluster
    from prefect.settings import PREFECT_API_URL

    from flows.cli import main

    (ckpt, version), _ = checkpoints
    write_images(tmp_path / "src", 5)
    monkeypatch.setenv("PREFECT_API_URL", str(PREFECT_API_URL.value()))  # for the Dask worker processes
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        args = ["score", str(tmp_path / "src"), "--checkpoint", ckpt, "--out", str(tmp_path / "dask"),
                "--shard-size", "2", "--date", DATE, "--dask-address", cluster.scheduler_address]
        before = cluster.scheduler.transition_counter
        assert main(args) == 0
        assert cluster.scheduler.transition_counter > before  # the shards went through this scheduler
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.index("{\n"):])
    assert (summary["scored"], summary["shards"]) == (5, 3)
    in_process = _run(str(tmp_path / "src"), ckpt, str(tmp_path / "local"), shard_size=2)
    assert in_process["scored"] == 5
    on_dask, local = _rows(str(tmp_path / "dask"), version), _rows(str(tmp_path / "local"), version)
    assert [r["uri"] for r in on_dask] == [r["uri"] for r in local]
    for a, b in zip(on_dask, local, strict=True):
        assert a["score"] == pytest.approx(b["score"], abs=1e-5)


def test_an_empty_folder_is_one_warning_and_names_no_output_that_does_not_exist(checkpoints, tmp_path):
    """``mpemd score`` (the installed console script) over a folder holding one text file."""
    (ckpt, _), _ = checkpoints
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not a photo")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("PREFECT_API_URL", None)
    done = subprocess.run([str(Path(sys.executable).parent / "mpemd"), "score", str(tmp_path / "empty"),
                           "--checkpoint", ckpt, "--out", str(out), "--date", DATE],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 1, done.stderr
    assert warnings[0].endswith(f"no images under {tmp_path / 'empty'}; 1 other file skipped"), warnings
    summary = json.loads(done.stdout)
    assert summary["listed"] == 0 and summary["non_image_skipped"] == 1 and summary["output"] is None
    for value in summary.values():  # every path the summary names exists
        if isinstance(value, str) and value.startswith(str(tmp_path)):
            assert Path(value).exists(), value


def test_dask_workers_commit_nothing_once_the_run_lost_its_lock(prefect_harness, checkpoints, tmp_path, monkeypatch):
    """The lock is taken over from the flow run after it planned and before its shards run on the
    Dask workers (other processes, no heartbeat of their own): they must refuse to commit, not write
    parts beside the new holder's."""
    from prefect.settings import PREFECT_API_URL

    import flows.score_bucket as flow_module
    from tasks.scoring.output_lock import LockInfo, _create_exclusive, _encode, _remove, lock_url, read_lock

    (ckpt, _), _ = checkpoints
    write_images(tmp_path / "src", 4)
    out = str(tmp_path / "out")
    monkeypatch.setenv("PREFECT_API_URL", str(PREFECT_API_URL.value()))  # for the Dask worker processes
    real_score_shards = flow_module._score_shards

    def taken_over_first(*args, **kwargs):
        _remove(lock_url(out))  # what another run's takeover of a stalled holder does
        thief = LockInfo(url=lock_url(out), owner="thief", host="another-host", pid=1, started=time.time(),
                         heartbeat=time.time())
        assert _create_exclusive(lock_url(out), _encode(thief))
        return real_score_shards(*args, **kwargs)

    monkeypatch.setattr(flow_module, "_score_shards", taken_over_first)
    failure = None
    try:
        _run(str(tmp_path / "src"), ckpt, out, shard_size=2, use_local_dask=True, dask_workers=1, shard_retries=0)
    except Exception as exc:  # whatever wraps it on the way back from the worker
        failure = exc
    parts = list(Path(out).rglob("*.parquet"))
    assert parts == [], "a Dask worker committed after its run lost the lock"
    assert "taken over" in str(failure), failure
    assert read_lock(lock_url(out)).owner == "thief"  # the run that lost it removed nothing either
