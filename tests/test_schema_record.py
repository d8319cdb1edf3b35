"""The prediction writer records its schema once per model version, and a remote root's views trust
that record instead of reading every file's footer (issue 22: s3:// always took union_by_name)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.analysis import sql
from tasks.core import storage
from tasks.core.schemas import PREDICTION_SCHEMA
from tasks.scoring.layout import PREDICTION_SCHEMA_RECORD, SCHEMA_RECORD, part_url
from tasks.scoring.output_lock import output_lock
from tasks.scoring.predictions import rows_to_table, schema_record_text, write_part

REPO = Path(__file__).resolve().parents[1]
AT = pd.Timestamp("2024-05-01T10:00:00", tz="UTC")


def _rows(*uris: str, score: float = 1.0) -> pa.Table:
    return rows_to_table([{"uri": u, "image_id": ord(u) - ord("a") + 1, "model": "mpemd", "patch_mode": "grid", "n_patches": 8,
                           "score": score + i, "scored_at": AT, "status": "ok"} for i, u in enumerate(uris)])


def _write_manifest(root: str) -> None:
    from tasks.core.schemas import MANIFEST_SCHEMA

    table = pa.Table.from_pylist([{"image_id": i, "uri": f"img/{i}.jpg", "split": "test", "score_mean": 5.0,
                                   "aspect_ratio": 0.75, "width": 4, "height": 3} for i in (1, 2, 3)],
                                 schema=MANIFEST_SCHEMA)
    fs, path = storage.filesystem(storage.join(root, "manifests", "test.parquet"))
    with fs.open(path, "wb") as f:
        pq.write_table(table, f)


def test_write_part_records_the_schema_before_the_first_part_only(tmp_path):
    out = str(tmp_path / "predictions")
    with output_lock(out):
        write_part(_rows("a", "b"), part_url(out, "v1", "2024-05-01", 0, "00aa"))
        record = tmp_path / "predictions" / "model_version=v1" / SCHEMA_RECORD
        assert record.read_text() == schema_record_text(PREDICTION_SCHEMA)
        # a version whose folder already holds a part of an older writer (no record): left unrecorded
        older = tmp_path / "predictions" / "model_version=v2" / "date=2024-04-01" / "part-00000-00bb.parquet"
        older.parent.mkdir(parents=True)
        pq.write_table(_rows("c"), older)
        write_part(_rows("d"), part_url(out, "v2", "2024-05-01", 0, "00cc"))
    assert not (tmp_path / "predictions" / "model_version=v2" / SCHEMA_RECORD).exists()


def test_an_s3_root_skips_union_by_name_where_every_version_is_recorded(s3_bucket):
    root = f"{s3_bucket}/data"
    out = storage.join(root, "predictions")
    _write_manifest(root)
    with output_lock(out):
        write_part(_rows("a", "b"), part_url(out, "v1", "2024-05-01", 0, "00aa"))
        write_part(_rows("c", score=3.0), part_url(out, "v1", "2024-05-02", 1, "00ab"))

    def union_and_rows() -> tuple[bool, list]:
        con = sql.connect(root, threads=1)
        try:
            ((flag,),) = con.execute("SELECT getvariable('prediction_union')").fetchall()
            rows = con.execute("SELECT uri, score FROM prediction_set('v1', NULL, NULL, NULL) ORDER BY uri").fetchall()
        finally:
            con.close()
        return flag, rows

    assert union_and_rows() == (False, [("a", 1.0), ("b", 2.0), ("c", 3.0)])
    # a second version from a writer that kept no record: its files may differ, so union_by_name again
    fs, path = storage.filesystem(storage.join(out, "model_version=v0", "date=2024-04-01", "part-0.parquet"))
    with fs.open(path, "wb") as f:
        pq.write_table(_rows("z").drop_columns(["error"]), f)
    assert union_and_rows() == (True, [("a", 1.0), ("b", 2.0), ("c", 3.0)])


def test_a_local_root_trusts_the_record_too(tmp_path):
    """Locally the record also spares reading every footer (5,008 shard files: 0.6 CPU-s): a recorded
    version reads without union_by_name even when a file was changed behind the writer's back (proof
    that no footer was read; the same trust as on S3), and an unrecorded one has its footers checked."""
    root = str(tmp_path)
    out = storage.join(root, "predictions")
    (tmp_path / "manifests").mkdir()
    _write_manifest(root)
    with output_lock(out):
        write_part(_rows("a", "b"), part_url(out, "v1", "2024-05-01", 0, "00aa"))
    # a file of another schema (no error column) beside the writer's, in the recorded version
    other = tmp_path / "predictions" / "model_version=v1" / "date=2024-05-02" / "part-00001-00ab.parquet"
    other.parent.mkdir()
    pq.write_table(_rows("c").drop_columns(["error"]), other)

    def union() -> bool:
        con = sql.connect(root, threads=1)
        try:
            return con.execute("SELECT getvariable('prediction_union')").fetchone()[0]
        finally:
            con.close()

    assert union() is False
    (tmp_path / "predictions" / "model_version=v1" / SCHEMA_RECORD).unlink()
    assert union() is True  # no record: the footers, which differ


def test_the_readers_record_text_is_the_writers():
    """Readers compare a record with a constant (no pyarrow to load); it must stay the text the writer
    derives from PREDICTION_SCHEMA, or every recorded root would silently take union_by_name."""
    assert schema_record_text(PREDICTION_SCHEMA) == PREDICTION_SCHEMA_RECORD


def test_mpemd_sql_over_a_recorded_root_loads_no_pyarrow(tmp_path):
    """A root mpemd score wrote (a schema record in each version) is read without loading pyarrow:
    checking the record imported tasks.scoring.predictions, and pyarrow with it (~0.17 s a call)."""
    root = str(tmp_path)
    out = storage.join(root, "predictions")
    (tmp_path / "manifests").mkdir()
    _write_manifest(root)
    from tasks.core.schemas import REJECTED_SCHEMA  # ingest always writes one: else a stand-in is written

    pq.write_table(pa.Table.from_batches([], schema=REJECTED_SCHEMA), tmp_path / "manifests" / "rejected.parquet")
    with output_lock(out):
        write_part(_rows("a", "b", "c"), part_url(out, "v1", "2024-05-01", 0, "00aa"))
    probe = ("import json, sys\nfrom flows.launch import main\ncode = main(sys.argv[1:])\n"
             "print(json.dumps({'code': code, 'loaded': [m for m in ('pyarrow', 'numpy') if m in sys.modules]}),"
             " file=sys.stderr)")
    ran = subprocess.run([sys.executable, "-c", probe, "sql", "errors_by_aspect_bin", "--root", root,
                          "--param", "model_version=v1", "--format", "csv"], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert json.loads(ran.stderr.strip().splitlines()[-1]) == {"code": 0, "loaded": []}, ran.stderr
    assert "\nall,,,3," in ran.stdout, ran.stdout


def test_connect_over_s3_fetches_the_files_the_views_open_not_a_versions_batch(s3_bucket, monkeypatch):
    """With every version recorded, the views' binds at connect open one prediction file. With the groups
    registered before them, that open fetched a batch of the first model version, whether a query would
    read it or not (5,008 shard files over S3: 64 MB and 718 GETs in every connect); now a query's first
    open of a version fetches its batch."""
    from tasks.analysis import duckdb_storage

    root = f"{s3_bucket}/data"
    out = storage.join(root, "predictions")
    _write_manifest(root)
    with output_lock(out):
        for shard, uri in enumerate("abc"):
            write_part(_rows(uri), part_url(out, "v0", "2024-05-01", shard, f"00a{shard}"))
        write_part(_rows("a", "b"), part_url(out, "v1", "2024-05-01", 0, "00b0"))
        write_part(_rows("c", score=3.0), part_url(out, "v1", "2024-05-02", 1, "00b1"))
    fetched: list[str] = []
    plain = duckdb_storage.FileCache._fetch

    def counted(self, view, key):
        held = set(self.files)
        plain(self, view, key)
        fetched.append(sorted(set(self.files) - held))

    monkeypatch.setattr(duckdb_storage.FileCache, "_fetch", counted)
    con = sql.connect(root, threads=1)
    try:
        at_connect = [path for batch in fetched for path in batch if "/predictions/" in path]
        assert len(at_connect) <= 1, at_connect
        fetched.clear()
        rows = con.execute("SELECT uri, score FROM prediction_set('v1', NULL, NULL, NULL) ORDER BY uri").fetchall()
    finally:
        con.close()
    assert rows == [("a", 1.0), ("b", 2.0), ("c", 3.0)]
    assert [len(batch) for batch in fetched if any("model_version=v1/" in path for path in batch)] == [2]
