"""Scratch folders (DuckDB's spill, the empty views): gone after any exit, and after a kill at the next start."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PREFIX = "mpemd-test-scratch-"
# Makes its folder, says where, and waits for stdin to close (then exits normally).
HOLDER = ("import sys; from tasks.core import scratch; "
          f"print(scratch.process_folder({PREFIX!r}), flush=True); sys.stdin.read()")


def _env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(REPO)}


def _holder(tmp: Path) -> tuple[subprocess.Popen[str], Path]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER], env=_env(tmp), cwd=REPO, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    return proc, Path(proc.stdout.readline().strip())


def _mpemd_folders(tmp: Path) -> list[str]:
    return sorted(p.name for p in tmp.iterdir() if p.name.startswith("mpemd-"))


def test_a_killed_owners_folder_goes_at_the_next_start_a_live_ones_stays(tmp_path: Path) -> None:
    killed, killed_folder = _holder(tmp_path)
    live, live_folder = _holder(tmp_path)
    (killed_folder / "spilled.bin").write_bytes(b"x" * 1000)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed_folder.is_dir()  # a kill runs no clean-up of its own

    third, third_folder = _holder(tmp_path)
    assert not killed_folder.exists()
    assert live_folder.is_dir() and (live_folder / ".owner").is_file()
    for proc in (live, third):
        proc.communicate("")
        assert proc.returncode == 0
    assert not live_folder.exists() and not third_folder.exists()  # a normal exit removes its own


def test_a_folder_without_an_owner_file_goes_only_once_a_day_old(tmp_path: Path) -> None:
    old, young = tmp_path / f"{PREFIX}old", tmp_path / f"{PREFIX}young"
    for folder in (old, young):
        folder.mkdir()
    day_ago = time.time() - 25 * 3600
    os.utime(old, (day_ago, day_ago))
    other = tmp_path / "someone-elses-folder"
    other.mkdir()
    os.utime(other, (day_ago, day_ago))

    proc, folder = _holder(tmp_path)
    proc.communicate("")
    assert not old.exists()
    assert young.is_dir() and other.is_dir()


def test_mpemd_sql_leaves_no_folder_and_removes_a_killed_queries_folders(tmp_path: Path) -> None:
    root = tmp_path / "empty-root"
    root.mkdir()
    scratch_tmp = tmp_path / "tmp"
    scratch_tmp.mkdir()
    # A query process killed mid-life: its spill folder and its empty views' folder stay behind.
    query = ("import sys; from tasks.analysis import sql; "
             f"con = sql.connect({str(root)!r}); con.execute('SELECT count(*) FROM predictions').fetchall(); "
             "print('ready', flush=True); sys.stdin.read()")
    killed = subprocess.Popen([sys.executable, "-c", query], env=_env(scratch_tmp), cwd=REPO, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert killed.stdout is not None and killed.stdout.readline().strip() == "ready"
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    left = _mpemd_folders(scratch_tmp)
    assert any(n.startswith("mpemd-duckdb-spill-") for n in left), left
    assert any(n.startswith("mpemd-empty-views-") for n in left), left

    # The command a user types (it ends with os._exit, no atexit): removes those, and leaves none of its own.
    done = subprocess.run([sys.executable, "-m", "flows.launch", "sql", "prediction_sets", "--root", str(root),
                           "--format", "csv"],
                          env=_env(scratch_tmp), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert _mpemd_folders(scratch_tmp) == []

