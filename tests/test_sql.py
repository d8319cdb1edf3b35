"""The DuckDB queries of sql/ against a hand-made root, checked against pandas/numpy/scipy answers."""

from __future__ import annotations

import io
import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from analysis_fixture import (
    MPEMD_VERSION,
    NIMA_VERSION,
    PLANS,
    SPLIT_FILTERS,
    bin_labels_of,
    expected_set,
    metrics,
    use_plan,
    use_split_filter,
    write_root,
)

from flows import sql_cli
from model import metrics as metrics_module
from model.aspect_bins import ASPECT_BIN_EDGES, aspect_bin_labels
from tasks.analysis import sql
from tasks.core.errors import UnknownChoiceError

QUERY_NAMES = [q.name for q in sql.list_queries() if q.name != sql.VIEWS_FILE]
NIMA = {"model_version": NIMA_VERSION, "model": "nima"}
MPEMD_GRID = {"model_version": MPEMD_VERSION, "model": "mpemd", "patch_mode": "grid"}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> tuple[str, pd.DataFrame, pd.DataFrame]:
    url = str(tmp_path_factory.mktemp("root"))
    manifest, predictions = write_root(url)
    return url, manifest, predictions


@pytest.fixture(scope="module", params=[(p, f) for p in PLANS for f in SPLIT_FILTERS], ids=" / ".join)
def con(root, request):
    connection = sql.connect(root[0], threads=1)
    plan, split_filter = request.param
    use_plan(connection, plan, None)
    use_split_filter(connection, split_filter)
    yield connection
    connection.close()


def required_params(query: sql.SqlQuery) -> dict[str, str]:
    return {p.name: "whatever" for p in query.params if p.required}


def assert_close(actual, expected, name: str) -> None:
    if expected is None or (isinstance(expected, float) and math.isnan(expected)):
        assert actual is None or (isinstance(actual, float) and math.isnan(actual)), f"{name}: {actual}"
    else:
        assert actual == pytest.approx(expected, abs=1e-9, rel=1e-9), name


# --- the files themselves -----------------------------------------------------------------------


def test_every_file_has_a_purpose_and_declares_exactly_its_parameters():
    import duckdb

    queries = sql.list_queries()
    assert {"views", "errors_by_aspect_bin", "compare_models", "aspect_ratio_histogram", "score_distribution",
            "worst_predictions", "bucket_summary"} <= {q.name for q in queries}
    scratch = duckdb.connect()
    for q in queries:
        assert q.text.startswith("-- purpose: "), q.name
        statements = scratch.extract_statements(q.text)
        if q.name == sql.VIEWS_FILE:
            assert all(not s.named_parameters for s in statements)
            continue
        assert len(statements) == 1, f"{q.name}: one statement per file"
        assert statements[0].named_parameters == {p.name for p in q.params}, q.name


def test_sql_files_are_packaged_with_the_distribution():
    from setuptools import find_packages

    top = Path(__file__).parents[1]
    text = (top / "pyproject.toml").read_text()
    include = re.findall(r'"([^"]+)"', re.search(r"\[tool.setuptools.packages.find\]\s*include = \[(.*?)\]",
                                                 text, re.S).group(1))
    packages = find_packages(where=str(top), include=include)
    assert "sql" in packages and "tasks" in packages
    assert re.search(r'\[tool.setuptools.package-data\]\s*"\*" = \[[^\]]*"\*\.sql"', text)
    assert sql.sql_dir() == Path(sql.__file__).resolve().parents[2] / "sql"


def test_parameters_convert_and_complain():
    q = sql.load_query("worst_predictions")
    bound = q.bind({"model_version": "v", "limit": "7", "bin": "NULL"})
    assert bound["limit"] == 7 and bound["bin"] is None and bound["split"] == "test"
    with pytest.raises(ValueError, match="required"):
        q.bind({})
    with pytest.raises(ValueError, match="unknown"):
        q.bind({"model_version": "v", "nope": 1})
    with pytest.raises(ValueError, match="no query named"):
        sql.load_query("../etc/passwd")


def test_views_skip_temporary_files(root):
    url = root[0]
    partition = Path(url) / "predictions" / f"model_version={NIMA_VERSION}" / "date=2024-03-01"
    (partition / ".tmp-abc-part-9.parquet").write_bytes(b"half a file")
    try:
        files = sql.data_files(url)["predictions"]
        assert len(files) == 3 and not any("/.tmp-" in f for f in files)
    finally:
        (partition / ".tmp-abc-part-9.parquet").unlink()


@pytest.mark.parametrize("name", QUERY_NAMES)
def test_every_query_runs_on_an_empty_root(tmp_path, name):
    con = sql.connect(str(tmp_path / "nothing-here"), threads=1)
    try:
        table = sql.run_query(con, name, required_params(sql.load_query(name)))
        assert table.num_columns > 0
        if "n" in table.column_names:
            assert all(v == 0 for v in table.column("n").to_pylist())
    finally:
        con.close()


# --- answers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("selection", [NIMA, MPEMD_GRID, {"model_version": MPEMD_VERSION}],
                         ids=["nima", "mpemd-grid", "mpemd-any-set"])
def test_errors_by_aspect_bin_matches_pandas(root, con, selection):
    _, manifest, predictions = root
    got = sql.run_query_df(con, "errors_by_aspect_bin", selection)
    want = expected_set(manifest, predictions, selection["model_version"], selection.get("model"),
                        selection.get("patch_mode"))
    labels = bin_labels_of(want.aspect_ratio.to_numpy())
    assert list(got.bin) == [*aspect_bin_labels(), "all"]
    for row in got.itertuples():
        mask = np.ones(len(want), bool) if row.bin == "all" else labels == row.bin
        m = metrics(want.score.to_numpy()[mask], want.score_mean.to_numpy()[mask])
        assert row.n == m["n"], row.bin
        for key in ("mae", "mse", "lcc", "srcc", "accuracy"):
            assert_close(getattr(row, key), m[key], f"{row.bin} {key}")
        assert_close(row.rmse, math.sqrt(m["mse"]) if m["n"] else math.nan, f"{row.bin} rmse")
    # The fixture's shape: an empty bin, a one-image bin (no correlation), every test image once.
    assert got.set_index("bin").loc["1.4-1.6", "n"] == 0
    assert got.set_index("bin").loc["1.2-1.4", "n"] == 1 and pd.isna(got.set_index("bin").loc["1.2-1.4", "lcc"])
    assert got.set_index("bin").loc["all", "n"] == (manifest.split == "test").sum()


def test_compare_models_matches_pandas(root, con):
    _, manifest, predictions = root
    got = sql.run_query_df(con, "compare_models", {
        "nima_version": NIMA_VERSION, "nima_model": "nima",
        "mpemd_version": MPEMD_VERSION, "mpemd_patch_mode": "grid", "mpemd_n_patches": "8"})
    a = expected_set(manifest, predictions, NIMA_VERSION, "nima")
    b = expected_set(manifest, predictions, MPEMD_VERSION, "mpemd", "grid")
    both = a.merge(b[["image_id", "score"]], on="image_id", suffixes=("_nima", "_mpemd"))
    labels = bin_labels_of(both.aspect_ratio.to_numpy())
    expected = {}
    for label in [*aspect_bin_labels(), "all"]:
        mask = np.ones(len(both), bool) if label == "all" else labels == label
        true = both.score_mean.to_numpy()[mask]
        expected[label] = (metrics(both.score_nima.to_numpy()[mask], true),
                           metrics(both.score_mpemd.to_numpy()[mask], true))
    typical = expected["0.6-0.8"][0]["mae"] - expected["0.6-0.8"][1]["mae"]
    assert list(got.bin) == list(expected)
    for row in got.itertuples():
        nima, mpemd = expected[row.bin]
        assert row.n == nima["n"]
        decrease = nima["mae"] - mpemd["mae"]
        assert_close(row.nima_mae, nima["mae"], "nima_mae")
        assert_close(row.mpemd_mae, mpemd["mae"], "mpemd_mae")
        assert_close(row.mae_decrease, decrease, "mae_decrease")
        assert_close(row.relative_decrease, decrease / nima["mae"], "relative_decrease")
        assert_close(row.decrease_vs_typical, decrease / typical, "decrease_vs_typical")
        for model, m in (("nima", nima), ("mpemd", mpemd)):
            for key in ("mse", "lcc", "srcc"):
                assert_close(getattr(row, f"{model}_{key}"), m[key], f"{row.bin} {model}_{key}")
    assert got.set_index("bin").loc["0.6-0.8", "decrease_vs_typical"] == pytest.approx(1.0)


def test_bins_are_a_parameter_table(root):
    url, manifest, predictions = root
    edges = (0.0, 0.7, 1.0, math.inf)
    con = sql.connect(url, bin_edges=edges, threads=1)
    try:
        got = sql.run_query_df(con, "errors_by_aspect_bin", NIMA)
    finally:
        con.close()
    want = expected_set(manifest, predictions, NIMA_VERSION, "nima")
    labels = bin_labels_of(want.aspect_ratio.to_numpy(), edges)
    assert list(got.bin) == ["0.0-0.7", "0.7-1.0", "1.0-inf", "all"]
    for row in got.itertuples():
        if row.bin != "all":
            mask = labels == row.bin
            assert row.n == mask.sum()
            assert_close(row.mae, metrics(want.score.to_numpy()[mask], want.score_mean.to_numpy()[mask])["mae"],
                         row.bin)


def test_aspect_ratio_histogram_counts(root, con):
    _, manifest, _ = root
    got = sql.run_query_df(con, "aspect_ratio_histogram", {"split": "test", "step": "0.1", "max_ratio": "2"})
    ratios = manifest[manifest.split == "test"].aspect_ratio.to_numpy()
    index = np.minimum(np.floor(np.round(ratios / 0.1, 9)), 20).astype(int)
    assert list(got.n) == list(np.bincount(index, minlength=21))
    assert got.hi.iloc[-1] == math.inf and got.n.iloc[-1] == (ratios >= 2).sum() == 2
    assert got.fraction.sum() == pytest.approx(1.0)
    assert got.lo.iloc[6] == pytest.approx(0.6) and got.bin.iloc[6] == "0.6-0.8"


def test_score_distribution_counts(root, con):
    _, manifest, predictions = root
    got = sql.run_query_df(con, "score_distribution", {"model_version": MPEMD_VERSION, "step": "0.5"})
    truth = manifest[manifest.split == "test"].score_mean.to_numpy()
    index = np.clip(np.floor(np.round((truth - 1) / 0.5, 9)), 0, 17).astype(int)
    true_rows = got[got.series == "true"]
    assert list(true_rows.n) == list(np.bincount(index, minlength=18))
    grid = predictions[(predictions.model_version == MPEMD_VERSION) & (predictions.patch_mode == "grid")
                       & predictions.image_id.isin(manifest[manifest.split == "test"].image_id)]
    assert got[got.series == f"mpemd:{MPEMD_VERSION}:grid:8"].n.sum() == len(grid)
    assert set(got.series) == {"true", f"mpemd:{MPEMD_VERSION}:grid:8", f"mpemd:{MPEMD_VERSION}:random:8"}


def test_worst_predictions_are_the_largest_errors(root, con):
    _, manifest, predictions = root
    got = sql.run_query_df(con, "worst_predictions", {**NIMA, "limit": "5"})
    want = expected_set(manifest, predictions, NIMA_VERSION, "nima")
    abs_err = np.sort(np.abs(want.score.astype(float) - want.score_mean).to_numpy())[::-1][:5]
    np.testing.assert_allclose(got.abs_error.to_numpy(), abs_err, atol=1e-12)
    assert got.uri.str.startswith("s3://ava/images/").all()
    only = sql.run_query_df(con, "worst_predictions", {**NIMA, "bin": "1.6-inf"})
    assert set(only.bin) == {"1.6-inf"} and len(only) == 4


def test_bucket_summary_counts_status_and_new_images(root, con):
    _, _, predictions = root
    got = sql.run_query_df(con, "bucket_summary", {"model_version": NIMA_VERSION})
    assert list(got.date.astype(str)) == ["2024-03-01", "2024-03-02"]
    day1, day2 = got.iloc[0], got.iloc[1]
    p = predictions[predictions.model_version == NIMA_VERSION]
    p2 = p[p.date.astype(str) == "2024-03-02"]
    assert day2.n_rows == len(p2) and day2.n_error == 2 and day2.n_ok == len(p2) - 2 and day2.n_other == 0
    assert day1.n_new == (p.date.astype(str) == "2024-03-01").sum()
    assert day2.n_new == 2  # the two images outside AVA; the re-scored ones are not new
    ok2 = p2[p2.status == "ok"].score.to_numpy()
    assert day2.score_p50 == pytest.approx(np.quantile(ok2, 0.5))
    assert day2.score_p90 == pytest.approx(np.quantile(ok2, 0.9))
    assert day2.top_error == "decode: truncated JPEG"
    since = sql.run_query_df(con, "bucket_summary", {"since": "2024-03-02"})
    assert set(since.date.astype(str)) == {"2024-03-02"}


def test_prediction_sets_tell_sets_apart(root, con):
    got = sql.run_query_df(con, "prediction_sets")
    keys = set(zip(got.model_version, got.model, got.patch_mode, got.n_patches, strict=True))
    assert keys == {(NIMA_VERSION, "nima", "warp", 1), (MPEMD_VERSION, "mpemd", "grid", 8),
                    (MPEMD_VERSION, "mpemd", "random", 8)}


# prediction_sets as first written: one distinct count over a string made per row (an image is its
# image_id, or its uri where it has none). The file now counts otherwise; the answer must not change.
PREDICTION_SETS_DEFINITION = """
SELECT model_version, model, patch_mode, n_patches, count(*) AS n_rows,
    count(*) FILTER (WHERE status = 'ok') AS n_ok,
    count(DISTINCT coalesce(CAST(image_id AS VARCHAR), uri)) FILTER (WHERE status = 'ok') AS n_images,
    min(date) AS first_date, max(date) AS last_date
FROM predictions WHERE $model_version IS NULL OR model_version = $model_version
GROUP BY ALL ORDER BY model_version, model, patch_mode, n_patches"""


def test_prediction_sets_count_what_their_definition_counts_on_random_histories(tmp_path):
    """Random rows of several sets per version (NULL patch mode and count included): images without
    an image_id told apart by uri, uris shared by several image_ids and by id-less rows, error rows
    that count as rows but not as images, an image scored on several dates."""
    rng = np.random.default_rng(11)
    sets = [("mpemd", "grid", 8), ("mpemd", "random", 8), ("nima", "warp", 1), ("nima", None, None)]
    for version in ("v1", "v2"):
        for date in ("2024-05-01", "2024-05-02", "2024-05-03"):
            n = 400
            ids = rng.integers(0, 150, n).astype(float)
            ids[rng.random(n) < 0.25] = np.nan  # outside the manifests: the uri is the image
            model, patch_mode, n_patches = zip(*(sets[i] for i in rng.integers(0, len(sets), n)), strict=True)
            rows = pd.DataFrame({
                "uri": [f"s3://b/{u}.jpg" for u in rng.integers(0, 60, n)],  # few uris: shared ones
                "image_id": pd.array(ids, dtype="Int64"), "model": model, "patch_mode": patch_mode,
                "n_patches": pd.array(n_patches, dtype="Int32"),
                "status": np.where(rng.random(n) < 0.2, "error", "ok"),
                "scored_at": pd.Timestamp(f"{date}T10:00:00", tz="UTC")})
            _write_predictions(str(tmp_path), rows, date, version)
    con = sql.connect(str(tmp_path), threads=2)
    try:
        for version in (None, "v2"):
            got = sql.run_query_rows(con, "prediction_sets", {"model_version": version})[2]
            want = con.execute(PREDICTION_SETS_DEFINITION, {"model_version": version}).fetchall()
            assert got == want, version
        no_id = con.execute("SELECT count(DISTINCT uri), count(DISTINCT image_id) FROM predictions "
                            "WHERE status = 'ok' AND image_id IS NULL").fetchone()
    finally:
        con.close()
    assert len(want) == len(sets) and no_id[0] > 10  # every set once; id-less images counted by uri


@pytest.mark.parametrize("y_steps", [2, None], ids=["y-ties", "y-continuous"])
def test_srcc_macro_matches_scipy_with_ties_and_rows_outside_every_bin(tmp_path, y_steps):
    from scipy import stats

    rng = np.random.default_rng(3)
    n = 400
    y = rng.normal(5, 1, n)
    frame = pd.DataFrame({
        "bin": rng.choice(["a", "b", "c", None], n, p=[0.5, 0.3, 0.1, 0.1]),
        "x": np.round(rng.normal(5, 1, n), 1),  # many ties
        # y's ranks come from counts per value: few values (vote means) and all distinct both work.
        "y": np.round(y * y_steps) / y_steps if y_steps else y,
    })
    frame.loc[frame.bin == "c", "y"] = 4.0  # a constant side: SRCC undefined
    frame = pd.concat([frame, pd.DataFrame({"bin": ["d"], "x": [1.0], "y": [2.0]})])  # one pair
    scratch = sql.connect(str(tmp_path), threads=2)
    scratch.register("pairs_frame", frame)
    got = dict(scratch.execute("WITH p AS (SELECT * FROM pairs_frame) SELECT coalesce(bin, 'all'), srcc "
                               "FROM srcc_by_bin(p)").fetchall())
    scratch.close()
    assert set(got) == {"a", "b", "c", "d", "all"}
    for label in ("a", "b", "all"):
        rows = frame if label == "all" else frame[frame.bin == label]
        want = stats.spearmanr(rows.x, rows.y).statistic
        assert got[label] == pytest.approx(want, abs=1e-12), label
    assert got["c"] is None and got["d"] is None


def _write_predictions(url: str, rows: pd.DataFrame, date: str, version: str = "v1") -> Path:
    import pyarrow as pa

    from tasks.scoring.predictions import PREDICTION_SCHEMA

    full = {f.name: rows.get(f.name) for f in PREDICTION_SCHEMA}
    table = pa.Table.from_pandas(pd.DataFrame(full), schema=PREDICTION_SCHEMA, preserve_index=False)
    path = Path(url) / "predictions" / f"model_version={version}" / f"date={date}" / "part-0.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def test_a_version_reads_only_its_own_folders_and_versions_come_from_the_paths(tmp_path):
    url = str(tmp_path)
    at = pd.Timestamp("2024-05-01T10:00:00", tz="UTC")
    row = {"model": "mpemd", "patch_mode": "grid", "n_patches": 8, "status": "ok", "scored_at": at}
    _write_predictions(url, pd.DataFrame([{**row, "uri": "a", "image_id": 1, "score": 1.0}]), "2024-05-01", "v1")
    other = _write_predictions(url, pd.DataFrame([{**row, "uri": "b", "image_id": 1, "score": 2.0}]),
                               "2024-05-01", "v10")  # a name that v1 is a prefix of
    con = sql.connect(url, threads=1)
    try:
        ((files,),) = con.execute("SELECT version_files('v1')").fetchall()
        assert [f.split("/")[-3] for f in files] == ["model_version=v1"]
        # A version without files: the whole list, emptied by the model_version filter (no error).
        assert con.execute("SELECT count(*) FROM prediction_set('v2', NULL, NULL, NULL)").fetchall() == [(0,)]
        other.unlink()  # v1's questions must not open v10's files at all
        assert con.execute("SELECT uri, score FROM prediction_set('v1', NULL, NULL, NULL)").fetchall() == [("a", 1.0)]
        sql.check_versions(con, {"model_version": "v10"})  # listed at connect, from the path
        with pytest.raises(UnknownChoiceError, match="stored model versions: v1, v10"):
            sql.check_versions(con, {"model_version": "v2"})
    finally:
        con.close()


def test_older_files_missing_a_column_still_read_and_one_schema_skips_union_by_name(tmp_path):
    url = str(tmp_path)
    at = pd.Timestamp("2024-05-01T10:00:00", tz="UTC")
    row = {"model": "mpemd", "patch_mode": "grid", "n_patches": 8, "status": "ok", "scored_at": at}
    _write_predictions(url, pd.DataFrame([{**row, "uri": "a", "image_id": 1, "score": 1.0}]), "2024-05-01")

    def union_flag(expected: list) -> bool:
        con = sql.connect(url, threads=1)
        try:
            ((flag,),) = con.execute("SELECT getvariable('prediction_union')").fetchall()
            rows = con.execute("SELECT uri, score, error FROM prediction_set('v1', NULL, NULL, NULL) "
                               "ORDER BY uri").fetchall()
        finally:
            con.close()
        assert rows == expected
        return flag

    assert union_flag([("a", 1.0, None)]) is False  # every file written with the contract schema
    older = Path(url) / "predictions" / "model_version=v1" / "date=2024-04-01" / "part-0.parquet"
    older.parent.mkdir(parents=True)
    old_rows = pd.DataFrame([{**row, "uri": "b", "image_id": 2, "score": 2.0,
                              "scored_at": at - pd.Timedelta(days=30)}])
    pq.write_table(pa_table_without(old_rows, "error"), older)  # a file from before the error column
    assert union_flag([("a", 1.0, None), ("b", 2.0, None)]) is True  # read, as NULL


def pa_table_without(rows: pd.DataFrame, column: str):
    import pyarrow as pa

    from tasks.scoring.predictions import PREDICTION_SCHEMA

    schema = pa.schema([f for f in PREDICTION_SCHEMA if f.name != column])
    return pa.Table.from_pandas(pd.DataFrame({f.name: rows.get(f.name) for f in schema}), schema=schema,
                                preserve_index=False)


@pytest.mark.parametrize("plan", PLANS)
def test_latest_row_wins_and_exact_ties_resolve_the_same_way_every_time(tmp_path, plan):
    url = str(tmp_path)
    at = pd.Timestamp("2024-05-01T10:00:00", tz="UTC")
    base = {"model": "mpemd", "patch_mode": "grid", "n_patches": 8, "status": "ok"}
    day1 = pd.DataFrame([
        {**base, "uri": "s3://b/1.jpg", "image_id": 1, "score": 9.0, "scored_at": at},  # older: loses
        {**base, "uri": "s3://b/2.jpg", "image_id": 2, "score": 2.0, "scored_at": at},
        {**base, "uri": "s3://b/x.jpg", "image_id": None, "score": 1.0, "scored_at": at},
        # Three rows of an image (the latest unique), and three whose two latest tie (greater uri wins).
        {**base, "uri": "s3://b/4.jpg", "image_id": 4, "score": 1.0, "scored_at": at},
        {**base, "uri": "s3://b/4.jpg", "image_id": 4, "score": 2.0, "scored_at": at + pd.Timedelta(minutes=30)},
        {**base, "uri": "s3://b/5a.jpg", "image_id": 5, "score": 1.5, "scored_at": at},
        # Two rows tied at an older time, then one later row: the later one wins.
        {**base, "uri": "s3://b/6a.jpg", "image_id": 6, "score": 8.0, "scored_at": at},
        {**base, "uri": "s3://b/6b.jpg", "image_id": 6, "score": 8.5, "scored_at": at},
    ])
    later = at + pd.Timedelta(hours=1)
    day2 = pd.DataFrame([
        {**base, "uri": "s3://b/1.jpg", "image_id": 1, "score": 5.0, "scored_at": later},
        # Two URIs of image 3 in one batch: same scored_at and date; the greater uri wins.
        {**base, "uri": "s3://b/3a.jpg", "image_id": 3, "score": 3.0, "scored_at": later},
        {**base, "uri": "s3://b/3b.jpg", "image_id": 3, "score": 4.0, "scored_at": later},
        {**base, "uri": "s3://b/x.jpg", "image_id": None, "score": 6.0, "scored_at": later},
        {**base, "uri": "s3://b/2.jpg", "image_id": 2, "score": None, "scored_at": later, "status": "error"},
        {**base, "uri": "s3://b/4.jpg", "image_id": 4, "score": 7.0, "scored_at": later},
        {**base, "uri": "s3://b/5a.jpg", "image_id": 5, "score": 6.5, "scored_at": later},
        {**base, "uri": "s3://b/5b.jpg", "image_id": 5, "score": 6.0, "scored_at": later},
        {**base, "uri": "s3://b/6a.jpg", "image_id": 6, "score": 3.5, "scored_at": later},
    ])
    _write_predictions(url, day1, "2024-05-01")
    _write_predictions(url, day2, "2024-05-02")
    con = sql.connect(url, threads=2)
    use_plan(con, plan)
    try:
        for _ in range(3):
            got = con.execute("SELECT coalesce(image_id::VARCHAR, uri), score FROM prediction_set('v1', NULL, NULL, "
                              "NULL) ORDER BY 1").fetchall()
            assert got == [("1", 5.0), ("2", 2.0), ("3", 4.0), ("4", 7.0), ("5", 6.0), ("6", 3.5),
                           ("s3://b/x.jpg", 6.0)]
    finally:
        con.close()


@pytest.mark.parametrize("plan", PLANS)
def test_every_column_of_a_chosen_row_comes_from_that_row_nulls_included(tmp_path, plan):
    """The latest row's NULLs stay NULL: an aggregate that skips NULL values (arg_max) would fill them
    from an older row (here: the etag of the file it replaced, the score_std of an older model)."""
    url = str(tmp_path)
    at = pd.Timestamp("2024-05-01T10:00:00", tz="UTC")
    base = {"model": "mpemd", "patch_mode": "grid", "n_patches": 8, "status": "ok", "score": 5.0}
    older = {**base, "source_etag": "old-etag", "score_std": 1.5, "width": 640}
    newer = {**base, "source_etag": None, "score_std": None, "width": None, "score": 6.0}
    rows = [  # image 1: two rows (the shortcut); image 2: three (the second aggregate); 3: a tie (the window)
        {**older, "uri": "s3://b/1.jpg", "image_id": 1, "scored_at": at},
        {**newer, "uri": "s3://b/1.jpg", "image_id": 1, "scored_at": at + pd.Timedelta(hours=1)},
        {**older, "uri": "s3://b/2.jpg", "image_id": 2, "scored_at": at},
        {**older, "uri": "s3://b/2.jpg", "image_id": 2, "scored_at": at + pd.Timedelta(minutes=1)},
        {**newer, "uri": "s3://b/2.jpg", "image_id": 2, "scored_at": at + pd.Timedelta(hours=1)},
        {**older, "uri": "s3://b/3a.jpg", "image_id": 3, "scored_at": at + pd.Timedelta(hours=1)},
        {**newer, "uri": "s3://b/3b.jpg", "image_id": 3, "scored_at": at + pd.Timedelta(hours=1)},
        {**older, "uri": "s3://b/x.jpg", "image_id": None, "scored_at": at},
        {**newer, "uri": "s3://b/x.jpg", "image_id": None, "scored_at": at + pd.Timedelta(hours=1)},
    ]
    _write_predictions(url, pd.DataFrame(rows), "2024-05-01")
    con = sql.connect(url, threads=2)
    use_plan(con, plan)
    try:
        got = con.execute("SELECT uri, score, source_etag, score_std, width FROM prediction_set('v1', NULL, NULL, "
                          "NULL) ORDER BY uri").fetchall()
    finally:
        con.close()
    assert got == [(uri, 6.0, None, None, None) for uri in ("s3://b/1.jpg", "s3://b/2.jpg", "s3://b/3b.jpg",
                                                             "s3://b/x.jpg")]


@pytest.mark.parametrize("one_pass", [False, True], ids=["latest_by_place", "latest_by_key"])
def test_prediction_set_is_the_latest_row_by_the_whole_key_on_random_histories(tmp_path, one_pass):
    """prediction_set's two plans (sql/views.sql: latest_by_place, one arg_max per image and the whole
    key only where it cannot decide; latest_by_key, one arg_max over the whole key as a STRUCT) against
    its definition: every row ordered by (scored_at, date, model, patch_mode, n_patches, uri).
    Random histories of 1-4 rows an image over few timestamps (so ties are common), NULL scored_at
    included: the contract forbids it, files written by other tools may still hold it. Rows dealt over
    several files: the second pass reads only the files between an undecided image's first and last
    place, so a place counted wrong drops a row it needed."""
    import pyarrow as pa

    from tasks.scoring.predictions import PREDICTION_SCHEMA

    rng = np.random.default_rng(7)
    # one time before 1970: a negative place (sql/views.sql place_of) must keep its position
    times = [pd.Timestamp("2024-05-01T10:00:00", tz="UTC") + pd.Timedelta(minutes=m) for m in (0, 1, 2)]
    times.append(pd.Timestamp("1969-12-31T23:59:00", tz="UTC"))
    schema = pa.schema([f.with_nullable(True) if f.name == "scored_at" else f for f in PREDICTION_SCHEMA])
    for date in ("2024-05-01", "2024-05-02"):
        rows = []
        for image_id in range(330):  # 300 known images, then 30 outside the manifests (no image_id: by uri)
            for _ in range(rng.integers(0, 3)):
                at = None if rng.random() < 0.08 else times[rng.integers(0, len(times))]
                rows.append({"uri": f"s3://b/{image_id}-{rng.integers(0, 2)}.jpg",
                             "image_id": image_id if image_id < 300 else None,
                             "model": "mpemd", "patch_mode": ["grid", "random"][rng.integers(0, 2)],
                             "n_patches": 8, "status": "ok", "score": float(rng.random()), "scored_at": at})
        # Two rows equal in the whole key have no "latest" (no writer makes them: a batch scores a uri once)
        frame = pd.DataFrame(rows).drop_duplicates(["uri", "scored_at", "patch_mode"])
        table = pa.Table.from_pandas(pd.DataFrame({f.name: frame.get(f.name) for f in schema}), schema=schema,
                                     preserve_index=False)
        # three files a date, rows dealt at random: an image's rows (its ties too) lie in several files
        part = rng.integers(0, 3, len(table))
        for k in range(3):
            path = tmp_path / "predictions" / "model_version=v1" / f"date={date}" / f"part-{k}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(table.filter(pa.array(part == k)), path)
    con = sql.connect(str(tmp_path), threads=2)
    try:
        use_plan(con, "latest_by_key" if one_pass else "latest_by_place")  # tiny files chose latest_by_key
        plan = "\n".join(r[1] for r in con.execute(
            "EXPLAIN SELECT * FROM prediction_set_of_images('v1', NULL, NULL, NULL)").fetchall())
        got = con.execute("SELECT image_id, uri, score FROM prediction_set('v1', NULL, NULL, NULL) "
                          "ORDER BY image_id, uri").fetchall()
        want = con.execute(
            "SELECT image_id, uri, score FROM predictions WHERE model_version = 'v1' AND status = 'ok' "
            "QUALIFY row_number() OVER (PARTITION BY coalesce(image_id::VARCHAR, uri) ORDER BY (scored_at, date, "
            "model, patch_mode, n_patches, uri) DESC) = 1 ORDER BY image_id, uri").fetchall()
        nulls = con.execute("SELECT count(*) FROM predictions WHERE scored_at IS NULL").fetchone()[0]
    finally:
        con.close()
    assert nulls > 0 and len(want) > 250 and sum(image_id is None for image_id, _, _ in want) > 20
    assert plan.count("READ_PARQUET") == (1 if one_pass else 2)  # the plan asked for, and only it
    assert got == want


def test_connections_set_threads_memory_and_a_private_spill_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("MPEMD_DUCKDB_THREADS", "1")
    monkeypatch.setenv("MPEMD_DUCKDB_MEMORY", "300MB")
    con = sql.connect(str(tmp_path))
    try:
        threads, memory, spill = con.execute("SELECT current_setting('threads'), current_setting('memory_limit'), "
                                             "current_setting('temp_directory')").fetchone()
    finally:
        con.close()
    assert threads == 1 and memory.startswith("286") and "mpemd-duckdb-spill" in spill  # 300 MB in MiB
    monkeypatch.delenv("MPEMD_DUCKDB_THREADS")
    monkeypatch.delenv("MPEMD_DUCKDB_MEMORY")
    import os

    assert sql.default_threads() == len(os.sched_getaffinity(0))
    assert sql.default_memory_limit().endswith("MB")


HOSTILE = ["x'; DROP VIEW manifests; --", "' OR 1=1 --", "0123' OR '1'='1", "$model_version", "\\'; SELECT 1;"]


@pytest.mark.parametrize("value", HOSTILE)
def test_hostile_strings_are_bound_as_values(root, con, value):
    got = sql.run_query_df(con, "errors_by_aspect_bin", {"model_version": value})
    assert (got.n == 0).all()
    worst = sql.run_query_df(con, "worst_predictions", {"model_version": NIMA_VERSION, "bin": value})
    assert len(worst) == 0
    # Nothing was dropped or changed by the attempt.
    assert sql.run_query_df(con, "errors_by_aspect_bin", NIMA).n.iloc[-1] > 0


@pytest.mark.s3
def test_views_over_s3_through_s3fs(s3_bucket, root):
    local_url, _, _ = root
    url = f"{s3_bucket}/data"
    write_root(url)
    s3_con = sql.connect(url, threads=1)
    local = sql.connect(local_url, threads=1)
    try:
        got = sql.run_query_df(s3_con, "errors_by_aspect_bin", NIMA)
        want = sql.run_query_df(local, "errors_by_aspect_bin", NIMA)
        pd.testing.assert_frame_equal(got, want)
        assert got.n.iloc[-1] > 0
        views = sql.run_query_df(s3_con, "views")
        assert {"manifests", "predictions", "rejected", "prediction_set", "scored"} <= set(views.name)
        assert s3_con.execute("SELECT count(*) FROM rejected").fetchone()[0] == 1
    finally:
        s3_con.close()
        local.close()


@pytest.mark.s3
def test_a_root_bigger_than_the_file_cache_is_fetched_once_over_s3(s3_bucket, root, monkeypatch):
    """A cache of four of the root's ~10 KB files: the query's scans read more than it holds. The files it
    lets go are read back from the connection's spill folder, not fetched again; same answer."""
    from tasks.analysis import duckdb_storage

    url = f"{s3_bucket}/data"
    write_root(url)
    monkeypatch.setattr(duckdb_storage, "FILE_CACHE_BYTES", 40 * 2**10)
    fetched: list[str] = []
    plain = duckdb_storage.FileCache._fetch

    def counted(self, view, key):
        held = set(self.files)
        plain(self, view, key)
        fetched.extend(set(self.files) - held)

    monkeypatch.setattr(duckdb_storage.FileCache, "_fetch", counted)
    s3_con = sql.connect(url, threads=2)
    local = sql.connect(root[0], threads=1)
    try:
        for params in (NIMA, {"model_version": NIMA_VERSION, "split": None}):
            got = sql.run_query_df(s3_con, "errors_by_aspect_bin", params)
            pd.testing.assert_frame_equal(got, sql.run_query_df(local, "errors_by_aspect_bin", params))
        assert len(set(fetched)) >= 5  # more files than the cache holds were read ...
        assert sorted(fetched) == sorted(set(fetched))  # ... each fetched once
        assert list((Path(sql._spill_directory()) / "remote-files").glob("*/*"))
    finally:
        s3_con.close()
        local.close()


@pytest.mark.s3
def test_reading_a_root_over_s3_never_scans_a_folders_listing_per_file(s3_bucket, monkeypatch):
    """s3fs answers a file's info, and its whole-file cat's size, by scanning the folder's whole cached
    listing: quadratic in a folder's files (10,000 shard files: 1.2 ms a file). DuckDB's view looks each
    file up in an index of the listing, and GETs a file as the range from byte 0 (no size asked)."""
    import s3fs

    url = f"{s3_bucket}/data"
    write_root(url)
    files = sum(len(v) for v in sql.data_files(url).values())
    scans: list[str] = []
    plain = s3fs.S3FileSystem._ls_from_cache
    monkeypatch.setattr(s3fs.S3FileSystem, "_ls_from_cache",
                        lambda self, path, *a, **kw: scans.append(path) or plain(self, path, *a, **kw))
    s3_con = sql.connect(url, threads=1)
    try:
        assert sql.run_query_df(s3_con, "errors_by_aspect_bin", {"model_version": NIMA_VERSION, "split": None}
                                ).n.iloc[-1] > 0
    finally:
        s3_con.close()
    assert files >= 6 and len(scans) < files, scans


@pytest.mark.s3
def test_duckdb_over_s3_looks_no_listed_file_up_with_s3fs_listing_cache_off(s3_bucket, s3_requests, monkeypatch):
    """DuckDB's view answers its lookups of the listed files from the root's listing entries, not from
    s3fs's listing cache: with that cache off (``FSSPEC_S3='{"use_listings_cache": false}'``, a user's
    fsspec config) no file costs a HEAD."""
    import fsspec
    import s3fs

    from tasks.core import storage

    url = f"{s3_bucket}/data"
    write_root(url)
    files = sum(len(v) for v in sql.data_files(url).values())
    monkeypatch.setitem(fsspec.config.conf, "s3", {**fsspec.config.conf.get("s3", {}), "use_listings_cache": False})
    s3fs.S3FileSystem.clear_instance_cache()
    s3_requests.clear()
    s3_con = sql.connect(url, threads=1)
    try:
        assert not storage.filesystem(url)[0].dircache.use_listings_cache  # (the config reached the client)
        assert sql.run_query_df(s3_con, "errors_by_aspect_bin", {"model_version": NIMA_VERSION, "split": None}
                                ).n.iloc[-1] > 0
    finally:
        s3_con.close()
        s3fs.S3FileSystem.clear_instance_cache()
    assert files >= 6 and s3_requests.count("head_object") <= 1, s3_requests  # the root's, not one a file
    assert s3_requests.count("get_object") <= files + 2, s3_requests


@pytest.mark.s3
def test_an_empty_prediction_file_over_s3_gets_duckdbs_not_parquet_error_not_a_range_refusal(s3_bucket):
    """The cache GETs a file as the range from byte 0, which S3 refuses for an empty object (416): an
    empty file is not asked for, and DuckDB names it as no Parquet file, as over a local root."""
    import duckdb

    from tasks.core import storage

    url = f"{s3_bucket}/data"
    write_root(url)
    empty = storage.join(url, "predictions", f"model_version={NIMA_VERSION}", "date=2024-03-01", "part-9.parquet")
    storage.write_bytes_atomic(empty, b"")
    with pytest.raises(duckdb.Error) as error:  # at connect: the views' binds read every file's schema here
        sql.run_query_df(sql.connect(url, threads=1), "errors_by_aspect_bin", NIMA)
    assert "part-9.parquet' too small to be a Parquet file" in str(error.value), error.value


# --- mpemd sql ----------------------------------------------------------------------------------


def test_cli_list_prints_every_query_with_its_purpose(capsys):
    assert sql_cli.main(["--list"]) == 0
    out = capsys.readouterr().out
    for q in sql.list_queries():
        assert q.name in out and q.purpose in out


def test_an_output_of_mpemd_score_given_as_the_root_is_read_as_the_predictions(root, capfd, tmp_path):
    """`mpemd score ... --out ./scores`, then `mpemd sql ... --root ./scores`: a root with no predictions/
    folder that holds model_version=<v>/ folders is read as the predictions, with a note (was: 0 rows,
    silently). A data root's predictions/ is still what counts where it has one."""
    import shutil

    scores = tmp_path / "scores"
    shutil.copytree(Path(root[0]) / "predictions", scores)
    answers = {}
    for url in (root[0], str(scores)):
        assert sql_cli.main(["prediction_sets", "--root", url, "--format", "csv"]) == 0
        answers[url] = capfd.readouterr()
    assert answers[str(scores)].out == answers[root[0]].out and answers[root[0]].out.count("\n") > 2
    assert f"mpemd: note: {scores} has no predictions/ folder" in answers[str(scores)].err
    assert "mpemd: note" not in answers[root[0]].err
    assert sql.data_files(str(tmp_path))["predictions"] == []  # no model_version=<v>/ folder in it: nothing


def test_cli_formats(root, capfdbinary, tmp_path):
    """DuckDB writes the answer (COPY ... TO stdout or --out, its table rendering): same rows each way."""
    url = root[0]
    args = ["errors_by_aspect_bin", "--root", url, "--param", f"model_version={NIMA_VERSION}",
            "--param", "model=nima"]
    assert sql_cli.main([*args, "--format", "csv"]) == 0
    csv = pd.read_csv(io.BytesIO(capfdbinary.readouterr().out))
    assert list(csv.bin) == [*aspect_bin_labels(ASPECT_BIN_EDGES), "all"]
    assert sql_cli.main([*args, "--format", "json"]) == 0
    rows = json.loads(capfdbinary.readouterr().out)
    assert [r["n"] for r in rows] == list(csv.n)
    assert sql_cli.main([*args, "--format", "table"]) == 0
    lines = capfdbinary.readouterr().out.decode().rstrip("\n").split("\n")
    # top rule, names, types, rule, one line per row, bottom rule: every line the same width
    assert len(lines) == len(csv) + 5 and len({len(line) for line in lines}) == 1
    assert [line.split("│")[1].strip() for line in lines[4:-1]] == list(csv.bin)
    assert sql_cli.main([*args, "--format", "parquet"]) == 0
    table = pq.read_table(io.BytesIO(capfdbinary.readouterr().out))
    assert table.column("n").to_pylist() == list(csv.n)
    assert sql_cli.main([*args, "--format", "csv", "--out", str(tmp_path / "a.csv")]) == 0
    assert pd.read_csv(tmp_path / "a.csv").equals(csv) and capfdbinary.readouterr().out == b""


def test_cli_rejects_bad_parameters(root, capsys):
    assert sql_cli.main(["errors_by_aspect_bin", "--root", root[0]]) == 2
    assert "required" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # argparse's own check of the flag, one line
        sql_cli.main(["errors_by_aspect_bin", "--root", root[0], "--param", "oops"])
    assert exit_.value.code == 2 and "wants KEY=VALUE, got 'oops'" in capsys.readouterr().err


def _near_constant_case(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """float32 rounding noise around 5.3 (constant to model.metrics, not to an exact comparison), a
    real 1e-3 spread, and a ground truth with ties."""
    ulp = float(np.spacing(np.float32(5.3)))
    noisy = (np.float32(5.3) + rng.integers(-2, 3, n) * ulp).astype(np.float32).astype(np.float64)
    assert noisy.max() > noisy.min() and metrics_module.is_constant(noisy)  # else the test proves nothing
    spread = 5.3 + rng.uniform(0, 1e-3, n)
    assert not metrics_module.is_constant(spread)
    return {"noisy": noisy, "spread": spread, "truth": np.round(rng.normal(5, 1, n), 1)}


def _python_or_none(value: float) -> float | None:
    return None if math.isnan(value) else value


def test_lcc_and_srcc_call_the_same_vectors_constant_as_model_metrics(tmp_path):
    rng = np.random.default_rng(11)
    case = _near_constant_case(rng, 300)
    # Bins: the prediction near-constant, the truth near-constant, a real 1e-3 spread on each side.
    sides = {"x-noisy": (case["noisy"], case["truth"]), "y-noisy": (case["truth"], case["noisy"]),
             "x-spread": (case["spread"], case["truth"]), "y-spread": (case["truth"], case["spread"])}
    frame = pd.concat([pd.DataFrame({"bin": label, "x": x, "y": y}) for label, (x, y) in sides.items()])
    scratch = sql.connect(str(tmp_path), threads=2)
    scratch.register("pairs_frame", frame)
    lcc = dict(scratch.execute("SELECT bin, lcc(x, y) FROM pairs_frame GROUP BY bin").fetchall())
    srcc = dict(scratch.execute("WITH p AS (SELECT * FROM pairs_frame) SELECT coalesce(bin, 'all'), srcc "
                                "FROM srcc_by_bin(p)").fetchall())
    scratch.close()
    for label, (x, y) in sides.items():
        want_lcc, want_srcc = metrics_module.pearson(x, y), metrics_module.spearman(x, y)
        assert math.isnan(want_lcc) == label.endswith("noisy") == math.isnan(want_srcc), label
        assert_close(lcc[label], _python_or_none(want_lcc), f"{label} lcc")
        assert_close(srcc[label], _python_or_none(want_srcc), f"{label} srcc")
    assert_close(srcc["all"], metrics_module.spearman(frame.x, frame.y), "all srcc")


def test_errors_by_aspect_bin_reports_a_near_constant_prediction_as_undefined(tmp_path):
    """The whole path (Parquet, prediction_set, scored, the query) against model.metrics on the same rows."""
    rng = np.random.default_rng(12)
    n = 200
    case = _near_constant_case(rng, n)
    ratio = np.where(np.arange(n) < n // 2, 0.75, 1.1)  # bins 0.6-0.8 and 1.0-1.2
    score = np.where(ratio < 1, case["noisy"], case["spread"])
    ids = np.arange(n)
    manifest = pd.DataFrame({"image_id": ids, "uri": [f"s3://b/{i}.jpg" for i in ids], "split": "test",
                             "score_mean": case["truth"], "score_std": 1.0, "aspect_ratio": ratio})
    (tmp_path / "manifests").mkdir()
    manifest.to_parquet(tmp_path / "manifests" / "test.parquet")
    at = pd.Timestamp("2024-05-01T10:00:00", tz="UTC")
    _write_predictions(str(tmp_path), pd.DataFrame({
        "uri": manifest.uri, "image_id": ids, "model": "mpemd", "patch_mode": "grid", "n_patches": 8,
        "score": score, "scored_at": at, "status": "ok"}), "2024-05-01")
    scratch = sql.connect(str(tmp_path), threads=2)
    got = sql.run_query_df(scratch, "errors_by_aspect_bin", {"model_version": "v1"}).set_index("bin")
    scratch.close()
    for label, mask in (("0.6-0.8", ratio < 1), ("1.0-1.2", ratio > 1), ("all", np.ones(n, bool))):
        want = metrics_module.regression_metrics(score[mask], case["truth"][mask])
        assert got.loc[label, "n"] == want["n"]
        for key in ("lcc", "srcc"):
            value = got.loc[label, key]
            assert_close(None if pd.isna(value) else value, _python_or_none(want[key]), f"{label} {key}")
    assert pd.isna(got.loc["0.6-0.8", "lcc"]) and not pd.isna(got.loc["1.0-1.2", "lcc"])


def test_duckdbs_view_of_a_filesystem_asks_each_paths_facts_once(tmp_path):
    """DuckDB asks a file's facts ~30 times a query; on s3fs each ask is an event-loop hand-off."""
    import fsspec

    from tasks.analysis.duckdb_storage import info_once_per_path

    fs = fsspec.filesystem("memory", skip_instance_cache=True)
    if fs.exists("/bucket"):  # the memory store is one per process: another test's files may be there
        fs.rm("/bucket", recursive=True)
    fs.pipe_file("/bucket/a.parquet", b"12345")
    asked: list[str] = []
    plain_info = fs.info
    fs.info = lambda path, **kw: asked.append(path) or plain_info(path, **kw)
    view = info_once_per_path(fs)
    for _ in range(3):
        assert view.info("memory://bucket/a.parquet")["size"] == 5
        assert view.size("/bucket/a.parquet") == 5
        assert view.glob("/bucket/a.parquet") == ["/bucket/a.parquet"]
    assert len(asked) == 1
    assert view.glob("/bucket/missing.parquet") == [] and view.glob("/bucket/*.parquet") == ["/bucket/a.parquet"]
    assert view.open("/bucket/a.parquet").read() == b"12345"
    assert fs.info is not view.info  # the shared filesystem itself is left as it was


def test_duckdbs_view_reads_a_small_file_once_and_lets_the_oldest_go_past_its_budget():
    """Each scan reopens its files; a small one is fetched whole once (one GET on S3), a big one is not kept."""
    import fsspec

    from tasks.analysis.duckdb_storage import info_once_per_path

    fs = fsspec.filesystem("memory", skip_instance_cache=True)
    for name, size in (("a", 10), ("b", 20), ("c", 30), ("big", 101)):
        fs.pipe_file(f"/bucket/{name}.parquet", bytes(range(size)))
    view = info_once_per_path(fs, cache_bytes=400)  # files up to 100 bytes are kept, 400 in all
    small = info_once_per_path(fs, cache_bytes=100)  # (below) four files of 24 bytes fit, a fifth lets the first go
    fetched: list[str] = []
    plain_cat, plain_open = fs.cat_file, fs._open
    fs.cat_file = lambda path, *a, **kw: fetched.append(f"cat {path}") or plain_cat(path, *a, **kw)
    fs._open = lambda path, *a, **kw: fetched.append(f"open {path}") or plain_open(path, *a, **kw)
    for _ in range(3):
        for name in ("a", "b", "big"):
            with view.open(f"memory://bucket/{name}.parquet", "rb") as f:
                f.seek(2)
                assert f.read(5) == bytes(range(2, 7))
    fetched = [f for f in fetched if f.startswith("cat") or "big" in f]  # the memory fs's cat opens the file too
    assert sorted(fetched) == ["cat /bucket/a.parquet", "cat /bucket/b.parquet"] + ["open /bucket/big.parquet"] * 3

    fetched.clear()
    for i in range(5):
        fs.pipe_file(f"/bucket/d{i}.parquet", bytes(24))
    for name in ("d0", "d1", "d2", "d3", "d4", "d1", "d0", "d1"):  # d1 read last but one: d2 goes, not d1
        assert small.open(f"/bucket/{name}.parquet").read() == bytes(24)
    assert [f for f in fetched if f.startswith("cat")] == [f"cat /bucket/d{i}.parquet" for i in (0, 1, 2, 3, 4, 0)]


def test_cli_answer_never_carries_duckdbs_progress_bar(root):
    """DuckDB draws its progress bar on stdout, the answer's stream, for a query past 2 s wherever
    Python's ``__main__`` has no file (``python -c``, a REPL: its default is on there): `mpemd sql`'s
    connection has it off. Run as ``python -c``, the connection's setting read after the answer."""
    import subprocess
    import sys

    code = ("import sys\n"
            "from tasks.analysis import sql\n"
            "from flows import sql_cli\n"
            "made = []\n"
            "plain = sql.connect\n"
            "sql.connect = lambda *args, **kwargs: made.append(plain(*args, **kwargs)) or made[-1]\n"
            f"code = sql_cli.main(['errors_by_aspect_bin', '--root', {root[0]!r}, '--param', "
            f"'model_version={NIMA_VERSION}', '--format', 'csv'], close=False)\n"
            "((bar,),) = made[0].execute(\"SELECT current_setting('enable_progress_bar')\").fetchall()\n"
            "print(f'progress bar: {bar}', file=sys.stderr)\n"
            "sys.exit(code)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, cwd=Path(__file__).parents[1],
                          timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stderr.decode().splitlines()[-1] == "progress bar: False"
    assert done.stdout.startswith(b"bin,lo,hi,n,"), done.stdout[:80]
    assert list(pd.read_csv(io.BytesIO(done.stdout)).bin) == [*aspect_bin_labels(ASPECT_BIN_EDGES), "all"]


def test_bins_past_a_byte_work_and_past_the_sort_keys_range_are_refused(root, capfd):
    """The per-bin queries sort by bin_order as a USMALLINT: 300 bins answer like any other edges (every
    image in one bin, the per-bin n adding up to all's), 65,536 are refused before any I/O, in one line."""
    edges = [0.0, *np.linspace(0.3, 3.2, 299), float("inf")]  # 300 bins
    args = ["errors_by_aspect_bin", "--root", root[0], "--param", f"model_version={NIMA_VERSION}",
            "--param", "model=nima", "--format", "csv"]
    assert sql_cli.main([*args, "--bins", ",".join(map(str, edges))]) == 0
    table = pd.read_csv(io.StringIO(capfd.readouterr().out))
    assert len(table) == 301 and table["n"].iloc[:-1].sum() == table["n"].iloc[-1] > 0
    too_many = ",".join(str(i) for i in range(sql.MAX_BINS + 2))
    assert sql_cli.main([*args, "--bins", too_many]) == 2
    assert "bin edges make 65,536 bins; at most 65,535" in capfd.readouterr().err


def test_the_local_listing_is_fsspecs_with_sizes(tmp_path):
    """A local root is walked with os.scandir (fsspec's find cost ~16 us a file): the same files as the
    object-store path's rule over ``find`` (files two folders down, temporaries and stray depths left
    out, a linked file listed, a linked date folder not entered), each with its size."""
    import fsspec

    from tasks.scoring.layout import is_data_file, partition_of, prediction_data_entries

    predictions = tmp_path / "predictions"
    partition = predictions / "model_version=v1" / "date=2024-03-01"
    partition.mkdir(parents=True)
    for name, size in (("part-0.parquet", 10), ("part-1.parquet", 2_000), (".tmp-x-part-2.parquet", 5)):
        (partition / name).write_bytes(b"x" * size)
    (partition / "nested").mkdir()
    (partition / "nested" / "deeper.parquet").write_bytes(b"x")
    (predictions / "model_version=v1" / "stray.parquet").write_bytes(b"x")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "part-9.parquet").write_bytes(b"x" * 77)
    (predictions / "model_version=v1" / "date=2024-03-02").symlink_to(elsewhere, target_is_directory=True)
    (partition / "part-3.parquet").symlink_to(elsewhere / "part-9.parquet")
    fs = fsspec.filesystem("file")
    folder = str(predictions)
    expected = [p for p in fs.find(folder) if p.rsplit("/", 3)[0] == folder and partition_of(p) and is_data_file(p)]
    listed = prediction_data_entries(fs, str(tmp_path))
    assert list(listed) == sorted(expected) and len(expected) == 3
    assert {p: e["size"] for p, e in listed.items()} == {p: Path(p).stat().st_size for p in expected}
    assert all(e["name"] == p and e["type"] == "file" for p, e in listed.items())  # as fsspec's own entry
    assert prediction_data_entries(fs, str(tmp_path / "absent")) == {}
