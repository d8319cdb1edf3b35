"""The ``mpemd`` command line. Each subcommand lives beside its flow (``register_cli`` in
``flows/<name>.py``) and calls that same flow, so the CLI and ``prefect deployment run`` share one
code path. ``mpemd --help`` lists them; ``mpemd <command> --help`` explains each.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Modules that contribute subcommands, in the order ``--help`` lists them.
COMMAND_MODULES: tuple[str, ...] = (
    "flows.reproduce",
    "flows.synth_ava",
    "flows.ingest_ava",
    "flows.train_nima",
    "flows.train_mpemd",
    "flows.score_bucket",
    "flows.analyze_errors",
    "flows.sql_cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpemd",
        description="Aspect-ratio-preserving multi-patch aesthetics scoring (MPEMD): ingest AVA, "
        "train NIMA then MPEMD, bulk-score image buckets, analyse errors per aspect ratio.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register_cli(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
