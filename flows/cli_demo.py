"""``mpemd demo``: placeholder until the reproduce flow lands (it says so and exits non-zero)."""

from __future__ import annotations

import argparse
import sys


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="run the whole pipeline end to end on a synthetic dataset")
    p.add_argument("--size", default="small", help="demo size: small (default) or large")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    print("mpemd demo: not yet built (the reproduce flow has not landed)", file=sys.stderr)
    return 2
