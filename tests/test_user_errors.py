"""User errors get one clear line: a wrong path, an unknown version, an ambiguous prediction set.

Each is run as a user runs it (``python -m flows.cli ...`` in a subprocess): it must exit non-zero
with a short stderr that says what is wrong and what exists. What cannot succeed (a missing file,
permission denied) is never retried. Metrics of tiny bins carry a caveat.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.analysis import sql
from tasks.core.errors import (
    MissingPathError,
    UnknownChoiceError,
    UserError,
    is_retryable,
    missing_path,
    retry_condition,
)
from tests.analysis_fixture import MPEMD_VERSION, NIMA_VERSION, write_root
from tests.scoring_fixtures import make_checkpoint, write_images

REPO = Path(__file__).resolve().parents[1]
MAX_STDERR_LINES = 3  # one line of error, room for a warning a library prints on import


def mpemd(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("PREFECT_API_URL", None)
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=cwd or REPO)


def assert_one_line_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    err = proc.stderr.strip()
    assert proc.returncode != 0, (proc.stdout, err)
    assert "Traceback" not in err, err
    assert 1 <= len(err.splitlines()) <= MAX_STDERR_LINES, err
    for word in words:
        assert word in err, (word, err)
    return err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "model.pt"
    make_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def analysis_root(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = str(tmp_path_factory.mktemp("analysis") / "root")
    write_root(root)
    return root


def test_a_typod_checkpoint_path_is_one_line_naming_what_exists(tmp_path, checkpoint):
    write_images(tmp_path / "imgs", 2)
    typo = checkpoint.parent / "modle.pt"
    proc = mpemd("score", str(tmp_path / "imgs"), "--checkpoint", str(typo), "--out", str(tmp_path / "out"))
    assert_one_line_error(proc, str(typo), "does not exist", "model.pt")
    assert not (tmp_path / "out").exists()


def test_a_missing_source_folder_is_one_line_and_never_retried(tmp_path, checkpoint):
    (tmp_path / "photos").mkdir()
    proc = mpemd("score", str(tmp_path / "photoz"), "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out"))
    err = assert_one_line_error(proc, "source", "does not exist", "photos")
    assert "retry" not in (proc.stdout + err).lower()


def test_analyze_errors_on_a_mistyped_root_says_the_root_does_not_exist(analysis_root):
    """Not "no ok predictions ... the root holds: []": the root itself is the typo."""
    typo = analysis_root + "t"
    proc = mpemd("analyze-errors", "--root", typo, "--nima-version", NIMA_VERSION, "--mpemd-version", MPEMD_VERSION)
    err = assert_one_line_error(proc, f"data root {typo} does not exist", "root")
    assert proc.returncode == 2 and "retry" not in (proc.stdout + err).lower()


def test_an_unknown_model_version_exits_non_zero_listing_the_versions(analysis_root):
    proc = mpemd("sql", "errors_by_aspect_bin", "--root", analysis_root, "--param", "model_version=0124")
    assert_one_line_error(proc, "0124", NIMA_VERSION, MPEMD_VERSION)
    assert proc.stdout == ""  # no all-NULL table


def test_two_prediction_sets_of_one_version_are_refused_as_ambiguous(analysis_root):
    # The fixture scored MPEMD_VERSION twice (grid and random patches): picking one silently is wrong.
    proc = mpemd("analyze-errors", "--root", analysis_root, "--nima-version", NIMA_VERSION,
                 "--mpemd-version", MPEMD_VERSION)
    assert_one_line_error(proc, MPEMD_VERSION, "grid", "random", "pick one")


def test_tiny_bins_carry_a_caveat_on_their_correlations(analysis_root):
    con = sql.connect(analysis_root, threads=1)
    try:
        rows = sql.run_query(con, "errors_by_aspect_bin", {"model_version": NIMA_VERSION}).to_pylist()
    finally:
        con.close()
    for row in rows:
        if 0 < row["n"] < 10:
            assert row["caveat"] and "unreliable" in row["caveat"], row
        else:
            assert row["caveat"] is None, row
    assert any(0 < r["n"] < 10 for r in rows) and any(r["n"] >= 10 for r in rows)  # both kinds were seen


def test_what_cannot_succeed_is_never_retried():
    from prefect.states import Failed

    for exc in (missing_path("source", "/nope/x"), PermissionError("denied"), UnknownChoiceError("v"),
                FileNotFoundError("gone")):
        assert not is_retryable(exc)
        assert retry_condition(None, None, Failed(data=exc)) is False
    not_found, throttled = OSError("404"), OSError("429 Too Many Requests")
    not_found.status, throttled.status = 404, 429  # as aiohttp's and HTTP clients' errors carry it
    assert not is_retryable(not_found) and retry_condition(None, None, Failed(data=not_found)) is False
    for exc in (TimeoutError("slow"), ConnectionResetError("reset"), OSError("503 Slow Down"), throttled):
        assert is_retryable(exc)
        assert retry_condition(None, None, Failed(data=exc)) is True
    assert isinstance(missing_path("source", "/nope"), FileNotFoundError | UserError)


def test_the_flows_stages_use_the_rule():
    from flows import analyze_errors, ingest_ava, score_bucket

    for stage in (score_bucket.list_task, score_bucket.plan_task, score_bucket.score_shard_task,
                  score_bucket.score_shards_task, score_bucket.compact_task, analyze_errors.collect_task,
                  analyze_errors.write_task, ingest_ava.fetch_images_task):
        assert stage.retry_condition_fn is retry_condition and stage.retries == 2, stage.name


def test_missing_path_messages_show_the_nearest_folder(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "nima-20260101").mkdir()
    err = missing_path("run", str(tmp_path / "runs" / "nima-20260102" / "checkpoint-best.pt"))
    assert isinstance(err, MissingPathError) and "nima-20260101" in str(err) and "\n" not in str(err)
    err = missing_path("source", "/definitely/not/here")
    assert "does not exist" in str(err)


def test_ingest_with_a_typod_labels_file_or_images_folder_is_one_line(tmp_path):
    (tmp_path / "AVA.txt").write_text("1 910001 0 1 5 17 38 36 15 6 5 1 1 22 1396\n")
    (tmp_path / "images").mkdir()
    proc = mpemd("ingest", "--labels", str(tmp_path / "AVA.tx"), "--images", str(tmp_path / "images"),
                 "--root", str(tmp_path / "root"))
    assert_one_line_error(proc, "labels file", "does not exist", "AVA.txt")
    # Was: every image rejected one by one as "missing", and exit 0.
    proc = mpemd("ingest", "--labels", str(tmp_path / "AVA.txt"), "--images", str(tmp_path / "imagez"),
                 "--root", str(tmp_path / "root"))
    assert_one_line_error(proc, "images folder", "does not exist", "images")
    assert not (tmp_path / "root" / "manifests").exists()
