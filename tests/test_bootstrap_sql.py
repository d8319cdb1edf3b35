"""sql/bootstrap.sql with its resamples in batches (tasks/analysis/bootstrap_sql.py) gives the file's answer."""

from __future__ import annotations

import json

import pytest
from analysis_fixture import MPEMD_VERSION, NIMA_VERSION, write_root

from flows import sql_cli
from tasks.analysis import bootstrap_sql, sql

PAIR = {"baseline_version": NIMA_VERSION, "baseline_model": "nima", "candidate_version": MPEMD_VERSION,
        "candidate_model": "mpemd", "candidate_patch_mode": "grid"}


@pytest.fixture(scope="module")
def con(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("root"))
    write_root(root)
    connection = sql.connect(root, threads=2)
    yield connection
    connection.close()


def whole_file(con, params: dict) -> list[tuple]:
    """bootstrap.sql as written: every resample in one statement."""
    query = sql.load_query("bootstrap")
    return con.sql(query.text, params=query.bind(params)).fetchall()


def assert_same_answer(got: list[tuple], want: list[tuple]) -> None:
    assert [(r[0], r[1], r[2], r[6], r[7]) for r in got] == [(r[0], r[1], r[2], r[6], r[7]) for r in want]
    for g, w in zip(got, want, strict=True):
        for a, b in zip(g[3:6], w[3:6], strict=True):  # estimate, lo, hi: sums in another order at most
            assert (a is None) == (b is None), (g, w)
            assert a is None or a == pytest.approx(b, rel=1e-12, abs=1e-12), (g, w)


@pytest.mark.parametrize(("seed", "n_resamples", "draws"), [(0, 60, 1), (5, 41, 250), (11, 60, 10**9)],
                         ids=["one-resample-a-batch", "a-few-a-batch", "one-batch"])
def test_batches_give_the_whole_files_answer(con, seed, n_resamples, draws):
    params = {**PAIR, "seed": seed, "n_resamples": n_resamples}
    bound = sql.load_query("bootstrap").bind(params)
    ((n_images,),) = con.sql("SELECT count(*) FROM bootstrap_pairs($v, 'nima', NULL, NULL, $c, 'mpemd', 'grid', "
                             "NULL, 'test')", params={"v": NIMA_VERSION, "c": MPEMD_VERSION}).fetchall()
    batches = bootstrap_sql.resample_batches(n_images, n_resamples, draws)
    assert len(batches) > 1 or draws == 10**9  # the small settings do split the resamples
    text, values = bootstrap_sql.prepare(con, bound, draws)
    got = con.sql(text, params=values).fetchall()
    want = whole_file(con, params)
    assert len(want) >= 10 and any(r[4] is not None for r in want)  # intervals, not an all-NULL table
    assert_same_answer(got, want)


def test_run_query_and_the_cli_batch_by_the_setting(con, monkeypatch, tmp_path, capsys):
    params = {**PAIR, "n_resamples": 30}
    want = whole_file(con, params)
    monkeypatch.setenv(bootstrap_sql.DRAWS_ENV, "1")  # one resample a batch
    assert_same_answer(sql.run_query_rows(con, "bootstrap", params)[2], want)
    root = tmp_path / "root"
    write_root(str(root))
    out = tmp_path / "answer.json"
    argv = ["bootstrap", "--root", str(root), "--format", "json", "--out", str(out),
            *(a for k, v in params.items() for a in ("--param", f"{k}={v}"))]
    assert sql_cli.main(argv) == 0, capsys.readouterr().err
    assert_same_answer([tuple(r.values()) for r in json.loads(out.read_text())], want)


@pytest.mark.parametrize(("n_images", "n_resamples", "draws"),
                         [(100, 50, 1), (100, 50, 250), (100, 50, 10**6), (7, 3, 20), (0, 4, 5)])
def test_batches_cover_every_resample_once_within_the_draws(n_images, n_resamples, draws):
    batches = bootstrap_sql.resample_batches(n_images, n_resamples, draws)
    covered = [r for lo, hi in batches for r in range(lo, hi)]
    assert covered == list(range(-1, n_resamples))
    assert all(hi > lo and ((hi - lo) * n_images <= draws or hi - lo == 1) for lo, hi in batches)


def test_the_draws_setting_must_be_positive(monkeypatch):
    monkeypatch.setenv(bootstrap_sql.DRAWS_ENV, "0")
    with pytest.raises(ValueError, match=bootstrap_sql.DRAWS_ENV):
        bootstrap_sql.max_draws()


def test_bench_scale_runs_only_the_series_asked_for(tmp_path, monkeypatch):
    import sys

    from benchmarks import bench_scale

    def prepare(folder, n):
        return [(name, [sys.executable, "-c", "print(1)"], None, None) for name in ("errors", "bootstrap (100)")]

    monkeypatch.setitem(bench_scale.STAGES, "fake", bench_scale.scale_stages.Stage("row", [1], [1], prepare))
    saved = []
    bench_scale.run_stage("fake", [1], tmp_path, {}, lambda name, point: saved.append(name), ["bootstrap"])
    assert saved == ["bootstrap (100)"]
    bench_scale.run_stage("fake", [1], tmp_path, {}, lambda name, point: saved.append(name))
    assert saved == ["bootstrap (100)", "errors", "bootstrap (100)"]
