"""tasks/scoring/compaction.py: one file per date= partition, rows unchanged, exactly once across crashes.

Real components throughout: local folders and moto's S3 server, DuckDB for the SQL answer, the
scoring flow with a tiny checkpoint. Faults are injected at a named point of the compaction (the
commit, the deletes) and the state on storage is checked at that moment, then after the recovery.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from analysis_fixture import MPEMD_VERSION, NIMA_VERSION, write_root

from tasks.analysis import sql
from tasks.core import storage
from tasks.scoring import compaction
from tasks.scoring.compaction import compact_output, compact_partition, finish_interrupted
from tasks.scoring.layout import is_merged, is_part, partition_url, sources_of
from tasks.scoring.output_lock import OutputLocked, OutputLockLost, assert_held, output_lock
from tasks.scoring.predictions import PREDICTION_SCHEMA, list_parts, read_predictions
from tests.score_command import (
    ScoreProcess,
    child_env,
    data_files,
    markers,
    raw_rows,
    score_args,
    shard_parts,
)

REPO = Path(__file__).resolve().parents[1]
DATE = "2026-01-02"
QUESTIONS = [{"model_version": NIMA_VERSION, "model": "nima"},
             {"model_version": MPEMD_VERSION, "model": "mpemd", "patch_mode": "grid"}]


def _key(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()[:16]  # a shard key's shape: 16 hex


def _lean_rows(uris: list[str], scored_at: int = 0) -> pa.Table:
    """Rows as an older writer left them: only the columns every row needs, nima, ok."""
    n = len(uris)
    return pa.table({"uri": uris, "model": ["nima"] * n,
                     "scored_at": pa.array([scored_at] * n, pa.timestamp("us", tz="UTC")), "status": ["ok"] * n})


def _split_into_parts(out: str, n: int) -> dict[str, list[str]]:
    """Rewrite every partition's single fixture file as ``n`` shard-named parts (as scoring lays them out)."""
    fs, path = storage.filesystem(out)
    layout = {}
    for old in [p for p in fs.find(path) if p.endswith("/part-0.parquet")]:
        table = pq.read_table(old, filesystem=fs)
        folder = storage.unstrip(fs, old.rsplit("/", 1)[0])
        step = -(-table.num_rows // n)
        layout[folder] = []
        for i in range(n):
            url = storage.join(folder, f"part-{i:05d}-{_key(i)}.parquet")
            storage.write_parquet_atomic(table.slice(i * step, step), url)
            layout[folder].append(url)
        fs.rm_file(old)
    return layout


def _all_rows(out: str) -> dict[str, list]:
    """Every row of every version, every column, in a canonical order."""
    return {v: sorted(read_predictions(out, v, latest=False).to_pylist(), key=repr)
            for v in (NIMA_VERSION, MPEMD_VERSION)}


def _answers(root: str) -> list[list[dict]]:
    con = sql.connect(root, threads=1)
    try:
        return [sql.run_query(con, "errors_by_aspect_bin", q).to_pylist() for q in QUESTIONS]
    finally:
        con.close()


def _raw_count(root: str) -> int:
    con = sql.connect(root, threads=1)
    try:
        return con.execute("SELECT count(*) FROM predictions").fetchone()[0]
    finally:
        con.close()


def _files(partition: str) -> list[str]:
    fs, path = storage.filesystem(partition)
    fs.invalidate_cache(path)
    return sorted(p.rsplit("/", 1)[-1] for p in fs.find(path))


@pytest.fixture
def split_root(tmp_path) -> tuple[str, str, dict[str, list[str]]]:
    root = str(tmp_path / "root")
    write_root(root)
    out = storage.join(root, "predictions")
    return root, out, _split_into_parts(out, 4)


# --- rows and answers -----------------------------------------------------------------------------


def test_compaction_keeps_every_row_and_the_sql_answer(split_root):
    root, out, layout = split_root
    rows, answers = _all_rows(out), _answers(root)
    assert all(len(list_parts(out, v)) == 4 * (2 if v == NIMA_VERSION else 1) for v in rows)

    summary = compact_output(out)
    assert (summary["partitions"], summary["partitions_compacted"]) == (3, 3)
    assert (summary["files_before"], summary["files_after"]) == (12, 3)
    assert summary["rows"] == sum(len(r) for r in rows.values())
    assert _all_rows(out) == rows  # every column of every row, nothing twice, nothing lost
    assert _answers(root) == answers
    for folder, sources in layout.items():
        (name,) = _files(folder)
        assert is_part(name) and is_merged(name) and not any(is_merged(s) for s in sources)
        merged = storage.join(folder, name)
        fs, path = storage.filesystem(merged)
        assert sources_of(fs, path) == sorted(s.rsplit("/", 1)[-1] for s in sources)
        assert pq.read_schema(path).remove_metadata() == PREDICTION_SCHEMA
        assert pq.read_metadata(path).row_group(0).column(0).compression == "ZSTD"

    again = compact_output(out)  # one file each: listed, nothing rewritten
    assert (again["partitions_compacted"], again["files_before"], again["rows"]) == (0, 3, 0)


@pytest.mark.s3
def test_compaction_on_s3(s3_bucket):
    write_root(s3_bucket)
    out = storage.join(s3_bucket, "predictions")
    layout = _split_into_parts(out, 3)
    rows = _all_rows(out)
    summary = compact_output(out, NIMA_VERSION)  # one model version only
    assert (summary["partitions"], summary["files_before"], summary["files_after"]) == (2, 6, 2)
    assert _all_rows(out) == rows
    assert len(list_parts(out, NIMA_VERSION)) == 2 and len(list_parts(out, MPEMD_VERSION)) == 3
    assert all(len(_files(f)) == (1 if NIMA_VERSION in f else 3) for f in layout)


@pytest.mark.s3
def test_compaction_on_s3_reads_each_source_without_a_lookup_and_deletes_them_in_batches(
        s3_bucket, s3_requests, monkeypatch):
    """A source is opened with its listed size: no HEAD a source (the marker's write dropped s3fs's
    listing cache, so each open asked one). The sources go ``DELETE_BATCH`` to a request."""
    monkeypatch.setattr(compaction, "DELETE_BATCH", 10)
    out = storage.join(s3_bucket, "predictions")
    folder = partition_url(out, "v1", DATE)
    table = _lean_rows(["u0", "u1"])
    for i in range(25):
        storage.write_parquet_atomic(table, storage.join(folder, f"part-{i:05d}-{_key(i)}.parquet"))
    s3_requests.clear()
    summary = compact_output(out)
    assert (summary["files_before"], summary["files_after"], summary["rows"]) == (25, 1, 50)
    assert s3_requests.count("get_object") == 25 + 1  # each source once, and the merged file's footer
    assert s3_requests.count("head_object") <= 3, s3_requests  # the lock's and the merged file's, not one a source
    assert s3_requests.count("delete_objects") == 3 and s3_requests.count("delete_object") <= 2  # marker, lock


@pytest.mark.s3
def test_sources_a_bulk_delete_left_behind_are_deleted_one_by_one(s3_bucket, monkeypatch):
    """s3fs's DeleteObjects ignores the errors of its quiet reply: a source it left must not stay beside
    the merged file once the marker is gone (its rows would count twice, with nothing to finish)."""
    write_root(s3_bucket)
    out = storage.join(s3_bucket, "predictions")
    layout = _split_into_parts(out, 3)
    rows = _all_rows(out)
    real = compaction._delete
    batches: list[list[str]] = []

    def delete_first_only(fs, path):  # a bulk delete that silently failed on all but its first key
        if isinstance(path, list):
            batches.append(path)
            path = path[:1]
        real(fs, path)

    monkeypatch.setattr(compaction, "_delete", delete_first_only)
    compact_output(out, MPEMD_VERSION)
    assert [len(b) for b in batches] == [3]
    folder = next(f for f in layout if MPEMD_VERSION in f)
    assert sum(map(is_merged, _files(folder))) == 1 and len(_files(folder)) == 1  # no source, no marker
    assert _all_rows(out) == rows


def test_row_groups_are_large_and_rows_cross_source_boundaries(tmp_path, monkeypatch):
    monkeypatch.setattr(compaction, "ROW_GROUP_ROWS", 5)
    folder = partition_url(str(tmp_path), "v1", DATE)
    table = _lean_rows([f"u{i}" for i in range(12)])
    for i, (start, length) in enumerate([(0, 3), (3, 4), (7, 5)]):  # an older writer: columns missing
        storage.write_parquet_atomic(table.slice(start, length), storage.join(folder, f"part-{i:05d}-{_key(i)}.parquet"))
    done = compact_partition(folder)
    meta = pq.read_metadata(done.merged)
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [5, 5, 2]
    got = read_predictions(str(tmp_path), "v1", latest=False)
    assert sorted(got["uri"].to_pylist()) == sorted(table["uri"].to_pylist()) and got["score"].null_count == 12


def test_many_small_sources_are_held_as_few_tables_while_a_row_group_fills(tmp_path, monkeypatch):
    """Below a row group's rows, the sources' tables are combined COMBINE_TABLES at a time (a small
    table held ~19 KB besides its rows); the merged rows and row groups are the same."""
    import weakref

    monkeypatch.setattr(compaction, "COMBINE_TABLES", 8)
    monkeypatch.setattr(compaction, "ROW_GROUP_ROWS", 70)
    folder = partition_url(str(tmp_path), "v1", DATE)
    for i in range(50):
        storage.write_parquet_atomic(_lean_rows([f"u{i}-a", f"u{i}-b"], scored_at=i), storage.join(folder, f"part-{i:05d}-{_key(i)}.parquet"))
    read_tables: list[weakref.ref] = []
    held: list[int] = []
    real = compaction._source_batches

    def source_batches(fs, sources):
        for table in real(fs, sources):
            held.append(sum(ref() is not None for ref in read_tables))  # source tables still alive
            read_tables.append(weakref.ref(table))
            yield table

    monkeypatch.setattr(compaction, "_source_batches", source_batches)
    done = compact_partition(folder)
    meta = pq.read_metadata(done.merged)
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [70, 30]
    assert read_predictions(str(tmp_path), "v1", latest=False)["uri"].to_pylist() == [
        f"u{i}-{c}" for i in range(50) for c in "ab"]
    assert len(held) == 50 and max(held) <= 8, held  # without the combine: up to 34 (a row group's)


def test_readers_see_parts_of_an_older_writer_as_the_schema_with_nulls(tmp_path):
    """read_predictions / read_state read part by part (no pyarrow.dataset): a missing column is nulls,
    an unknown one is dropped, types are the schema's, part order is kept: what pyarrow.dataset gave."""
    import pyarrow.dataset as ds

    from tasks.scoring.predictions import ScoringSettings, read_state, state_key

    folder = partition_url(str(tmp_path), "v1", DATE)
    at = pa.array([1, 2], pa.timestamp("us", tz="UTC"))
    old = pa.table({"uri": ["a", "b"], "model": ["nima"] * 2, "patch_mode": ["warp"] * 2,
                    "n_patches": pa.array([1, 1], pa.int64()), "scored_at": at, "status": ["ok", "error"],
                    "error": [None, "fetch: I/O error: timeout"], "extra": [1, 2]})
    new = pa.Table.from_pylist([{"uri": "c", "model": "nima", "patch_mode": "warp", "n_patches": 1, "score": 5.5,
                                 "scored_at": 3, "status": "ok", "source_size": 7}], schema=PREDICTION_SCHEMA)
    paths = [storage.join(folder, f"part-{i:05d}-{_key(i)}.parquet") for i in range(2)]
    for table, path in zip([old, new], paths, strict=True):
        storage.write_parquet_atomic(table, path)
    got = read_predictions(str(tmp_path), "v1", latest=False)
    expected = ds.dataset(paths, schema=PREDICTION_SCHEMA, format="parquet").to_table()
    assert got.schema == PREDICTION_SCHEMA and got.equals(expected)
    assert got["score"].to_pylist() == [None, None, 5.5]
    state = read_state(str(tmp_path), "v1", ScoringSettings("nima", "warp", 1))
    assert state == {state_key("a", "size:None|mtime:None"), state_key("c", "size:7|mtime:None")}  # b: retried


# --- a partition with one file; the name of the merged file ----------------------------------------


def test_a_one_file_partition_is_listed_never_read_or_rewritten(tmp_path, monkeypatch):
    folder = partition_url(str(tmp_path), "v1", DATE)
    part = Path(storage.join(folder, f"part-00000-{_key(0)}.parquet"))
    storage.write_parquet_atomic(PREDICTION_SCHEMA.empty_table(), str(part))
    before = part.stat()

    def no_reading(*args, **kwargs):
        raise AssertionError("a no-op compaction read a file")

    monkeypatch.setattr(compaction, "_source_batches", no_reading)
    monkeypatch.setattr(compaction, "sources_of", no_reading)
    done = compact_partition(folder)
    assert (done.files_before, done.files_after, done.rows, done.merged) == (1, 1, 0, None)
    after = part.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert _files(folder) == [part.name]


def test_a_source_name_that_comes_back_after_the_compaction_is_a_new_part(tmp_path):
    """A shard planned again the same day with the same images (a transient fetch error retried) gets the
    name of a part that was merged and deleted: it holds new rows and must neither be hidden nor deleted."""
    out = str(tmp_path)
    folder = partition_url(out, "v1", DATE)
    rows = [{"uri": f"u{i}", "model": "nima", "scored_at": 0, "status": "ok"} for i in range(4)]
    names = [f"part-{i:05d}-{_key(i)}.parquet" for i in range(2)]
    for name, chunk in zip(names, (rows[:2], rows[2:]), strict=True):
        storage.write_parquet_atomic(pa.Table.from_pylist(chunk, PREDICTION_SCHEMA), storage.join(folder, name))
    compact_partition(folder)
    again = [{**rows[0], "status": "error", "error": "fetch: I/O error"}]
    storage.write_parquet_atomic(pa.Table.from_pylist(again, PREDICTION_SCHEMA), storage.join(folder, names[0]))
    assert len(list_parts(out, "v1")) == 2 and len(finish_interrupted(out, "v1")) == 2
    done = compact_partition(folder)
    assert (done.files_before, done.rows) == (2, 5) and read_predictions(out, "v1", latest=False).num_rows == 5


# --- faults -----------------------------------------------------------------------------------------


def test_a_fault_before_the_commit_leaves_the_sources_untouched(split_root, monkeypatch):
    _, out, layout = split_root
    folder = next(iter(layout))
    before = {p: os.stat(p).st_mtime_ns for p in layout[folder]}

    def broken_commit(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(compaction, "_commit", broken_commit)
    with pytest.raises(OSError, match="disk full"), output_lock(out):
        compact_partition(folder)
    assert {p: os.stat(p).st_mtime_ns for p in layout[folder]} == before
    assert _files(folder) == sorted(p.rsplit("/", 1)[-1] for p in layout[folder])  # no merged file, no debris


def test_a_run_killed_while_writing_the_merged_file_is_recovered_by_the_next_run(tmp_path):
    """A real SIGKILL of ``mpemd score`` inside its compaction, while the merged temporary file is being
    written (``MPEMD_KILL_AT``: the process kills itself at that point), then the same command again."""
    from tests.scoring_fixtures import make_checkpoint, write_images

    n = 6
    write_images(tmp_path / "src", n)
    checkpoint = str(tmp_path / "model.pt")
    version = make_checkpoint(checkpoint)
    out = str(tmp_path / "out")
    partition = partition_url(out, version, DATE)
    args = score_args(str(tmp_path / "src"), checkpoint, out, DATE)
    killed = ScoreProcess(args, child_env(MPEMD_KILL_AT=compaction.KILL_AT_WRITING_MERGED), partition,
                          tmp_path / "killed").wait()
    assert killed.returncode() == -signal.SIGKILL, killed.stderr()[-3000:]
    # Where it died: every shard part committed and untouched, the marker written, the merged rows
    # in a temporary file only (no merged file).
    folder = Path(storage.filesystem(partition)[1])
    assert len(shard_parts(partition)) == n == len(data_files(partition)) and len(markers(partition)) == 1
    assert [p.name for p in folder.iterdir() if p.name.startswith(".tmp-")], "no temporary merged file"
    scored = raw_rows(partition)
    assert len({r["uri"] for r in scored}) == len(scored) == n

    rerun = ScoreProcess(args, child_env(), partition, tmp_path / "rerun").wait()
    assert rerun.returncode() == 0, rerun.stderr()[-3000:]
    summary = rerun.summary()
    assert summary["scored"] == 0 and summary["skipped_unchanged"] == n and summary["compacted_files"] == n, summary
    assert markers(partition) == [] and shard_parts(partition) == [] and len(data_files(partition)) == 1
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []  # the dead scratch file too
    assert raw_rows(partition) == scored  # every row, every value, once


def test_a_lost_lock_stops_the_compaction_before_it_writes(split_root, monkeypatch):
    """The output as a user types it (a relative path): a lock taken over by another run is seen."""
    _, out, layout = split_root
    monkeypatch.chdir(Path(out).parent)
    before = {p: os.stat(p).st_mtime_ns for files in layout.values() for p in files}
    folder = os.path.relpath(next(iter(layout)), Path(out).parent)
    with output_lock("predictions", ttl_s=0.2):
        lock = Path("predictions") / "_scoring.lock"
        lock.write_text(json.dumps({**json.loads(lock.read_text()), "owner": "another run"}))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # until this run's heartbeat has seen the other owner
            try:
                assert_held("predictions")
            except OutputLockLost:
                break
            time.sleep(0.02)
        with pytest.raises(OutputLockLost):
            compact_partition(folder)
    assert {p: os.stat(p).st_mtime_ns for files in layout.values() for p in files} == before
    assert all(len(_files(f)) == 4 for f in layout)  # no merged file, no marker


def _fail_on_second_delete(monkeypatch) -> list[str]:
    deleted: list[str] = []
    real = compaction._delete

    def delete(fs, path):
        if len(deleted) == 1:
            raise ConnectionError("lost the connection while deleting sources")
        real(fs, path)
        deleted.append(path)

    monkeypatch.setattr(compaction, "_delete", delete)
    return deleted


def test_a_fault_between_the_commit_and_the_deletes_is_finished_by_the_next_compaction(split_root, monkeypatch):
    root, out, layout = split_root
    rows, answers = _all_rows(out), _answers(root)
    folder = next(f for f in layout if NIMA_VERSION in f)
    deleted = _fail_on_second_delete(monkeypatch)
    with pytest.raises(ConnectionError), output_lock(out):
        compact_partition(folder)
    monkeypatch.undo()

    # The fault landed after the commit: the merged file AND three of its four sources are there.
    files = _files(folder)
    merged = [f for f in files if is_merged(f)]
    left = [f for f in files if is_part(f) and not is_merged(f)]
    assert len(merged) == 1 and len(deleted) == 1 and len(left) == 3
    assert any(f.startswith("_compacting-") for f in files)
    # Readers through list_parts see each row once meanwhile; the SQL answer is the same, and so are
    # raw counts over the predictions view (the three sources left are not listed).
    assert len(list_parts(out, NIMA_VERSION)) == 1 + 4  # the merged file + the other partition's parts
    assert _all_rows(out) == rows and _answers(root) == answers
    assert _raw_count(root) == sum(len(r) for r in rows.values())

    summary = compact_output(out)
    assert summary["finished_interrupted"] == 3
    assert _files(folder) == merged and _all_rows(out) == rows


@pytest.mark.s3
def test_a_fault_between_the_deletes_on_s3_is_finished_by_the_next_compaction(s3_bucket, monkeypatch):
    write_root(s3_bucket)
    out = storage.join(s3_bucket, "predictions")
    layout = _split_into_parts(out, 3)
    rows = _all_rows(out)
    folder = next(f for f in layout if MPEMD_VERSION in f)
    monkeypatch.setattr(compaction, "DELETE_BATCH", 2)  # 3 sources: a batch of 2 deleted, the next fails
    _fail_on_second_delete(monkeypatch)
    with pytest.raises(ConnectionError), output_lock(out):
        compact_partition(folder)
    monkeypatch.undo()
    files = _files(folder)
    assert sum(map(is_merged, files)) == 1 and len(files) == 1 + 1 + 1  # merged, 1 source, the marker
    assert len(list_parts(out, MPEMD_VERSION)) == 1 and _all_rows(out) == rows
    assert compact_output(out, MPEMD_VERSION)["finished_interrupted"] == 1
    assert _files(folder) == [f for f in files if is_merged(f)] and _all_rows(out) == rows


KILL_SCRIPT = """
import os, signal, sys
from tasks.scoring import compaction
real = compaction._delete
calls = []
def delete(fs, path):
    if calls:
        os.kill(os.getpid(), signal.SIGKILL)  # dies between two deletes, lock still on storage
    real(fs, path)
    calls.append(path)
compaction._delete = delete
compaction.compact_output(sys.argv[1])
"""


def test_a_run_killed_during_the_deletes_is_finished_by_the_next_scoring_plan(prefect_harness, tmp_path, scored):
    out, source, ckpt, version = scored(compact=False)
    folder = partition_url(out, version, DATE)
    rows = sorted(read_predictions(out, version, latest=False).to_pylist(), key=repr)
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, out], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == -9, proc.stderr
    files = _files(folder)
    assert sum(map(is_merged, files)) == 1 and sum(not is_merged(f) and f.startswith("part-") for f in files) == 2
    assert "_scoring.lock" in os.listdir(out)  # the dead run's lock: taken over, not waited out

    again = _score(source, ckpt, out)
    assert (again["scored"], again["skipped_unchanged"], again["compacted_files"]) == (0, 7, 0)
    assert [f for f in _files(folder) if not f.startswith(".")] == [f for f in files if is_merged(f)]
    assert sorted(read_predictions(out, version, latest=False).to_pylist(), key=repr) == rows


# --- scoring ----------------------------------------------------------------------------------------


def _score(source: str, checkpoint: str, out: str, **kw) -> dict:
    from flows.score_bucket import ScoreBucketParams, score_bucket

    params = ScoreBucketParams(source=source, checkpoint=checkpoint, out=out,
                               **{"date": DATE, "batch_size": 4, "shard_size": 3, **kw})
    return score_bucket(**params.model_dump())


@pytest.fixture
def scored(tmp_path):
    from tests.scoring_fixtures import make_checkpoint, write_images

    def run(**kw) -> tuple[str, str, str, str]:
        ckpt = tmp_path / "a.pt"
        version = make_checkpoint(ckpt)
        write_images(tmp_path / "src", 7)
        out = str(tmp_path / "out")
        first = _score(str(tmp_path / "src"), str(ckpt), out, **kw)
        assert first["scored"] == 7 and first["shards"] == 3
        # the summary names the files that hold the run's rows now: the merged one, or the 3 parts
        assert all(Path(p).exists() for p in first["parts"])
        assert len(first["parts"]) == (3 if kw.get("compact") is False else 1)
        return out, str(tmp_path / "src"), str(ckpt), version

    return run


def test_scoring_compacts_its_partition_and_a_rerun_scores_nothing(prefect_harness, tmp_path, scored, monkeypatch):
    from tests.scoring_fixtures import write_images

    out, source, ckpt, version = scored()
    folder = partition_url(out, version, DATE)
    (merged,) = _files(folder)
    assert is_merged(merged)
    stat = os.stat(storage.join(folder, merged))
    rows = read_predictions(out, version, latest=False)
    assert rows.num_rows == 7 and len(set(rows["uri"].to_pylist())) == 7

    def no_reading(*args, **kwargs):
        raise AssertionError("the no-op run's compaction read a file")

    with monkeypatch.context() as patch:
        patch.setattr(compaction, "_source_batches", no_reading)
        patch.setattr(compaction, "sources_of", no_reading)
        again = _score(source, ckpt, out)  # nightly no-op: nothing scored, nothing read or rewritten
    assert (again["scored"], again["skipped_unchanged"], again["compacted_files"], again["compacted_rows"]) == (
        0, 7, 0, 0)
    after = os.stat(storage.join(folder, merged))
    assert _files(folder) == [merged] and (after.st_ino, after.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)

    write_images(Path(source), 2, seed=5, start_id=100)  # two new images: one new part, merged in
    third = _score(source, ckpt, out)
    assert (third["scored"], third["compacted_files"], third["compacted_rows"]) == (2, 2, 9)
    (merged_again,) = _files(folder)
    assert merged_again != merged and read_predictions(out, version, latest=False).num_rows == 9


def test_scoring_with_no_compact_keeps_one_part_per_shard(prefect_harness, scored):
    out, _, _, version = scored(compact=False)
    assert len(list_parts(out, version)) == 3 and not any(is_merged(p) for p in list_parts(out, version))


def test_a_later_run_merges_the_shards_an_earlier_run_left(prefect_harness, scored, monkeypatch):
    """Shards left by a run that never compacted (killed before the end, or --no-compact) are merged by
    the next run, even a no-op on another day; after that, a no-op reads nothing again."""
    out, source, ckpt, version = scored(compact=False)
    assert len(_files(partition_url(out, version, DATE))) == 3
    later = _score(source, ckpt, out, date="2026-12-01")  # nothing new to score, another date= partition
    assert (later["scored"], later["compacted_files"], later["compacted_rows"]) == (0, 3, 7)
    (merged,) = _files(partition_url(out, version, DATE))
    assert is_merged(merged) and read_predictions(out, version, latest=False).num_rows == 7

    def no_reading(*args, **kwargs):
        raise AssertionError("a no-op run over a tidy output read a file")

    monkeypatch.setattr(compaction, "_source_batches", no_reading)
    tidy = _score(source, ckpt, out, date="2026-12-02")
    assert (tidy["scored"], tidy["compacted_files"]) == (0, 0)


# --- the command ------------------------------------------------------------------------------------


def test_mpemd_compact_prints_a_summary_and_refuses_a_held_output(split_root, capsys):
    from flows.cli import main

    _, out, _ = split_root
    with output_lock(out), pytest.raises(OutputLocked, match="being written by another run"):
        main(["compact", "--out", out])
    assert len(list_parts(out, NIMA_VERSION)) == 8  # refused: nothing touched

    held = threading.Event()

    def other_run() -> None:
        with output_lock(out):
            held.set()
            time.sleep(0.5)

    thread = threading.Thread(target=other_run)
    thread.start()
    assert held.wait(30)
    assert main(["compact", "--out", out, "--model-version", NIMA_VERSION, "--lock-wait-s", "30"]) == 0
    thread.join()
    summary = json.loads(capsys.readouterr().out)
    assert (summary["partitions"], summary["files_before"], summary["files_after"]) == (2, 8, 2)
    assert len(list_parts(out, MPEMD_VERSION)) == 4


def test_mpemd_compact_on_a_mistyped_root_is_one_line_and_creates_nothing(tmp_path, capsys):
    from flows.cli import main

    missing = tmp_path / "typo" / "predictions"
    assert main(["compact", "--out", str(missing)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"mpemd: error: predictions root {missing} does not exist"), err
    assert not (tmp_path / "typo").exists()  # the lock file did not create it


def test_compact_help_imports_neither_torch_nor_prefect():
    probe = ("import sys\nfrom flows.cli import main\ntry:\n    main(['compact', '--help'])\n"
             "except SystemExit:\n    pass\nprint([m for m in ('torch', 'prefect') if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1] == "[]", proc.stderr
