"""The benchmarks' S3 mode (issue 22): a moto server in its own process that counts requests by kind,
bench_scale's S3 stages end to end, and bench_sql's comparison over an ``s3://`` root."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from benchmarks import bench_scale, bench_sql
from benchmarks.s3_moto import MotoServer, request_kind


@pytest.fixture
def moto_env(monkeypatch):
    """A benchmark moto server, its endpoint in this process's environment (children inherit it)."""
    with MotoServer() as server:
        for key, value in server.env.items():
            monkeypatch.setenv(key, value)
        yield server


def test_request_kinds():
    assert request_kind("GET", "list-type=2&prefix=in%2F") == "list"
    assert request_kind("GET", "") == "get"
    assert [request_kind(m, "") for m in ("HEAD", "PUT", "DELETE", "POST")] == ["head", "put", "delete", "post"]


def test_filled_bucket_lists_in_pages_of_a_thousand_and_each_request_is_counted(moto_env):
    import s3fs

    moto_env.fill("filled", "in/{d:05d}/{i1}.jpg", 2_500, b"jpeg")
    fs = s3fs.S3FileSystem(endpoint_url=moto_env.endpoint, skip_instance_cache=True)
    moto_env.requests(reset=True)
    listed = fs.find("filled/in")
    assert len(listed) == 2_500 and listed[0] == "filled/in/00000/1.jpg"
    assert moto_env.requests(reset=True) == {"list": 3}  # 1,000 keys a page
    assert fs.cat_file("filled/in/00002/2500.jpg") == b"jpeg"
    assert moto_env.requests() == {"get": 1}
    moto_env.reset()
    assert not s3fs.S3FileSystem(endpoint_url=moto_env.endpoint, skip_instance_cache=True).ls("")


def test_bench_scale_ingest_over_s3_reads_every_image_once_and_its_rerun_none(tmp_path):
    n = 100
    assert bench_scale.main(["--stages", "ingest-s3", "--sizes", str(n), "--workdir", str(tmp_path / "work"),
                             "--docs", str(tmp_path / "docs")]) == 0
    series = json.loads((tmp_path / "docs" / "results.json").read_text())["ingest-s3"]["series"]
    (first,), (rerun,) = series["s3 first run"], series["s3 rerun"]
    assert first["items"] == rerun["items"] == n
    assert n <= first["requests_by_kind"]["get"] < n + 20  # each image read once, plus the run's own files
    assert rerun["requests_by_kind"]["get"] < 20 and rerun["requests_by_kind"]["list"] >= 1  # listed, not read
    assert first["requests"] == sum(first["requests_by_kind"].values())
    assert not (tmp_path / "work" / f"ingest-s3-{n}").exists()  # inputs deleted after the point


def test_bench_scale_compaction_and_state_read_over_s3_cost_one_get_a_part_and_no_head(tmp_path):
    n = 30
    assert bench_scale.main(["--stages", "compact-s3", "state-s3", "--sizes", str(n), "--workdir",
                             str(tmp_path / "work"), "--docs", str(tmp_path / "docs")]) == 0
    results = json.loads((tmp_path / "docs" / "results.json").read_text())
    (compact,) = results["compact-s3"]["series"]["s3 compact"]
    (state,) = results["state-s3"]["series"]["s3 state read"]
    kinds = compact["requests_by_kind"]
    assert kinds["get"] == n + 1 and kinds["head"] <= 3 and kinds["post"] == 1, kinds  # a GET a source, one bulk delete
    assert state["requests_by_kind"].get("get") == n and state["requests_by_kind"].get("head", 0) <= 1, state


def test_bench_sql_answers_over_s3_equal_the_local_ones_and_read_the_bucket(tmp_path, moto_env):
    workdir = tmp_path / "rows"
    bench_sql.generate(workdir, 20_000, history=0.2)
    root = bench_sql.upload(workdir, moto_env, "s3://bench-sql/data")
    exact = bench_sql.run_pandas(workdir)["rows"]
    moto_env.requests(reset=True)
    for rows in (bench_sql.run_duckdb(root, threads=1)["rows"], bench_sql.run_pandas(root)["rows"]):
        for column in bench_sql.COLUMNS[1:]:
            np.testing.assert_allclose(rows[column].astype(float), exact[column].astype(float), rtol=1e-9,
                                       atol=1e-9, equal_nan=True, err_msg=column)
    kinds = moto_env.requests()
    assert kinds["get"] >= 2 * 3 and kinds["list"] >= 2, kinds  # both read the bucket's parts, not the folder
    assert os.environ["AWS_ENDPOINT_URL"] == moto_env.endpoint


def test_the_scored_shards_layout_goes_to_s3_with_its_schema_record(tmp_path, moto_env):
    """``bench_sql --part-rows N --full-schema --s3`` measures what mpemd score leaves on S3: the upload
    carries the version's schema record, so the reader skips union_by_name there too (without it,
    every bind opened all 5,008 files)."""
    from tasks.analysis import sql

    workdir = tmp_path / "rows"
    bench_sql.generate(workdir, 5_000)
    root = bench_sql.upload(bench_sql.split_parts(workdir, 1_000, full_schema=True), moto_env, "s3://bench-sql/data")
    con = sql.connect(root, threads=1)
    try:
        assert con.execute("SELECT getvariable('prediction_union')").fetchall() == [(False,)]
    finally:
        con.close()


def test_mpemd_sql_over_s3_lists_the_manifests_once_and_asks_no_head_per_open(tmp_path, moto_env):
    from tasks.analysis import sql

    workdir = tmp_path / "rows"
    bench_sql.generate(workdir, 5_000)
    root = bench_sql.upload(workdir, moto_env, "s3://bench-sql/data")
    moto_env.requests(reset=True)
    files = sql.data_files(root)
    assert files["manifests"] == [f"{root}/manifests/test.parquet"]
    assert files["rejected"] == [f"{root}/manifests/rejected.parquet"]
    con = sql.connect(root, threads=1)
    assert len(sql.run_query(con, "errors_by_aspect_bin", {"model_version": bench_sql.VERSION})) > 1
    kinds = moto_env.requests()
    # the root's own check may HEAD once; the manifests' opens read the listing, not a HEAD each
    assert kinds.get("head", 0) <= 1, kinds
    # each file is fetched once, whole, although prediction_set scans the predictions twice
    assert kinds.get("get", 0) <= len(files["manifests"] + files["rejected"] + files["predictions"]), kinds


def test_mpemd_sql_over_s3_fetches_a_versions_files_together_each_once_with_the_local_answer(
        tmp_path, moto_env, monkeypatch):
    """A query's files come in batches of concurrent GETs (one per file), not one GET after another."""
    import asyncio

    import s3fs

    from tasks.analysis import sql

    workdir = bench_sql.split_parts(_generated(tmp_path / "rows", 5_000), 1_000)  # ~10 prediction files
    root = bench_sql.upload(workdir, moto_env, "s3://bench-sql/data")
    in_flight, most = 0, 0
    plain = s3fs.S3FileSystem._cat_file

    async def counted(self, path, *args, **kwargs):
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            await asyncio.sleep(0)  # the batch's other GETs start before this one's reply is read
            return await plain(self, path, *args, **kwargs)
        finally:
            in_flight -= 1

    monkeypatch.setattr(s3fs.S3FileSystem, "_cat_file", counted)
    files = sql.data_files(root)
    n_files = len(files["manifests"] + files["rejected"] + files["predictions"])
    moto_env.requests(reset=True)
    got = bench_sql.run_duckdb(root, threads=2)["rows"]
    assert moto_env.requests().get("get") == n_files  # each file once, whole
    assert most == len(files["predictions"]) > 5  # the version's files in one batch
    want = bench_sql.run_duckdb(workdir, threads=2)["rows"]
    for column in bench_sql.COLUMNS[1:]:
        np.testing.assert_allclose(got[column].astype(float), want[column].astype(float), rtol=1e-9, atol=1e-9,
                                   equal_nan=True, err_msg=column)


def _generated(workdir, rows: int):
    bench_sql.generate(workdir, rows)
    return workdir


def test_listing_a_roots_predictions_is_one_request_per_thousand_keys_not_one_per_folder(tmp_path, moto_env):
    """data_files lists the manifests folder and the predictions (two versions, three date folders)
    with one listing each; a glob of the Hive levels asked one per version and per date folder."""
    import s3fs

    from tasks.analysis import sql

    workdir = _generated(tmp_path / "rows", 2_000)
    other = workdir / "predictions" / "model_version=other" / "date=2024-02-01"
    other.mkdir(parents=True)
    (other / "part-0.parquet").write_bytes(
        (workdir / "predictions" / "model_version=bench" / "date=2024-01-01" / "part-0000.parquet").read_bytes())
    (other / ".tmp-part-1.parquet").write_bytes(b"a writer's temporary")
    root = bench_sql.upload(workdir, moto_env, "s3://bench-sql/data")
    s3fs.S3FileSystem.clear_instance_cache()  # no listing cached from the upload
    moto_env.requests(reset=True)
    files = sql.data_files(root)
    assert moto_env.requests() == {"list": 2}
    local = sql.data_files(str(workdir))
    assert [p.removeprefix(root) for p in files["predictions"]] == \
        [p.removeprefix(str(workdir)) for p in local["predictions"]]
    assert len(files["predictions"]) == 4 and not any(".tmp" in p for p in files["predictions"])


def test_s3_phases_floor_lists_then_fetches_every_prediction_file_once(tmp_path, moto_env):
    """The floor any reader pays: one listing, then one GET per prediction file and all of its bytes."""
    from benchmarks import s3_phases

    workdir = bench_sql.split_parts(_generated(tmp_path / "rows", 5_000), 1_000)
    local = sorted((workdir / "predictions").rglob("*.parquet"))
    root = bench_sql.upload(workdir, moto_env, "s3://bench-sql/data")
    (_, (listing, _, _, listed), (fetch, _, _, fetched)) = s3_phases.floor(root)
    assert listing == f"floor: listing ({len(local)} prediction files)" and listed.get("get", 0) == 0
    assert fetched == {"get": len(local)}
    assert fetch == f"floor: every byte fetched ({sum(p.stat().st_size for p in local) / 1e6:.1f} MB)"
