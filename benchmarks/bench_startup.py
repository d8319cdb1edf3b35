"""Start-up cost of the ``mpemd`` CLI: what a user waits for before any work.

Prints the wall time (median of ``--repeat`` fresh processes) of

- ``mpemd --help``, ``mpemd sql --list`` and an argument error (goal < 1 s: no torch, no Prefect);
- ``mpemd sql prediction_sets`` over a 1,000-row root (the fixed cost of every query);
- a flow command that does almost no work (``mpemd synth-ava --n 1``), three ways: the CLI with no
  Prefect API (runs the flow function in-process), the CLI against a running ``prefect server``
  (``PREFECT_API_URL`` set; ``--server`` starts one for the measurement), and the flow called as
  before this change, which starts Prefect's temporary server (goal for the CLI < 2 s);
- ``python -c "import torch"`` and ``import prefect`` for scale.

    .venv/bin/python -m benchmarks.bench_startup --repeat 3 --server
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _env(api: str = "") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_URL")}
    env["PREFECT_API_URL"] = api
    return env


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(argv: list[str], env: dict[str, str], repeat: int) -> tuple[float, float, int]:
    """Median wall and CPU (user+sys, the process and its children) seconds of ``repeat`` runs, and
    the last exit code. On a busy machine wall grows with the load; CPU much less."""
    walls, cpus, code = [], [], 0
    for _ in range(repeat):
        cpu, start = _cpu(), time.perf_counter()
        done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, timeout=600)
        walls.append(time.perf_counter() - start)
        cpus.append(_cpu() - cpu)
        code = done.returncode
    return statistics.median(walls), statistics.median(cpus), code


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(home: Path) -> tuple[subprocess.Popen, str, float]:
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = _env() | {"PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    "PREFECT_UI_ENABLED": "false"}
    start = time.perf_counter()
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    while time.perf_counter() - start < 180:
        try:
            urllib.request.urlopen(f"{api}/health", timeout=2).read()
            return server, api, time.perf_counter() - start
        except OSError:
            time.sleep(0.25)
    server.kill()
    raise TimeoutError("prefect server did not start")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--server", action="store_true", help="also measure against a running prefect server")
    args = p.parse_args()
    mpemd = [str(BIN / "mpemd")] if (BIN / "mpemd").exists() else [sys.executable, "-m", "flows.cli"]
    py = sys.executable
    rows: list[tuple[str, float, float, int]] = []
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "synth")
        from benchmarks.scale_stages import write_history

        write_history(Path(tmp) / "history", 1_000)
        cases = {
            "mpemd --help": [*mpemd, "--help"],
            "mpemd sql --list": [*mpemd, "sql", "--list"],
            "mpemd sql prediction_sets (1,000 rows)": [*mpemd, "sql", "prediction_sets", "--root",
                                                       str(Path(tmp) / "history"), "--format", "csv"],
            "mpemd score (argument error)": [*mpemd, "score", "src"],
            "python -c 'import torch'": [py, "-c", "import torch"],
            "python -c 'import prefect'": [py, "-c", "import prefect"],
            "mpemd synth-ava --n 1 (no API: in-process)": [*mpemd, "synth-ava", "--out", out, "--n", "1"],
            "synth_ava_flow(n=1) (no API: temporary server, as before)":
                [py, "-c", f"from flows.synth_ava import synth_ava_flow; synth_ava_flow(out={out!r}, n=1)"],
        }
        for name, argv in cases.items():
            rows.append((name, *timed(argv, _env(), args.repeat)))
        if args.server:
            server, api, boot = start_server(Path(tmp) / "prefect-home")
            try:
                rows.append(("prefect server start (until healthy, once)", boot, float("nan"), 0))
                rows.append(("mpemd synth-ava --n 1 (PREFECT_API_URL: running server)",
                             *timed([*mpemd, "synth-ava", "--out", out, "--n", "1"], _env(api), args.repeat)))
            finally:
                server.terminate()
                server.wait(timeout=30)
    width = max(len(r[0]) for r in rows)
    print(f"{'command':<{width}}  {'wall s':>7}  {'cpu s':>6}  exit")
    for name, seconds, cpu, code in rows:
        print(f"{name:<{width}}  {seconds:7.2f}  {cpu:6.2f}  {code}")
    print(f"(median of {args.repeat}; {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
