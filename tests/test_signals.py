"""Ctrl-C and SIGTERM (flows/signals.py): a query or a run unwinds (one line, exit 130 / 143, nothing
left behind), and a process that cannot unwind still ends."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_scratch import REPO, _env, _mpemd_folders


def _stop_a_running_query(tmp_path: Path, sig: signal.Signals, delay_s: float) -> subprocess.CompletedProcess[str]:
    """``mpemd sql`` running a query that takes minutes, sent ``sig`` ``delay_s`` after its connection
    began (0: while it sets the views up, in DuckDB statements of their own)."""
    queries = tmp_path / "sql"
    shutil.copytree(REPO / "sql", queries)
    # One range() is one task on one of DuckDB's threads: a signal alone stopped the query but left the
    # process waiting for that task (8 Ctrl-Cs in 15 before flows.signals interrupted the query itself).
    (queries / "slow.sql").write_text("-- purpose: minutes of work\n"
                                      "SELECT count(*) FROM range(100000000000) AS t(x) WHERE x % 7 = 3;\n")
    root, scratch_tmp = tmp_path / "root", tmp_path / "tmp"
    root.mkdir()
    scratch_tmp.mkdir()
    script = Path(sys.executable).parent / "mpemd"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "flows.launch"]
    proc = subprocess.Popen([*command, "sql", "slow", "--root", str(root)], cwd=REPO, text=True,
                            env={**_env(scratch_tmp), "MPEMD_SQL_DIR": str(queries)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            # Ctrl-C's default, even where this suite runs in the background (SIGINT ignored)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        while not any(p.name.startswith("mpemd-duckdb-spill-") for p in scratch_tmp.iterdir()):  # connected
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.01)
        time.sleep(delay_s)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)  # flows.signals' watchdog ends it within 30 s anyway
    finally:
        if proc.poll() is None:  # a failed test leaves no query running (it would for hours)
            proc.kill()
            proc.communicate()
    assert _mpemd_folders(scratch_tmp) == []
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("delay_s", [0.0, 0.3, 0.6])
def test_a_query_sent_sigterm_exits_143_in_one_line(tmp_path: Path, delay_s: float) -> None:
    done = _stop_a_running_query(tmp_path, signal.SIGTERM, delay_s)
    assert (done.returncode, done.stderr) == (143, "terminated (SIGTERM)\n")


@pytest.mark.parametrize("delay_s", [0.0, 0.3, 0.6])
def test_a_query_interrupted_by_ctrl_c_exits_130_in_one_line(tmp_path: Path, delay_s: float) -> None:
    done = _stop_a_running_query(tmp_path, signal.SIGINT, delay_s)
    assert (done.returncode, done.stderr) == (130, "interrupted\n")


# The start of both child scripts: flows.signals with a watchdog of {unwind_s} s, and a foreign SIGTERM
# handler (as Prefect's flow engine installs while a flow runs) for those that install it.
PREAMBLE = """
import os, signal, sys, time
from flows import signals
signals.UNWIND_S = {unwind_s}
signals.unwind_on_signals()

class Foreign(BaseException):
    pass

def foreign(signum, frame):
    raise Foreign
"""
# Stands for a run whose unwinding is stuck in C (DuckDB's CancelTasks): it catches the interrupt and
# blocks again in a read that never returns.
STUCK = PREAMBLE.format(unwind_s=1.0) + """
if sys.argv[1:] == ["foreign"]:  # another handler takes SIGTERM, as Prefect's while a flow runs
    signal.signal(signal.SIGTERM, foreign)
r, w = os.pipe()
try:
    print("ready", flush=True)
    os.read(r, 1)
except (KeyboardInterrupt, Foreign) as e:
    print("unwinding", type(e).__name__, flush=True)
    os.read(r, 1)
"""


_STARTED: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def _no_process_left() -> Iterator[None]:
    """A failed test leaves no stuck child behind (it would block in its read forever)."""
    yield
    while _STARTED:
        if (proc := _STARTED.pop()).poll() is None:
            proc.kill()
            proc.communicate()


def _stuck(sigint_ignored: bool = False, *args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", STUCK, *args], cwd=REPO, env=_env(REPO), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN if sigint_ignored
                                                             else signal.SIG_DFL))
    _STARTED.append(proc)
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    return proc


def test_a_run_stuck_while_unwinding_ends_after_the_watchdogs_wait() -> None:
    proc = _stuck()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert out == "unwinding Terminated\n"
    assert (proc.returncode, err) == (143, "mpemd: still stopping 1 s after SIGTERM: ending now\n")


def test_the_watchdog_ends_a_run_whose_sigterm_another_handler_took() -> None:
    """Prefect's flow engine takes SIGTERM while a flow runs and reports the crash to its API; where the
    API is gone with the process group (``timeout``, systemd), that report waited forever."""
    proc = _stuck(False, "foreign")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert out == "unwinding Foreign\n"
    assert (proc.returncode, err) == (143, "mpemd: still stopping 1 s after SIGTERM: ending now\n")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_ends_a_run_at_once(sig: signal.Signals) -> None:
    proc = _stuck()
    proc.send_signal(sig)
    assert proc.stdout is not None and proc.stdout.readline().startswith("unwinding")
    proc.send_signal(sig)
    proc.communicate(timeout=30)
    assert proc.returncode == -sig


def test_ctrl_c_ignored_by_the_parent_stays_ignored() -> None:
    """``nohup mpemd ... &``: the shell has the job ignore Ctrl-C, and mpemd keeps it so."""
    proc = _stuck(sigint_ignored=True)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert out == "unwinding Terminated\n" and proc.returncode == 143


# A query stopped by SIGTERM that another handler takes (Prefect's, while a flow runs in this process).
FOREIGN_QUERY = PREAMBLE.format(unwind_s=20.0) + """
from tasks.analysis import sql
signal.signal(signal.SIGTERM, foreign)
con = sql.connect(sys.argv[1])
print("ready", flush=True)
try:
    try:
        con.execute("SELECT count(*) FROM range(100000000000) AS t(x) WHERE x % 7 = 3").fetchall()
    except Exception:  # DuckDB's "Query interrupted", or its InterruptException if interrupted first
        time.sleep(1)  # the handler's Foreign, if still pending, is raised here
except Foreign:
    pass
print("stopped", flush=True)
"""


@pytest.mark.parametrize("delay_s", [0.3, 0.6])
def test_a_query_whose_sigterm_another_handler_took_is_interrupted_too(tmp_path: Path, delay_s: float) -> None:
    """The signal watcher interrupts DuckDB's queries itself: else a signal alone can leave the query
    running in DuckDB's CancelTasks until the watchdog ends the process."""
    proc = subprocess.Popen([sys.executable, "-c", FOREIGN_QUERY, str(tmp_path)], cwd=REPO, env=_env(tmp_path),
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _STARTED.append(proc)
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    time.sleep(delay_s)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert "still stopping" not in err and proc.returncode == 0, (proc.returncode, err[-2000:])
    assert out == "stopped\n"
