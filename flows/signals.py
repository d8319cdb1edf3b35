"""How ``mpemd`` stops on Ctrl-C and SIGTERM: it unwinds, and it ends even where it cannot unwind.

Python dies at once on SIGTERM (a supervisor's stop, a container's stop, ``timeout``), which leaves an
output lock to its 5-minute heartbeat and scratch folders behind. Here both signals raise in the main
thread instead (SIGTERM as ``Terminated``, a KeyboardInterrupt), so the run unwinds as from Ctrl-C:
locks released, scratch removed, and ``exit_status`` prints one line and gives 130 or 143.

Unwinding needs the main thread back. DuckDB stops a query on a signal by itself, but then waits in
``Executor::CancelTasks`` for the tasks on its other threads to end on their own: over one ``range()``
of 10^11 rows, 8 Ctrl-Cs in 15 left the process running on (further Ctrl-Cs too). So the handler
interrupts the connections' queries itself (``tasks.analysis.sql.interrupt_queries``: 10 of 10 such
queries stopped within 0.02 s), puts the signal's default back (a second one ends the process at once,
as a user's second Ctrl-C expects). And the first signal, whichever handler takes it, starts a
watchdog that ends the process ``UNWIND_S`` later if it has not ended by then: `mpemd score
--local-dask` sent SIGTERM with its process group (``timeout``, systemd) never ended before, its main
thread waiting on Prefect's report of the crash to a temporary server the signal had taken down.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time

UNWIND_S = 30.0  # a run's unwinding (a lock's DELETE, a Dask cluster's close) takes seconds
_sigterm_received = False  # DuckDB turns the interrupt into an error of its own: which signal it was


class Terminated(KeyboardInterrupt):
    """SIGTERM raised in the main thread as an interrupt: the run unwinds as from Ctrl-C, so its output
    lock is released and its scratch folders removed, and a rerun on any machine goes on at once
    instead of waiting out the lock's heartbeat."""


def exit_status(interrupt: KeyboardInterrupt) -> int:
    """Print the one line for Ctrl-C or SIGTERM and give the exit status (128 + the signal's number)."""
    if isinstance(interrupt, Terminated) or _sigterm_received:
        print("terminated (SIGTERM)", file=sys.stderr)
        return 128 + signal.SIGTERM
    print("interrupted", file=sys.stderr)
    return 128 + signal.SIGINT


def reraise_interrupt(error: Exception) -> None:
    """DuckDB stops a query at Ctrl-C or SIGTERM with an error of its own, in place of the signal's
    exception: "Query interrupted" where it saw the signal, ``duckdb.InterruptException`` where this
    module interrupted the query first. Raise it again as the interrupt it was."""
    if str(error) == "Query interrupted" or type(error).__name__ == "InterruptException":
        raise KeyboardInterrupt from error


def unwind_on_signals() -> None:
    """Ctrl-C and SIGTERM raise in this process's main thread (a signal this process inherited as
    ignored, e.g. SIGINT under ``nohup`` or ``&``, stays ignored). A child forked later behaves as
    without this: Ctrl-C raises KeyboardInterrupt there (torch's loader workers end quietly on it),
    SIGTERM kills it (multiprocessing and Dask stop their workers with it)."""
    main_pid = os.getpid()

    def interrupt(signum: int, frame: object) -> None:
        if os.getpid() != main_pid:
            if signum == signal.SIGINT:
                signal.default_int_handler(signum, frame)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        signal.signal(signum, signal.SIG_DFL)  # a second one ends the process at once
        _interrupt_queries()
        if signum == signal.SIGTERM:
            global _sigterm_received
            _sigterm_received = True
            raise Terminated
        raise KeyboardInterrupt

    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, interrupt)
    _watch_for_signals()


def _watch_for_signals() -> None:
    """Start the watchdog at the first Ctrl-C or SIGTERM, whichever Python handler takes it: while a flow
    runs in this process Prefect's own takes SIGTERM (it reports the crash to its API, and waits on
    it: forever where ``timeout`` or systemd's stop took the temporary server down with the process
    group). Python writes each signal's number to the wakeup fd before any handler runs; a thread
    reads it there. A forked child drops the fd (its signals are not this process's)."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    os.register_at_fork(after_in_child=_drop_wakeup_fd)
    threading.Thread(target=_arm_at_first_signal, args=(read_end,), name="mpemd-signal-watch",
                     daemon=True).start()


def _drop_wakeup_fd() -> None:
    with contextlib.suppress(ValueError):  # forked from a thread not the child's main one: none to drop
        signal.set_wakeup_fd(-1)


def _arm_at_first_signal(read_end: int) -> None:
    while True:
        for signum in os.read(read_end, 64):
            if signum in (signal.SIGINT, signal.SIGTERM):
                _interrupt_queries()  # here too: Prefect's handler would not
                _end_if_still_running(signum)  # this thread becomes the watchdog


def _interrupt_queries() -> None:
    if (sql := sys.modules.get("tasks.analysis.sql")) is not None:  # loaded: a query may be running
        sql.interrupt_queries()


def _end_if_still_running(signum: int) -> None:
    time.sleep(UNWIND_S)
    from tasks.core import scratch

    print(f"mpemd: still stopping {UNWIND_S:.0f} s after {signal.Signals(signum).name}: ending now",
          file=sys.stderr, flush=True)
    scratch.remove_all()  # else the next start's sweep (the lock on them dies with this process)
    os._exit(128 + signum)
