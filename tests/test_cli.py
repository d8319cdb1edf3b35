"""The ``mpemd`` command line: generated from the flows' parameter models, light to start, one line
per user error.

Subcommands are discovered from ``flows.cli.build_parser`` at collection time (nested ones too),
so a flow that registers a new command is tested here without editing this file.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import shutil
import subprocess
import sys
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from flows.cli import COMMANDS, TOOLS, build_parser, main
from tasks.core.cli_args import _plain, flag_names, model_values

REPO = Path(__file__).resolve().parents[1]


def _subparser_actions(parser: argparse.ArgumentParser) -> list[argparse._SubParsersAction]:
    return [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]


def _command_paths(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every command path, e.g. ("train-nima",), ("sql", "run"), depth first."""
    paths = []
    for action in _subparser_actions(parser):
        for name, sub in action.choices.items():
            paths.append((*prefix, name))
            paths.extend(_command_paths(sub, (*prefix, name)))
    return paths


PATHS = _command_paths(build_parser())
TOP_LEVEL = [path[0] for path in PATHS if len(path) == 1]


def _mpemd_command() -> list[str]:
    script = shutil.which("mpemd", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "flows.cli"]


def _env_without_api() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"} | {"PREFECT_API_URL": ""}


def test_every_command_is_listed_once():
    assert len(set(TOP_LEVEL)) == len(TOP_LEVEL)
    assert {c.name for c in (*COMMANDS, *TOOLS)} | {"sql"} == set(TOP_LEVEL)


def test_console_script_help_lists_every_subcommand():
    out = subprocess.run([*_mpemd_command(), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: mpemd")
    for name in TOP_LEVEL:
        assert name in out.stdout, f"{name!r} missing from mpemd --help"


@pytest.mark.parametrize("command", PATHS, ids=" ".join)
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([*command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: mpemd {' '.join(command)}")
    assert "-h, --help" in out


@pytest.mark.parametrize("command", [c for c in PATHS if len(c) == 1], ids=" ".join)
def test_subcommand_has_a_one_line_summary(command, capsys):
    """``mpemd --help`` shows a help string for each command, not just its name."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.strip().startswith(command[0] + " ")
                or line.strip() == command[0])
    summary = line.strip()[len(command[0]):].strip()
    if not summary:  # argparse wraps long names: the summary is on the next line
        lines = out.splitlines()
        summary = lines[lines.index(line) + 1].strip()
    assert summary, f"{command[0]} has no help text"


def test_bad_invocations_exit_with_one_line(capsys):
    cases = {(): "mpemd: error: the following arguments are required: COMMAND; see `mpemd --help`",
             ("no-such-command",): "mpemd: error: unknown command no-such-command; see `mpemd --help`"}
    for argv, line in cases.items():
        with pytest.raises(SystemExit) as info:
            main(list(argv))
        assert info.value.code == 2
        assert capsys.readouterr().err.splitlines() == [line]


# --- generated from the models -------------------------------------------------------------------


def _fields(model: type[BaseModel], prefix: str = "") -> dict[str, Any]:
    """Field path -> FieldInfo, nested models flattened."""
    out = {}
    for name, info in model.model_fields.items():
        inner = _plain(info.annotation)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            out.update(_fields(inner, f"{prefix}{name}."))
        else:
            out[prefix + name] = info
    return out


def _sample(path: str, info: Any) -> tuple[list[str], Any]:
    """Command-line words that set a field to a value other than its default, and that value."""
    plain = _plain(info.annotation)
    if typing.get_origin(plain) in (typing.Union, types.UnionType):  # int | "none" | None: the int
        plain = typing.get_args(plain)[0]
    if typing.get_origin(plain) is typing.Annotated:  # Annotated[int, Ge(1)]: the int
        plain = typing.get_args(plain)[0]
    origin = typing.get_origin(plain)
    default = None if info.is_required() else info.get_default(call_default_factory=True)
    if plain is bool:
        return [], not default  # the flag word (--x or --no-x) is added by the caller
    if origin is typing.Literal:
        choice = next(c for c in typing.get_args(plain) if c != default)
        return [str(choice)], choice
    if origin is dict and path.endswith("overrides"):  # checked against TrainConfig's fields
        return ["epochs=1", "loss=avg"], {"epochs": "1", "loss": "avg"}
    if origin is dict:
        return ["alpha=1", "beta=two"], {"alpha": "1", "beta": "two"}
    if origin in (list, tuple):
        values = list(default)[::-1] if default else ["random"]
        return [",".join(map(str, values))], tuple(values) if origin is tuple else values
    special = {"date": "2026-01-02", "preset": "cpu", "bin_edges": "0,1,inf", "split": "val",
               "typical_bin": "0-1", "report_name": "name2", "best_metric": "lcc"}
    if path.split(".")[-1] in special:
        value = special[path.split(".")[-1]]
        return [value], value
    if path.split(".")[-1] == "head_dropout":  # a rate in [0, 1)
        return ["0.5"], 0.5
    if plain in (int, float):
        value = plain((default or 0) + 3)
        return [str(value)], value
    return ["text-value"], "text-value"


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.name)
def test_every_model_field_is_reachable_from_the_cli(command):
    """Each field of the flow's model has a flag (or positional) that sets it to the value given."""
    flags = flag_names(command.model, command.spec)
    fields = _fields(command.model)
    assert set(flags) == set(fields)
    argv: list[str] = [command.name]
    expected = {}
    for path, info in fields.items():
        words, value = _sample(path, info)
        flag = flags[path]
        if _plain(info.annotation) is bool:
            argv.append(flag if value else "--no-" + flag[2:])
        elif path in command.spec.positional:
            argv.extend(words)
        else:
            argv.extend(w for word in words for w in (flag, word))
        expected[path] = value
    args = build_parser().parse_args(argv)
    params = command.model(**model_values(args, command.model, command.spec))
    for path, value in expected.items():
        got = params
        for part in path.split("."):
            got = getattr(got, part)
        assert got == value, f"{command.name} {flags[path]}: {got!r} != {value!r}"


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: c.name)
def test_help_shows_every_field_description(command, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([command.name, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for path, info in _fields(command.model).items():
        assert info.description, f"{command.name}: {path} has no description"
        assert " ".join(info.description.split()) in text, f"{command.name} --help lacks {path}'s description"
        assert flag_names(command.model, command.spec)[path] in text


def test_old_command_lines_still_parse():
    """Flags of the hand-written CLI this replaced, as README and scripts use them."""
    cases = {
        ("ingest", "--labels", "a", "--images", "b", "--reference", "--split", "0.5,0.25,0.25",
         "--split-files", "val=v.txt"): {"mode": "reference", "split_fractions": (0.5, 0.25, 0.25),
                                          "split_files": {"val": "v.txt"}},
        ("reproduce", "--seed", "4", "--set", "epochs=2", "--split", "0.6,0.2,0.2", "--fresh"):
            {"synth_seed": 4, "split_seed": 4, "overrides": {"epochs": "2"}, "fresh": True},
        ("score", "src", "--checkpoint", "c", "--out", "o", "--no-amp", "--local-dask"):
            {"source": "src", "amp": False, "use_local_dask": True},
        ("train-mpemd", "--init", "latest", "--no-resume", "--run-id", "r"): {"resume": False, "run_id": "r"},
        ("analyze-errors", "--root", "r", "--nima-version", "a", "--mpemd-version", "b", "--name", "x",
         "--split", "all", "--bins", "0,1,inf"): {"report_name": "x", "split": None, "bin_edges": "0,1,inf"},
    }
    by_name = {c.name: c for c in COMMANDS}
    for argv, want in cases.items():
        command = by_name[argv[0]]
        params = command.model(**model_values(build_parser().parse_args(list(argv)), command.model, command.spec))
        assert {k: getattr(params, k) for k in want} == want, argv
    analyze = by_name["analyze-errors"]
    args = build_parser().parse_args(["analyze-errors", "--root", "r", "--nima-version", "a", "--mpemd-version", "b"])
    params = analyze.model(**model_values(args, analyze.model, analyze.spec))
    assert (params.nima.label, params.mpemd.label) == ("NIMA", "MPEMD")


# --- the flows take one parameter per setting ------------------------------------------------------


def _flow(command) -> Any:
    module = importlib.import_module(command.module)
    return next(v for v in vars(module).values()
                if getattr(getattr(v, "fn", None), "params_model", None) is command.model)


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.name != "demo"], ids=lambda c: c.name)
def test_flow_parameters_are_the_model_fields(command):
    from prefect.utilities.callables import parameter_schema

    flow = _flow(command)
    assert list(inspect.signature(flow.fn).parameters) == list(command.model.model_fields)
    schema = parameter_schema(flow.fn).model_dump()
    for name, info in command.model.model_fields.items():
        assert schema["properties"][name].get("description") == info.description, name
    assert set(schema["required"]) == {n for n, i in command.model.model_fields.items() if i.is_required()}


def test_every_deployment_parameter_set_is_valid_for_its_flow():
    """infra/prefect.yaml: flat parameters, one key per setting, each accepted by the flow's model."""
    spec = yaml.safe_load((REPO / "infra" / "prefect.yaml").read_text())
    for deployment in spec["deployments"]:
        path, name = deployment["entrypoint"].split(":")
        flow = getattr(importlib.import_module(path.removesuffix(".py").replace("/", ".")), name)
        model = flow.fn.params_model
        parameters = deployment.get("parameters", {})
        assert set(parameters) <= set(model.model_fields), deployment["name"]
        model.model_validate({**{k: "x" for k, i in model.model_fields.items() if i.is_required()}, **parameters})


# --- start-up and errors ------------------------------------------------------------------------------

PROBE = """
import json, sys
from flows.cli import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
heavy = [m for m in ("torch", "prefect", "pandas") if m in sys.modules]
print(json.dumps({"code": code, "heavy": heavy}), file=sys.stderr)
"""


def _probe(*argv: str) -> tuple[dict[str, Any], str]:
    out = subprocess.run([sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120,
                         cwd=REPO, env=_env_without_api())
    lines = out.stderr.strip().splitlines()
    return json.loads(lines[-1]), out.stdout + "\n".join(lines[:-1])


@pytest.mark.parametrize(("argv", "code"), [(["--help"], 0), (["score", "--help"], 0), (["sql", "--list"], 0),
                                            (["score", "src"], 2), (["score", "src", "--checkpoint", "c", "--out",
                                                                     "o", "--n-patches", "0"], 2)],
                         ids=lambda v: " ".join(v) if isinstance(v, list) else str(v))
def test_help_sql_and_argument_errors_import_neither_torch_nor_prefect(argv, code):
    result, output = _probe(*argv)
    assert result["heavy"] == [], output
    assert result["code"] == code, output


def test_bad_flag_value_is_one_line_naming_the_flag():
    result, output = _probe("score", "src", "--checkpoint", "c", "--out", "o", "--n-patches", "0")
    assert result["code"] == 2
    assert output.strip().splitlines() == ["mpemd: error: --n-patches 0: wants a value >= 1; see `mpemd score --help`"]


def _run_cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*_mpemd_command(), *argv], capture_output=True, text=True, timeout=300, cwd=REPO,
                          env=env or _env_without_api())


@pytest.mark.slow  # a real flow command: imports torch and Prefect
def test_missing_checkpoint_is_one_line_without_traceback(tmp_path):
    (tmp_path / "src").mkdir()
    argv = ["score", str(tmp_path / "src"), "--checkpoint", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "o")]
    out = _run_cli(*argv)
    assert out.returncode == 2, out.stderr
    errors = [line for line in out.stderr.splitlines() if "error" in line.lower()]
    assert errors and errors[-1].startswith("mpemd: error: ") and "nope.pt" in errors[-1], out.stderr
    assert "Traceback" not in out.stderr
    verbose = _run_cli("-v", *argv)
    assert verbose.returncode == 2 and "Traceback" in verbose.stderr


@pytest.mark.slow
def test_user_error_through_prefect_prints_no_prefect_traceback(prefect_harness, tmp_path):
    """With an API configured the flow runs in Prefect, whose failure log must not add a traceback."""
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": str(PREFECT_API_URL.value())}
    (tmp_path / "src").mkdir()
    out = _run_cli("score", str(tmp_path / "src"), "--checkpoint", str(tmp_path / "nope.pt"), "--out",
                   str(tmp_path / "o"), env=env)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith("mpemd: error: "), out.stderr


def test_a_quoted_argument_reaches_the_task_whole_in_a_direct_run_and_in_a_prefect_run(prefect_harness):
    """flows call tasks with quote(listing): Prefect then skips visiting 10^4 objects one by one. Both
    run modes must hand the task the list itself, not the wrapper."""
    from prefect import flow, task
    from prefect.utilities.annotations import quote

    from flows import runtime

    @task
    def measure(objects: list[dict], scale: int) -> tuple[str, int]:
        return type(objects).__name__, len(objects) * scale

    @flow
    def outer(n: int) -> tuple[str, int]:
        rows = [{"uri": f"u{i}"} for i in range(n)]
        return runtime.run_step(measure, quote(rows), scale=2)

    token = runtime._DIRECT.set(True)
    try:
        assert runtime.run_step(measure, quote([{}, {}]), scale=quote(3)) == ("list", 6)
    finally:
        runtime._DIRECT.reset(token)
    assert outer(n=5) == ("list", 10)  # a Prefect run (the harness's API)


def test_the_shared_task_options_retry_a_hiccup_under_prefect_never_a_missing_file(prefect_harness):
    """TASK_OPTIONS: Prefect retries a transient error and fails a missing file at once; a direct
    run (no Prefect API) calls the function once."""
    from prefect import flow, task

    from flows import runtime

    attempts = []

    @task(**runtime.TASK_OPTIONS | {"retry_delay_seconds": 0})
    def flaky(kind: type[Exception]) -> str:
        attempts.append(kind)
        if len(attempts) == 1:
            raise kind("first attempt fails")
        return "ok"

    @flow
    def outer(kind: str) -> str:
        return runtime.run_step(flaky, {"ConnectionError": ConnectionError, "FileNotFoundError": FileNotFoundError}[kind])

    assert outer("ConnectionError") == "ok" and len(attempts) == 2
    attempts.clear()
    with pytest.raises(FileNotFoundError):
        outer("FileNotFoundError")
    assert len(attempts) == 1
    attempts.clear()
    token = runtime._DIRECT.set(True)
    try:
        with pytest.raises(ConnectionError):
            runtime.run_step(flaky, ConnectionError)
        assert len(attempts) == 1
    finally:
        runtime._DIRECT.reset(token)


@pytest.mark.slow
def test_flow_command_without_an_api_starts_no_server(tmp_path):
    probe = PROBE.replace('heavy = [m for m in ("torch", "prefect", "pandas") if m in sys.modules]',
                          'heavy = [m for m in ("prefect.server.api.server",) if m in sys.modules]')
    out = subprocess.run([sys.executable, "-c", probe, "synth-ava", "--out", str(tmp_path / "s"), "--n", "3"],
                         capture_output=True, text=True, timeout=300, cwd=REPO, env=_env_without_api())
    result = json.loads(out.stderr.strip().splitlines()[-1])
    assert result == {"code": 0, "heavy": []}, out.stderr
    assert len(list((tmp_path / "s" / "images").iterdir())) == 3


@pytest.mark.slow
def test_unchanged_bucket_rerun_imports_no_torch_and_an_overwritten_checkpoint_reloads(tmp_path):
    """The nightly no-op plans from the checkpoint cache: no torch, no weights read. A checkpoint
    overwritten in place (new weights) is a cache miss: its new model_version scores everything."""
    from tests.scoring_fixtures import make_checkpoint, write_images

    write_images(tmp_path / "src", 3)
    ckpt = tmp_path / "model.pt"
    first_version = make_checkpoint(ckpt, seed=0)
    env = _env_without_api() | {"MPEMD_CACHE_DIR": str(tmp_path / "cache")}
    probe = PROBE.replace('("torch", "prefect", "pandas")', '("torch",)').replace(
        'print(json.dumps({"code": code, "heavy": heavy}), file=sys.stderr)',
        'print(json.dumps({"code": code, "heavy": heavy}), file=sys.stderr)\nsys.exit(code)')
    argv = [sys.executable, "-c", probe, "score", str(tmp_path / "src"), "--checkpoint", str(ckpt),
            "--out", str(tmp_path / "out"), "--date", "2026-01-02"]

    def run() -> tuple[dict[str, Any], dict[str, Any]]:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        summary = json.loads(done.stdout[done.stdout.index("{"):])
        return summary, json.loads(done.stderr.strip().splitlines()[-1])

    summary, probe_result = run()
    assert summary["scored"] == 3 and probe_result["heavy"] == ["torch"]
    summary, probe_result = run()
    assert (summary["scored"], summary["skipped_unchanged"], summary["model_version"]) == (0, 3, first_version)
    assert probe_result["heavy"] == []
    second_version = make_checkpoint(ckpt, seed=1)
    summary, _ = run()
    assert second_version != first_version
    assert (summary["model_version"], summary["scored"]) == (second_version, 3)


def _readme_command_lines() -> list[list[str]]:
    """Every ``mpemd ...`` command line in the code blocks of README and docs/ (continuations joined,
    comments cut)."""
    import re
    import shlex

    text = "\n".join(p.read_text() for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))])
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("mpemd "):
                lines.append(shlex.split(line.replace("<", "").replace(">", ""))[1:])
    return lines


@pytest.mark.parametrize("argv", _readme_command_lines(), ids=" ".join)
def test_readme_command_lines_parse_and_validate(argv):
    args = build_parser().parse_args(argv)
    command = next((c for c in COMMANDS if c.name == args.command), None)
    if command is not None:
        command.model(**model_values(args, command.model, command.spec))


def test_sql_with_an_unknown_model_version_is_one_line_listing_the_stored_ones(tmp_path, capsys):
    from flows import sql_cli
    from tests.analysis_fixture import write_root

    write_root(str(tmp_path))
    code = sql_cli.main(["errors_by_aspect_bin", "--root", str(tmp_path), "--param", "model_version=nope"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("mpemd: error: model_version=nope"), err


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])  # parquet: bytes, not text on stdout
def test_a_sql_query_imports_neither_torch_prefect_nor_pandas(tmp_path, fmt):
    """pandas alone is 0.14 s of every ``mpemd sql`` call; pyarrow loads it behind Python-list arrays
    and ``Schema.empty_table``. The root has no rejected.parquet, so the empty-file path runs too."""
    from tests.analysis_fixture import NIMA_VERSION, write_root

    write_root(str(tmp_path))
    (tmp_path / "manifests" / "rejected.parquet").unlink()
    result, output = _probe("sql", "errors_by_aspect_bin", "--root", str(tmp_path), "--param",
                            f"model_version={NIMA_VERSION}", "--format", fmt, "--bins", "0,0.7,1.2,inf")
    assert result["code"] == 0, output
    assert result["heavy"] == [], output


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
def test_mpemd_sql_over_an_ingested_root_loads_neither_pyarrow_nor_numpy(tmp_path, fmt):
    """DuckDB writes the answer of the console script's sql path itself: pyarrow (and the numpy it loads)
    was ~0.08 s of every call. A root without a file the views need (a stand-in is written) loads it."""
    from tests.analysis_fixture import NIMA_VERSION, write_root

    write_root(str(tmp_path))
    probe = ("import json, sys\nfrom flows.launch import main\ncode = main(sys.argv[1:])\n"
             "print(json.dumps({'code': code, 'loaded': [m for m in ('pyarrow', 'numpy', 'pandas', 'torch', "
             "'prefect') if m in sys.modules]}), file=sys.stderr)")
    ran = subprocess.run([sys.executable, "-c", probe, "sql", "errors_by_aspect_bin", "--root", str(tmp_path),
                          "--param", f"model_version={NIMA_VERSION}", "--format", fmt],
                         capture_output=True, text=True, timeout=120, cwd=REPO, env=_env_without_api())
    assert json.loads(ran.stderr.strip().splitlines()[-1]) == {"code": 0, "loaded": []}, ran.stderr
    assert "all" in ran.stdout


@pytest.mark.parametrize(("argv", "code"), [(["--list"], 0), (["errors_by_aspect_bin", "--param", "model_version=0123"], 0),
                                            (["prediction_sets", "--format", "xml"], 2)],
                         ids=["list", "query", "bad-flag"])
def test_mpemd_sql_loads_no_pydantic(tmp_path, argv, code):
    """``mpemd sql``'s settings are a dataclass and its flags are typed by argparse: pydantic (and the
    scan of every installed package's entry points its plugin loader makes) was ~0.06 CPU-s of a call."""
    from tests.analysis_fixture import write_root

    write_root(str(tmp_path))
    probe = ("import json, sys\nfrom flows.launch import main\ntry:\n    code = main(sys.argv[1:])\n"
             "except SystemExit as e:\n    code = e.code\n"
             "print(json.dumps({'code': code, 'loaded': [m for m in ('pydantic', 'pydantic_core')"
             " if m in sys.modules]}), file=sys.stderr)")
    ran = subprocess.run([sys.executable, "-c", probe, "sql", *argv, "--root", str(tmp_path)], capture_output=True,
                         text=True, timeout=120, cwd=REPO, env=_env_without_api())
    assert json.loads(ran.stderr.strip().splitlines()[-1]) == {"code": code, "loaded": []}, ran.stderr


def test_the_console_script_runs_sql_without_the_flow_commands_parser(tmp_path):
    """``mpemd sql`` skips importing flows.cli (every flow's parameter model); it prints what the full
    parser's sql subcommand prints."""
    probe = ("import json, sys\nfrom flows.launch import main\ncode = main(sys.argv[1:])\n"
             "print(json.dumps({'code': code, 'loaded': [m for m in ('flows.cli', 'flows.params')"
             " if m in sys.modules]}), file=sys.stderr)")
    fast = subprocess.run([sys.executable, "-c", probe, "sql", "--list"], capture_output=True, text=True,
                          timeout=120, cwd=REPO, env=_env_without_api())
    assert json.loads(fast.stderr.strip().splitlines()[-1]) == {"code": 0, "loaded": []}, fast.stderr
    full = subprocess.run([sys.executable, "-m", "flows.cli", "sql", "--list"], capture_output=True, text=True,
                          timeout=120, cwd=REPO, env=_env_without_api())
    assert full.returncode == 0 and fast.stdout == full.stdout and "errors_by_aspect_bin" in fast.stdout
    missing = subprocess.run([sys.executable, "-c", probe, "sql", "nope"], capture_output=True, text=True,
                             timeout=120, cwd=REPO, env=_env_without_api())
    assert missing.stderr.startswith("mpemd: error: no query named 'nope'"), missing.stderr


def test_the_console_script_ends_sql_without_teardown_and_loses_nothing(tmp_path, capfd):
    """``mpemd`` (flows.launch.entry) ends ``mpemd sql`` with os._exit, skipping DuckDB's teardown: the
    output is still whole (same bytes as the in-process command), the exit code is the command's, and
    the DuckDB spill folder, which atexit would have removed, is gone."""
    from flows import sql_cli
    from tests.analysis_fixture import NIMA_VERSION, write_root

    write_root(str(tmp_path / "root"))
    spill_parent = tmp_path / "tmp"
    spill_parent.mkdir()
    env = {**_env_without_api(), "TMPDIR": str(spill_parent)}
    entry = [sys.executable, "-c", "from flows.launch import entry; entry()", "sql", "errors_by_aspect_bin",
             "--root", str(tmp_path / "root"), "--format", "json"]
    ran = subprocess.run([*entry, "--param", f"model_version={NIMA_VERSION}"], capture_output=True, text=True,
                         timeout=120, cwd=REPO, env=env)
    assert sql_cli.main(["errors_by_aspect_bin", "--root", str(tmp_path / "root"), "--format", "json",
                         "--param", f"model_version={NIMA_VERSION}"]) == 0
    # DuckDB writes the JSON itself, to file descriptor 1
    assert ran.returncode == 0 and ran.stdout == capfd.readouterr().out and '"bin":"all"' in ran.stdout
    unknown = subprocess.run([*entry, "--param", "model_version=nope"], capture_output=True, text=True,
                             timeout=120, cwd=REPO, env=env)
    assert unknown.returncode == 2 and unknown.stderr.startswith("mpemd: error: model_version=nope")
    assert list(spill_parent.iterdir()) == []


def test_a_command_runs_with_the_garbage_collector_on_after_the_console_script_paused_it(tmp_path, monkeypatch):
    """flows.launch.entry pauses the collector while modules load; the command itself (a training run
    of hours) must run with it on, or its reference cycles would pile up. A caller that never paused it
    (this test process, an embedding program) gets no freeze."""
    import gc

    import flows.compact_cli as compact_cli

    seen: list[bool] = []
    monkeypatch.setattr(compact_cli, "cli_run", lambda params: seen.append(gc.isenabled()) or 0)
    frozen = gc.get_freeze_count()
    assert main(["compact", "--out", str(tmp_path)]) == 0
    assert seen == [True] and gc.get_freeze_count() == frozen  # nothing frozen: the collector was on
    gc.disable()
    try:
        assert main(["compact", "--out", str(tmp_path)]) == 0
        assert seen == [True, True] and gc.isenabled() and gc.get_freeze_count() > frozen
    finally:
        gc.enable()
        gc.unfreeze()


def test_sql_on_a_root_that_does_not_exist_is_one_line_naming_it(tmp_path, capsys):
    from flows import sql_cli

    code = sql_cli.main(["errors_by_aspect_bin", "--root", str(tmp_path / "typo"), "--param", "model_version=v"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith(f"mpemd: error: data root {tmp_path / 'typo'} does not exist")


def test_analyze_errors_prints_its_comparison_as_duckdbs_table(tmp_path, capsys, monkeypatch):
    """The comparison on stdout is rendered by DuckDB (as ``mpemd sql``'s tables): one row per bin."""
    from tests.analysis_fixture import MPEMD_VERSION, NIMA_VERSION, write_root

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    write_root(str(tmp_path / "root"))
    assert main(["analyze-errors", "--root", str(tmp_path / "root"), "--nima-version", NIMA_VERSION,
                 "--mpemd-version", MPEMD_VERSION, "--mpemd-patch-mode", "grid"]) == 0
    out = capsys.readouterr().out.rstrip("\n").splitlines()
    lines = out[next(i for i, line in enumerate(out) if line.startswith("┌")):]  # after the headline
    assert lines[-1].startswith("└") and len({len(line) for line in lines}) == 1
    bins = [line.split("│")[1].strip() for line in lines[4:-1]]
    assert bins[-1] == "all" and len(bins) > 2
