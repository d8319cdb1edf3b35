"""Which files ``prediction_set`` opens (sql/views.sql): the answers are tested in test_sql.py; these
tests read DuckDB's own profile and plan, since over thousands of shard files a scan that opens every
file costs about as much as the query's work (docs/performance.md, issue 22)."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from analysis_fixture import PLANS, choose_branches, use_plan, use_split_filter

from tasks.analysis import read_plan, sql
from tasks.scoring.layout import part_name
from tasks.scoring.predictions import PREDICTION_SCHEMA

FILES = 40
TIED_FILE = 7


def _write_shards(root: Path) -> None:
    """FILES shard files of 100 images each (named as ``mpemd score`` names them), a batch (scored_at) a file; in TIED_FILE one image has a
    second URI in the same batch (an exact tie at its latest time: only the whole key decides)."""
    at = pd.Timestamp("2024-05-01T10:00:00", tz="UTC")
    for f in range(FILES):
        rows = [{"uri": f"s3://b/{f}-{i}.jpg", "image_id": f * 100 + i, "model": "mpemd", "patch_mode": "grid",
                 "n_patches": 8, "status": "ok", "score": 1.0, "scored_at": at + pd.Timedelta(minutes=f)}
                for i in range(100)]
        if f == TIED_FILE:
            rows.append({**rows[3], "uri": "s3://b/zz.jpg", "score": 9.0})  # the greater uri: the latest row
        frame = pd.DataFrame(rows)
        table = pa.Table.from_pandas(pd.DataFrame({c.name: frame.get(c.name) for c in PREDICTION_SCHEMA}),
                                     schema=PREDICTION_SCHEMA, preserve_index=False)
        path = root / "predictions" / "model_version=v1" / "date=2024-05-01" / part_name(f, "0" * 16)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)


def _parquet_scans(con, query: str, out: Path) -> list[dict]:
    """Run ``query`` under DuckDB's JSON profiler: each READ_PARQUET operator's extra info, and under
    ``rows`` the rows it passed on."""
    con.execute(f"SET enable_profiling = 'json'; SET profiling_output = '{out}'")
    con.execute(query).fetchall()
    con.execute("SET enable_profiling = 'no_output'")
    scans = []

    def walk(node: dict) -> None:
        if node["name"] == "READ_PARQUET":
            scans.append({**node["extra_info"], "rows": node["intermediate_rows"]})
        for child in node.get("children", []):
            walk(child)

    for node in json.loads(out.read_text())["operator"]:
        walk(node)
    return scans


def _tie_and_scans(root: Path, scanned: str, plan: str | None = None) -> tuple[list, list, list[dict]]:
    """Over the shards in ``root``: the plans the connection chose (``one_pass_versions``), the tied
    image's row from prediction_set, and the READ_PARQUET operators of a query over ``scanned`` (a
    table macro), all by ``plan`` where given (analysis_fixture.use_plan)."""
    con = sql.connect(str(root), threads=2)
    try:
        ((chosen,),) = con.execute("SELECT getvariable('one_pass_versions')").fetchall()
        if plan:
            use_plan(con, plan)
        got = con.execute("SELECT image_id, uri, score FROM prediction_set('v1', NULL, NULL, NULL) "
                          f"WHERE image_id = {TIED_FILE * 100 + 3}").fetchall()
        scans = _parquet_scans(con, f"SELECT count(*), sum(score) FROM {scanned}('v1', NULL, NULL, NULL)",
                               root / "profile.json")
    finally:
        con.close()
    return chosen, got, scans


def test_a_tie_is_settled_from_the_one_file_it_lies_in(tmp_path):
    """latest_by_place's second pass (the whole key, for an image with two rows at its latest time)
    opens the file holding them, not all FILES again (before: every file, for one tied image)."""
    _write_shards(tmp_path)
    # these small files chose latest_by_key
    _, got, scans = _tie_and_scans(tmp_path, "prediction_set", plan="latest_by_place")
    assert got == [(TIED_FILE * 100 + 3, "s3://b/zz.jpg", 9.0)]
    opened = sorted(int(s["Total Files Read"]) for s in scans)
    # the first pass and the rows without an image_id read every file; the tie's pass its own file (and
    # the list's first, which DuckDB opens to bind the schema)
    assert len(opened) == 3 and opened[0] <= 2 and opened[1:] == [FILES, FILES], scans


def test_scored_has_no_scan_for_rows_without_an_image_id(tmp_path):
    """scored() joins on image_id, so it reads prediction_set_of_images: no scan for the rows without
    one (it opened every file even where each file's statistics showed none); prediction_set keeps it."""
    _write_shards(tmp_path)
    con = sql.connect(str(tmp_path), threads=2)
    try:
        plans = {name: "\n".join(row[1] for row in con.execute(f"EXPLAIN SELECT * FROM {call}").fetchall())
                 for name, call in (("scored", "scored('v1', NULL, NULL, NULL, NULL)"),
                                    ("prediction_set", "prediction_set('v1', NULL, NULL, NULL)"))}
    finally:
        con.close()
    assert "image_id IS NULL" in plans["prediction_set"]
    assert "image_id IS NULL" not in plans["scored"]


def test_the_cli_notes_a_version_left_in_shards_until_it_is_compacted(tmp_path, monkeypatch, capsys):
    """`mpemd sql` says when a version is still shard files and which command merges them; after that
    command (run as the note spells it) the note is gone and the answer is the same."""
    import shlex

    from flows import sql_cli
    from flows.cli import main as mpemd

    _write_shards(tmp_path)
    monkeypatch.setattr(sql_cli, "SHARD_NOTE_FILES", FILES // 2)
    args = ["prediction_sets", "--root", str(tmp_path), "--format", "csv"]
    assert sql_cli.main(args) == 0
    before = capsys.readouterr()
    (note,) = [line for line in before.err.splitlines() if line.startswith("mpemd: note: model_version=v1 ")]
    assert f"{FILES} files in 1 date partition" in note
    command = shlex.split(note.split("`")[1])
    assert command[:2] == ["mpemd", "compact"]
    assert mpemd(command[1:]) == 0
    capsys.readouterr()
    assert sql_cli.main(args) == 0
    after = capsys.readouterr()
    assert "mpemd: note:" not in after.err and after.out == before.out
    assert len(list((tmp_path / "predictions").rglob("*.parquet"))) == 1


def test_a_version_of_small_files_is_read_in_one_pass(tmp_path, monkeypatch):
    """Shard files (here 40 of ~100 rows) average under read_plan.SMALL_FILE_ROWS: the connection picks
    latest_by_key for their version, whose images take one scan of the files, the tie included; a
    version of files over the threshold keeps latest_by_place."""
    _write_shards(tmp_path)
    chosen, got, scans = _tie_and_scans(tmp_path, "prediction_set_of_images")
    assert chosen == ["v1"]
    assert got == [(TIED_FILE * 100 + 3, "s3://b/zz.jpg", 9.0)]
    assert [int(s["Total Files Read"]) for s in scans] == [FILES], scans
    files, sizes = sql.list_root(str(tmp_path))
    assert sizes == {f: Path(f).stat().st_size for f in files["predictions"] + files["manifests"] + files["rejected"]}
    # rows from the listing's bytes and a few footers: the sizes differ, the rows per byte hardly
    rows = FILES * 100 + 1
    con = sql.connect(str(tmp_path), threads=1)
    try:
        (estimate,) = read_plan.version_sizes(con, files["predictions"], sizes).values()
    finally:
        con.close()
    assert estimate.files == FILES and abs(estimate.rows - rows) < 0.05 * rows
    # the threshold is the average: just over it two passes, just under one
    average = estimate.rows / FILES
    assert read_plan.one_pass_versions({"v1": estimate}, small_file_rows=int(average)) == []
    assert read_plan.one_pass_versions({"v1": estimate}, small_file_rows=int(average) + 1) == ["v1"]
    # and at most the memory limit over MEMORY_PER_ROW in all (the key's aggregate past about half the
    # limit is slower than two passes): a connection with a small limit takes two passes
    assert read_plan.one_pass_versions({"v1": estimate}, max_rows=estimate.rows) == ["v1"]
    assert read_plan.one_pass_versions({"v1": estimate}, max_rows=estimate.rows - 1) == []
    monkeypatch.setattr(read_plan, "MEMORY_PER_ROW", 2**16)  # these 4,001 rows "need" 262 MB
    limit_mb = int(estimate.rows * read_plan.MEMORY_PER_ROW // 2**20) - 1
    small = sql.connect(str(tmp_path), threads=1, memory_limit=f"{limit_mb}MiB")
    try:
        assert read_plan.memory_limit_bytes(small) == limit_mb * 2**20
        assert small.execute("SELECT getvariable('one_pass_versions')").fetchone()[0] == []
    finally:
        small.close()


def test_rows_not_bytes_decide_the_plan(tmp_path):
    """Files of every column mpemd score writes hold ~6x the bytes of a row of bench_sql's, so bytes
    alone (over the densest rows) took mpemd score's 5,008 shards of 5 M rows for 30 M and read them in
    two passes (1 s more). Wide rows of the same count and files choose as narrow ones do; where no footer
    can be read (here: a version of files that are not Parquet) the bytes' guess stands."""
    _write_shards(tmp_path)
    files, sizes = sql.list_root(str(tmp_path))
    wide = {path: size * 6 for path, size in sizes.items()}  # as if every file were 6x wider a row
    con = sql.connect(str(tmp_path), threads=1)
    try:
        narrow_rows = read_plan.version_sizes(con, files["predictions"], sizes)["v1"].rows
        (wide_size,) = read_plan.version_sizes(con, files["predictions"], wide).values()
        guessed = read_plan.version_sizes(con, files["predictions"], wide, sample=0)["v1"].rows
    finally:
        con.close()
    assert abs(narrow_rows - wide_size.rows) < 0.05 * narrow_rows  # the footers: the same rows
    assert guessed == sum(wide.values()) / read_plan.BYTES_PER_ROW_GUESS
    limit = wide_size.rows * read_plan.MEMORY_PER_ROW * 1.5
    assert read_plan.one_pass_versions({"v1": wide_size}, max_rows=limit / read_plan.MEMORY_PER_ROW) == ["v1"]
    assert read_plan.one_pass_versions({"v1": read_plan.VersionSize(FILES, guessed)},
                                       max_rows=limit / read_plan.MEMORY_PER_ROW) == []
    # a version whose file is not Parquet: its rows guessed from its bytes (the query's scan says what is wrong)
    bad = tmp_path / "predictions" / "model_version=v2" / "date=2024-05-01" / part_name(0, "1" * 16)
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"not parquet" * 100)
    files, sizes = sql.list_root(str(tmp_path))
    with duckdb.connect() as con:
        estimates = read_plan.version_sizes(con, files["predictions"], sizes)
    assert estimates["v2"].rows == 1100 / read_plan.BYTES_PER_ROW_GUESS
    assert abs(estimates["v1"].rows - narrow_rows) < 1e-6 * narrow_rows


@pytest.mark.s3
def test_the_plan_of_an_s3_version_costs_no_request(s3_bucket, s3_list_requests, tmp_path, monkeypatch):
    """The file sizes that choose the plan come from the listing s3fs already holds (the recursive
    listing of predictions/): connecting lists as many times with the size rule as without it."""
    from tasks.analysis import read_plan
    from tasks.core import storage

    _write_shards(tmp_path)
    root = f"{s3_bucket}/shards"
    fs, path = storage.filesystem(root)
    fs.put(str(tmp_path / "predictions"), f"{path}/predictions", recursive=True)

    def connect_lists() -> tuple[int, list]:
        fs.invalidate_cache()
        before = len(s3_list_requests)
        con = sql.connect(root, threads=1)
        try:
            chosen = con.execute("SELECT getvariable('one_pass_versions')").fetchone()[0]
        finally:
            con.close()
        return len(s3_list_requests) - before, chosen

    lists, chosen = connect_lists()
    monkeypatch.setattr(read_plan, "one_pass_versions", lambda versions, **limits: [])
    lists_without_rule, _ = connect_lists()
    assert chosen == ["v1"]
    assert lists == lists_without_rule > 0


def _write_manifests(root: Path, splits: dict[str, range]) -> None:
    """One manifest file per split (as ingest writes them), with the columns scored() reads."""
    for split, ids in splits.items():
        path = root / "manifests" / f"{split}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"image_id": pa.array(ids, pa.int64()), "split": [split] * len(ids),
                                 "score_mean": [5.0 + (i % 7) / 10 for i in ids], "score_std": [1.0] * len(ids),
                                 "aspect_ratio": [0.5 + (i % 5) / 4 for i in ids]}), path)


def _prediction_scan_rows(con, query: str, out: Path) -> int:
    """The rows the scans of every prediction file (not the manifests') passed on in ``query``."""
    rows = [s["rows"] for s in _parquet_scans(con, query, out) if int(s.get("Total Files Read", 0)) >= FILES]
    assert rows, "no scan of the prediction files"
    return sum(rows)


@pytest.mark.parametrize("plan", PLANS)
def test_a_small_splits_images_are_picked_at_the_predictions_scan(tmp_path, plan):
    """A split whose manifest holds a small share of the manifests' bytes (read_plan.small_splits: val,
    10% of the images) has its images picked in the predictions' scan, before the latest row per image
    is found; a big one (test, 90%) by the join alone. The answers are the same either way."""
    _write_shards(tmp_path)
    _write_manifests(tmp_path, {"test": range(0, 3600), "val": range(3600, FILES * 100)})
    con = sql.connect(str(tmp_path), threads=2)
    try:
        use_plan(con, plan)
        assert con.execute("SELECT getvariable('prefiltered_splits')").fetchall() == [(["val"],)]
        query = "SELECT count(*), sum(pred_score), sum(error) FROM scored('v1', NULL, NULL, NULL, '{}')"
        scanned = {s: _prediction_scan_rows(con, query.format(s), tmp_path / f"{s}.json") for s in ("val", "test")}
        got = {s: con.execute(query.format(s)).fetchall() for s in ("val", "test")}
        use_split_filter(con, "join only")
        assert _prediction_scan_rows(con, query.format("val"), tmp_path / "val-join.json") == FILES * 100 + 1
        assert {s: con.execute(query.format(s)).fetchall() for s in ("val", "test")} == got
    finally:
        con.close()
    assert scanned == {"val": 400, "test": FILES * 100 + 1}  # every row of the shards: 4,000 images and the tie
    assert got["val"][0][0] == 400 and got["test"][0][0] == 3600


def test_small_splits_are_those_of_at_most_half_the_manifests_bytes():
    """From the listing's sizes: a lone manifest file (every split in it) is no small split; of three,
    the ones at most half of all bytes are (the images of AVA's test and val splits are 4% each)."""
    from tasks.analysis.read_plan import small_splits

    sizes = {f"/r/manifests/{name}.parquet": size for name, size in (("train", 9_200), ("val", 400), ("test", 400))}
    files = list(sizes)
    assert small_splits(files, sizes) == ["test", "val"]
    assert small_splits(files[:1], sizes) == []
    assert small_splits(files[1:], sizes) == ["test", "val"]  # two halves: each at most half
    assert small_splits(files, {}) == []  # no size listed: no split picked at the scan


def _definitions(con) -> dict[str, str]:
    return dict(con.execute("SELECT function_name, macro_definition FROM duckdb_functions() WHERE function_name "
                            "IN ('chosen_predictions', 'prediction_set_of_images')").fetchall())


def test_a_connection_keeps_only_the_branches_its_variables_take(tmp_path):
    """read_plan.drop_unchosen_branches: DuckDB binds both branches of views.sql's choosers (each a
    read_parquet of every file of the version) before it folds one away, so a connection defines them
    without the branch it never takes; where either may be taken, as views.sql does. The answers are
    those of views.sql's own macros in every case."""
    _write_shards(tmp_path)
    _write_manifests(tmp_path, {"test": range(0, 3600), "val": range(3600, FILES * 100)})
    query = "SELECT count(*), sum(pred_score), sum(error) FROM scored('{}', NULL, NULL, NULL, '{}')"
    con = sql.connect(str(tmp_path), threads=2)
    try:
        # what the listing chose: v1's small files in one pass, val picked at the scan
        assert con.execute("SELECT getvariable('one_pass_versions'), getvariable('prefiltered_splits')"
                           ).fetchall() == [(["v1"], ["val"])]
        kept = _definitions(con)
        assert "latest_by_key" in kept["prediction_set_of_images"]
        assert "latest_by_place" not in kept["prediction_set_of_images"]
        assert "split_at_scan" in kept["chosen_predictions"]  # val may be picked at the scan: both branches
        states = {}
        for plan in PLANS:
            for split_filter in ("join only", "at the scan"):
                use_plan(con, plan)
                use_split_filter(con, split_filter)
                kept = _definitions(con)
                assert (f"latest_by_{'place' if plan == 'latest_by_key' else 'key'}"
                        not in kept["prediction_set_of_images"]), (plan, kept)
                assert ("split_at_scan" in kept["chosen_predictions"]) == (split_filter == "at the scan")
                states[plan, split_filter] = {(v, s): con.execute(query.format(v, s)).fetchall()
                                              for v in ("v1", "v9") for s in ("val", "test")}
        use_plan(con, "latest_by_key", None)
        con.execute("SET VARIABLE prediction_versions = ['v1', 'v2']")  # v2 (no file) by latest_by_place
        choose_branches(con)
        assert "latest_by_place" in _definitions(con)["prediction_set_of_images"]  # as views.sql: both
        con.sql(sql.load_query(sql.VIEWS_FILE).text)  # views.sql's own choosers, both branches each
        kept = _definitions(con)
        # another views.sql (MPEMD_SQL_DIR: an older one, without these macros) keeps its own definitions
        read_plan.drop_unchosen_branches(con, "CREATE OR REPLACE MACRO chosen_predictions(v) AS TABLE SELECT 1")
        assert _definitions(con) == kept
        generic = {(v, s): con.execute(query.format(v, s)).fetchall() for v in ("v1", "v9") for s in ("val", "test")}
    finally:
        con.close()
    assert all(answers == generic for answers in states.values()), (states, generic)
    assert generic["v1", "val"][0][0] == 400 and generic["v1", "test"][0][0] == 3600
    assert generic["v9", "test"][0][0] == 0  # a version without files: nothing, by either plan
