"""The ``mpemd`` console script: ``mpemd sql ...`` goes straight to ``flows.sql_cli``; everything else
to ``flows.cli``, which builds every flow command's flags from its pydantic parameter model.

Why a launcher: ``flows.cli`` imports the parameter models of every flow (and what their defaults
import), which each ``mpemd sql`` call would pay for nothing. ``mpemd sql``'s own command line is
generated from its settings (``flows.sql_cli.SqlParams``), a dataclass, so its path loads no pydantic. The
sql subcommand is the same either way (``flows.cli`` registers ``sql_cli``'s arguments); ``mpemd -v
sql`` takes the full path.

The console script (``entry``) also sets how the process starts and ends: the garbage collector
paused while modules load, and no teardown where the work is done (``end_now``, ``gc.freeze``).
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from typing import NoReturn

from flows import signals


def main(argv: list[str] | None = None, *, end_process: bool = False) -> int:
    """Run one ``mpemd`` command. ``end_process``: the process ends with it (the console script), so
    ``mpemd sql`` may skip tearing DuckDB down (``end_now``)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sql"]:
        from flows import sql_cli

        code = sql_cli.main(argv[1:], close=not end_process)
        if end_process:
            end_now(code)
        return code
    from flows import cli

    return cli.main(argv)


def end_now(code: int) -> NoReturn:
    """Flush the output, remove this process's scratch folders (DuckDB's spill, the empty views) and end the process without the interpreter's
    teardown: freeing a large query's buffers block by block costs more than the kernel taking the
    address space back at once (clang's -disable-free does the same; figures in docs/performance.md,
    "Figures moved from code comments"). Only for a process that is ending anyway."""
    from tasks.core import scratch

    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BrokenPipeError, ValueError):  # a reader that left (| head)
            stream.flush()
    scratch.remove_all()
    os._exit(code)


def entry() -> None:
    """The ``mpemd`` console script. Python's cyclic garbage collector is paused while the command's
    modules load (Prefect, pydantic, torch: about a million objects and no garbage, yet a collection
    walks them every few thousand allocations) until ``flows.cli.resume_gc``, and the heap is frozen at the end so
    the interpreter's last collection skips it: start-up is most of a nightly no-op run
    (docs/performance.md, "Nightly no-op")."""
    gc.disable()
    signals.unwind_on_signals()
    try:
        code = main(end_process=True)
    finally:
        gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    entry()
