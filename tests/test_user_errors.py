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


def test_a_file_that_is_no_checkpoint_or_an_out_that_is_a_file_is_one_line(tmp_path, checkpoint):
    """`--checkpoint AVA.txt` (any file torch cannot load) and `--out` naming an existing file: one line
    naming the path, exit 2 (were: 63 and 44 lines of traceback, the first naming an in-memory buffer and
    quoting torch's advice to load with weights_only=False, which would run the file's code)."""
    write_images(tmp_path / "imgs", 2)
    (labels := tmp_path / "AVA.txt").write_text("1 1 0 0 0 0 0 0 0 0 0 1 0 0 1\n")
    proc = mpemd("score", str(tmp_path / "imgs"), "--checkpoint", str(labels), "--out", str(tmp_path / "out"))
    err = assert_one_line_error(proc, f"cannot load checkpoint {labels}: not a checkpoint this code reads")
    assert proc.returncode == 2 and "weights_only=False" not in err, err
    (afile := tmp_path / "afile").write_text("")
    proc = mpemd("score", str(tmp_path / "imgs"), "--checkpoint", str(checkpoint), "--out", str(afile))
    err = assert_one_line_error(proc, "File exists", str(afile))
    assert proc.returncode == 2, err


def test_a_path_on_a_server_that_cannot_be_reached_says_so():
    """fsspec's HTTP ``exists`` answers False where the server cannot be reached: the "does not exist"
    line then says that its server cannot be reached (was: "cannot list its folder (ClientConnectorError)")."""
    import socket

    with socket.socket() as probe:  # a port nothing listens on once the socket is closed
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}/photos/"
    message = str(missing_path("source", url))
    assert message.startswith(f"source {url} does not exist; its server cannot be reached (ClientConnectorError: ")


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


def test_a_missing_model_version_parameter_lists_the_stored_versions(analysis_root, tmp_path):
    """`mpemd sql errors_by_aspect_bin --root R` without the version: the line lists what R holds (was:
    only "is required"), or says that R does not exist."""
    proc = mpemd("sql", "errors_by_aspect_bin", "--root", analysis_root)
    assert_one_line_error(proc, "parameter 'model_version' is required", "stored model versions: ", NIMA_VERSION,
                          MPEMD_VERSION)
    proc = mpemd("sql", "compare_models", "--root", str(tmp_path / "nope"))
    assert_one_line_error(proc, "parameter 'nima_version' is required", f"data root {tmp_path / 'nope'} does not exist")


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


# --- the CLI as people type it: the installed console script, exact output ----------------------------

CONSOLE_SCRIPT = Path(sys.executable).parent / "mpemd"  # flows.launch.entry, as pip installed it
# Without an installed script (a bare checkout): the same entry function, called the same way.
MPEMD = ([str(CONSOLE_SCRIPT)] if CONSOLE_SCRIPT.exists()
         else [sys.executable, "-c", "import sys; from flows.launch import entry; sys.exit(entry())"])


def console(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None,
            python_flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    command = [sys.executable, *python_flags, *MPEMD] if python_flags and MPEMD[0] != sys.executable else MPEMD
    base = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {"PYTHONPATH": str(REPO)}
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=300,
                          env=env or base, cwd=cwd or REPO)


def assert_exact_error(proc: subprocess.CompletedProcess, line: str) -> None:
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", line + "\n")


@pytest.mark.parametrize(("argv", "line"), [
    (["train-nima", "--root", "R", "--preset", "cpu-smoke", "--set", "epochs=five"],
     "mpemd: error: --set epochs=five: wants an integer; see `mpemd train-nima --help`"),
    (["train-nima", "--root", "R", "--epochs", "0"],
     "mpemd: error: --epochs 0: wants a value >= 1; see `mpemd train-nima --help`"),
    (["train-mpemd", "--set", "loss=sum"],
     "mpemd: error: --set loss=sum: wants 'ada' or 'avg'; see `mpemd train-mpemd --help`"),
    (["train-nima", "--set", "learning_rate=0.1"],
     "mpemd: error: --set learning_rate=0.1: unknown setting; see `mpemd train-nima --help`"),
    (["score", "x", "--checkpoint", "c", "--out", "o", "--n-patches", "abc"],
     "mpemd: error: --n-patches abc: wants an integer; see `mpemd score --help`"),
    (["score", "x", "--chekpoint", "c", "--out", "o"],
     "mpemd: error: unknown option --chekpoint (did you mean --checkpoint?); see `mpemd score --help`"),
    (["scroe", "x", "--checkpoint", "c", "--out", "o"],
     "mpemd: error: unknown command scroe (did you mean score?); see `mpemd --help`"),
    (["score", "x", "--out", "o"],
     "mpemd: error: the following arguments are required: --checkpoint; see `mpemd score --help`"),
    (["score", "x", "--checkpoint", "c", "--out", "o", "--decode", "gpx"],
     "mpemd: error: argument --decode: invalid choice: 'gpx' (choose from 'cpu', 'gpu'); "
     "see `mpemd score --help`"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else "")
def test_a_mistyped_command_line_is_one_exact_line_naming_the_commands_help(argv, line):
    assert_exact_error(console(*argv), line)


def test_a_path_that_does_not_exist_is_answered_before_torch_or_prefect_load(tmp_path):
    (tmp_path / "photos").mkdir()
    argv = ["score", str(tmp_path / "photoz"), "--checkpoint", "c", "--out", str(tmp_path / "out")]
    assert_exact_error(console(*argv), f"mpemd: error: source {tmp_path}/photoz does not exist; "
                                       f"{tmp_path} holds: photos")
    if MPEMD[0] == sys.executable:
        pytest.skip("no console script to run under -X importtime")
    loaded = console(*argv, python_flags=("-X", "importtime")).stderr.splitlines()
    imported = {line.rsplit("|", 1)[-1].strip() for line in loaded if line.startswith("import time:")}
    assert "pydantic" in imported and not imported & {"torch", "prefect", "pandas"}
    assert not (tmp_path / "out").exists()


def test_s3_without_credentials_is_one_line_at_once_naming_the_variables(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "PREFECT_API_URL"}
    env |= {"PYTHONPATH": str(REPO), "HOME": str(tmp_path), "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_CONFIG_FILE": str(tmp_path / "none")}
    proc = console("score", "s3://photos/x/", "--checkpoint", "c", "--out", str(tmp_path / "out"), env=env)
    assert_exact_error(proc, "mpemd: error: no S3 credentials for s3://photos/x/: set AWS_ACCESS_KEY_ID and "
                             "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), and AWS_ENDPOINT_URL_S3 for an S3 store "
                             "other than AWS")


@pytest.mark.slow  # a real flow command: imports torch and Prefect
def test_an_unreachable_storage_endpoint_is_one_line_without_traceback(tmp_path, checkpoint):
    """A mistyped AWS_ENDPOINT_URL (nothing listens there): after the client's own retries, one line that
    names the endpoint and says what to check, exit 1 (it may be the network, not the user); -v keeps
    the traceback."""
    import socket

    with socket.socket() as probe:  # a port nothing listens on once the socket is closed
        probe.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{probe.getsockname()[1]}"
    env = {**{k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}, "PYTHONPATH": str(REPO),
           "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y",
           "AWS_MAX_ATTEMPTS": "1"}  # (botocore's own retries: 4 s of backoff a command otherwise)
    sql_argv = ["sql", "prediction_sets", "--root", "s3://nowhere/root"]
    for argv in (sql_argv, ["score", "s3://nowhere/in", "--checkpoint", str(checkpoint), "--out", str(tmp_path)]):
        err = assert_one_line_error(proc := console(*argv, env=env), "cannot reach the storage endpoint", endpoint)
        assert proc.returncode == 1 and err.splitlines()[-1].startswith("mpemd: error: "), err
    verbose = console("-v", *sql_argv, env=env)
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr


def test_a_url_fsspec_cannot_open_is_one_line_naming_the_package_or_the_protocol_meant():
    """"any fsspec URL": one whose package is not installed (gs:// without gcsfs) or a typo'd protocol
    is the user's setup, one line and exit 2 (was: fsspec's ImportError / ValueError with a traceback)."""
    from fsspec.registry import get_filesystem_class, known_implementations

    def not_installed(protocol: str) -> bool:
        try:
            get_filesystem_class(protocol)
        except ImportError:
            return True
        return False

    absent = next(p for p in sorted(known_implementations) if p.isalpha() and not_installed(p))
    err = assert_one_line_error(proc := console("sql", "prediction_sets", "--root", f"{absent}://b/root"),
                                f"mpemd: error: {absent}://b/root: ", "install")
    assert proc.returncode == 2, err
    err = assert_one_line_error(proc := console("sql", "prediction_sets", "--root", "s4://b/root"),
                                "mpemd: error: s4://b/root: unknown storage protocol s4://; did you mean s3://")
    assert proc.returncode == 2, err


def test_a_model_file_that_cannot_be_used_is_a_user_error_never_retried():
    """A file that is no checkpoint, or ImageNet weights neither cached nor downloadable (offline) nor
    given: the user's setup, one line at the command line (was: a traceback of 53-63 lines)."""
    from model.checkpoint import CheckpointError
    from model.networks import WeightsUnavailableError
    from tasks.core.errors import is_user_error

    for exc in (CheckpointError("not a checkpoint"), WeightsUnavailableError("not cached, cannot be downloaded")):
        assert is_user_error(exc) and not is_retryable(exc)


def test_missing_s3_credentials_inside_a_run_are_never_retried_and_one_line():
    """Where the check before the run cannot see it (a deployment, a profile that lost its keys):
    botocore's own error is a user error, not a transient one."""
    from botocore.exceptions import NoCredentialsError, PartialCredentialsError
    from prefect.states import Failed

    from tasks.core.errors import error_line, is_user_error

    for exc in (NoCredentialsError(), PartialCredentialsError(provider="env", cred_var="AWS_SECRET_ACCESS_KEY")):
        assert is_user_error(exc) and not is_retryable(exc)
        assert retry_condition(None, None, Failed(data=exc)) is False
        assert "AWS_ENDPOINT_URL_S3" in error_line(exc) and "\n" not in error_line(exc)


def test_training_on_a_root_without_a_dataset_is_one_line_naming_what_to_run(tmp_path):
    """Without ``--synth-if-missing`` an empty root is the user's to fill: one line that says how, exit 2,
    and no run folder made."""
    root = tmp_path / "empty"
    root.mkdir()
    proc = console("train-nima", "--root", str(root), "--preset", "cpu-smoke")
    assert_exact_error(proc, f"mpemd: error: no ingested dataset under {root}: {root}/manifests/train.parquet does "
                       f"not exist; make one with `mpemd synth-ava --out {root}/synth && mpemd ingest --labels "
                       f"{root}/synth/AVA.txt --images {root}/synth/images --root {root}` (or ingest AVA itself)")
    assert list(root.iterdir()) == []
