"""The ``mpemd`` command line: ``--help`` lists every subcommand and each one's ``--help`` works.

Subcommands are discovered from ``flows.cli.build_parser`` at collection time (nested ones too),
so a flow that registers a new command is tested here without editing this file.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import COMMAND_MODULES, build_parser, main


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


COMMANDS = _command_paths(build_parser())
TOP_LEVEL = [path[0] for path in COMMANDS if len(path) == 1]


def test_every_command_module_registers_something():
    assert len(TOP_LEVEL) >= len(COMMAND_MODULES)
    assert len(set(TOP_LEVEL)) == len(TOP_LEVEL)


def _mpemd_command() -> list[str]:
    script = shutil.which("mpemd", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "flows.cli"]


@pytest.mark.slow  # a fresh process imports every flow (Prefect, torch): seconds
def test_console_script_help_lists_every_subcommand():
    out = subprocess.run([*_mpemd_command(), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: mpemd")
    for name in TOP_LEVEL:
        assert name in out.stdout, f"{name!r} missing from mpemd --help"


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_subcommand_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([*command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: mpemd {' '.join(command)}")
    assert "-h, --help" in out


@pytest.mark.parametrize("command", [c for c in COMMANDS if len(c) == 1], ids=" ".join)
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


def test_bad_invocations_exit_with_usage(capsys):
    for argv in ([], ["no-such-command"]):
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2
        assert "usage: mpemd" in capsys.readouterr().err
