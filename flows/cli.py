"""The ``mpemd`` command line. Each flow command is generated from the flow's parameter model
(``flows/params.py``: one flag per field, with its type, default and description) and runs that same
flow, so the CLI and ``prefect deployment run`` share one code path. ``mpemd --help`` lists the
commands; ``mpemd <command> --help`` explains each.

Building the parser imports neither torch nor Prefect: a flow's module is imported only to run it.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import logging
import sys
import traceback
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ValidationError

from flows import signals
from flows.params import (
    AnalyzeErrorsParams,
    CompactParams,
    DemoParams,
    IngestParams,
    ReproduceParams,
    ScoreBucketParams,
    SynthAvaParams,
    TrainMpemdParams,
    TrainNimaParams,
)
from tasks.core.cli_args import (
    Alias,
    CliSpec,
    HelpFormatter,
    ParameterError,
    Parser,
    add_model_arguments,
    check_inputs,
    model_from_args,
)
from tasks.training.presets import TRAIN_CLI


@dataclass(frozen=True)
class Command:
    """A subcommand: its parameter model, and the function of ``module`` that runs it (imported late)."""

    name: str
    model: type[BaseModel]
    module: str
    help: str
    spec: CliSpec = field(default_factory=CliSpec)
    run: str = "cli_run"


_DATASET = {"labels": "labels file", "images": "images folder"}  # named as tasks/ingest says them
_SIDES = {f"{side}.model_version": f"--{side}-version" for side in ("nima", "mpemd")}

# In the order ``--help`` lists them.
COMMANDS: tuple[Command, ...] = (
    Command("reproduce", ReproduceParams, "flows.reproduce",
            "the paper protocol end to end (synthesizes data if none given)",
            CliSpec(flags={"split_fractions": "--split", "overrides": "--set", "mpemd_overrides": "--mpemd-set"},
                    inputs=_DATASET, aliases=(Alias("--seed", ("synth_seed", "split_seed"), "sets --synth-seed and --split-seed"),))),
    Command("demo", DemoParams, "flows.reproduce",
            "run the whole pipeline on a synthetic AVA (the embedded default)", run="cli_demo"),
    Command("synth-ava", SynthAvaParams, "flows.synth_ava",
            "write a synthetic AVA-format dataset (labels + JPEGs)"),
    Command("ingest", IngestParams, "flows.ingest_ava",
            "ingest AVA (labels + image mirror) into manifests (flow ingest-ava)",
            CliSpec(flags={"split_fractions": "--split"}, inputs=_DATASET,
                    aliases=(Alias("--reference", ("mode",), "same as --mode reference", const="reference"),))),
    Command("train-nima", TrainNimaParams, "flows.train_nima",
            "stage 1: train NIMA (writes {root}/runs/<run_id>)", TRAIN_CLI),
    Command("train-mpemd", TrainMpemdParams, "flows.train_mpemd",
            "stage 2: fine-tune MPEMD from a stage-1 run or checkpoint", TRAIN_CLI),
    Command("score", ScoreBucketParams, "flows.score_bucket",
            "score new and changed images of a bucket/folder into Parquet (flow score-bucket)",
            CliSpec(positional=("source",), flags={"use_local_dask": "--local-dask"},
                    inputs={"source": "source", "checkpoint": "checkpoint"})),
    Command("analyze-errors", AnalyzeErrorsParams, "flows.analyze_errors",
            "NIMA vs MPEMD error report by aspect ratio",
            CliSpec(flags={"report_name": "--name", "bin_edges": "--bins", **_SIDES},
                    filled=("nima.label", "mpemd.label"), inputs={"root": "data root"})),
)
# Built the same way, but not flows: storage upkeep that needs no run records and no Prefect start-up.
TOOLS: tuple[Command, ...] = (
    Command("compact", CompactParams, "flows.compact_cli",
            "merge each date= partition's part files into one (what score does at the end of a run)",
            CliSpec(inputs={"out": "predictions root"})),
)

def build_parser(commands: tuple[Command, ...] = (*COMMANDS, *TOOLS)) -> argparse.ArgumentParser:
    parser = Parser(
        prog="mpemd",
        description="Aspect-ratio-preserving multi-patch aesthetics scoring (MPEMD): ingest AVA, "
        "train NIMA then MPEMD, bulk-score image buckets, analyse errors per aspect ratio.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging; tracebacks of errors")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in commands:
        p = subparsers.add_parser(command.name, help=command.help, description=command.model.__doc__,
                                  formatter_class=HelpFormatter)
        add_model_arguments(p, command.model, command.spec)
        p.set_defaults(func=_runner(command))
    from flows import sql_cli

    sql_cli.register_cli(subparsers)
    return parser


class BadParameters(Exception):
    """A flag value the parameter model refused (the message names the flag and the value)."""


def _runner(command: Command) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            params = model_from_args(args, command.model, command.spec)
        except ParameterError as e:
            raise BadParameters(f"{e}; see `mpemd {command.name} --help`") from e.__cause__
        check_inputs(params, command.spec)  # a missing path answers before the imports below
        module = importlib.import_module(command.module)  # Prefect, torch: only now
        resume_gc()  # the work that follows makes garbage: collect it (flows.launch.entry paused it)
        if not args.verbose:
            _quiet_prefect_tracebacks()
        return int(getattr(module, command.run)(params) or 0)

    return run


def resume_gc() -> None:
    """After the command's modules are loaded: freeze what they made (out of every later collection)
    and collect again from here on. Only where ``flows.launch.entry`` paused the collector: a process
    that calls ``main`` itself (tests, an embedding program) keeps its collector as it was."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def _quiet_prefect_tracebacks() -> None:
    """Drop the traceback from Prefect's console log of a failed run (main prints one line instead);
    the records sent to the API keep it."""
    if "prefect" not in sys.modules:
        return
    from prefect.logging.handlers import PrefectConsoleHandler

    for name in ("prefect", "prefect.flow_runs", "prefect.task_runs"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, PrefectConsoleHandler):
                handler.addFilter(_strip_traceback)


def _strip_traceback(record: logging.LogRecord) -> bool:
    record.exc_info, record.exc_text = None, None
    return True


def _configure_logging(verbose: bool) -> None:
    """Log lines on stderr; without -v no HTTP chatter and no tracebacks in logged failures (the
    error is printed once, in one line). Records reach Prefect's API handlers before this one."""
    root = logging.getLogger()
    if root.handlers:  # the caller (a test, an embedding program) configured logging: leave it
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:
        logging.getLogger("httpx").setLevel(logging.WARNING)
        handler.addFilter(_strip_traceback)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt as interrupt:  # Ctrl-C, or SIGTERM (flows.signals.Terminated)
        return signals.exit_status(interrupt)
    except Exception as error:
        if not _is_user_error(error):
            from tasks.core.errors import unreachable_line

            if args.verbose or (line := unreachable_line(error)) is None:
                raise
            print(f"mpemd: error: {line}", file=sys.stderr)  # not the user's typo, maybe: exit 1, not 2
            return 1
        if args.verbose:
            traceback.print_exc()
        from tasks.core.errors import error_line  # loaded by _is_user_error already

        print(f"mpemd: error: {error_line(error)}", file=sys.stderr)
        return 2


def _is_user_error(error: BaseException) -> bool:
    """User errors get one line on stderr and exit 2 (the traceback only with -v): a bad flag value,
    ``tasks.core.errors.UserError``, a missing file, permission denied, no S3 credentials."""
    from tasks.core.errors import is_user_error  # storage imports: only once something failed

    if isinstance(error, (BadParameters, ValidationError)) or is_user_error(error):
        return True
    if "prefect" in sys.modules:
        from prefect.exceptions import ParameterTypeError

        return isinstance(error, ParameterTypeError)
    return False


if __name__ == "__main__":
    sys.exit(main())
