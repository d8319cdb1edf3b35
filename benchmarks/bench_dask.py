"""Per-shard overhead of scoring's Dask fan-out (issue 22 §4), against a real cluster on this machine.

    python -m benchmarks.bench_dask                      # quick: 600 images, shards of 25/100/300
    python -m benchmarks.bench_dask --full --repeat 2    # 4,000 images, shards of 50/200/1000
    python -m benchmarks.bench_dask --api-url http://127.0.0.1:4200/api --scheduler-port 8786

It starts a ``dask scheduler``, ``dask worker --nworkers W --nthreads 1`` and (unless ``--api-url``
names one) a ``prefect server``, all from their CLIs, then runs ``mpemd score`` (this checkout's code)
over the same tiny JPEGs with a tiny checkpoint, so the model is not the cost, at each shard size:
once in-process (one task streams every shard) and once with ``--dask-address`` (one Prefect task run
per shard). Each run is measured as wall time and the CPU (user + sys) of every process: the client
(``wait4``), the scheduler, the workers and the Prefect server (``psutil``, before and after).

The table is followed by a least-squares line per mode, ``cost = fixed + per_shard * shards (+
per_image * images when several --images are given)``; the Dask fan-out's per-shard overhead is the
Dask line's per_shard minus the in-process one (both pay one Parquet part and its compaction per
shard). Every started process is stopped on exit, failures and Ctrl-C included. Not in ``make test``;
``make bench`` skips it (benchmarks/run_all.py: it takes minutes even at its quick size).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import psutil

from benchmarks.scale_stages import DATE, hard_linked, tiny_checkpoint, tiny_jpeg

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
QUICK = (600, [25, 100, 300])
FULL = (4_000, [50, 200, 1_000])


@dataclass(frozen=True)
class Point:
    mode: str  # "in-process" or "dask"
    images: int
    shard_size: int
    shards: int
    wall: float
    cpu: dict[str, float]  # user + sys seconds per process group
    load: float  # 1-minute load average when the run started

    @property
    def total_cpu(self) -> float:
        return sum(self.cpu.values())


def _cpu(proc: subprocess.Popen | None) -> float:
    """User + sys seconds of a started process and its descendants: the live ones, and through
    ``children_*`` those they reaped (e.g. a shard's decoding processes on a worker)."""
    if proc is None:
        return 0.0
    try:
        root = psutil.Process(proc.pid)
        total = 0.0
        for p in [root, *root.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
            except psutil.NoSuchProcess:
                pass
        return total
    except psutil.NoSuchProcess:
        return 0.0


class Services:
    """The scheduler, the workers and maybe a Prefect server; each in its own process group."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.folder, self.env = folder, env
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = (self.folder / f"{name}.log").open("wb")
        self.procs[name] = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True, cwd=REPO)
        return self.procs[name]

    def cpu(self) -> dict[str, float]:
        return {name: _cpu(p) for name, p in self.procs.items()}

    def stop(self) -> None:
        """SIGTERM each group we started (a nanny takes its workers down), SIGKILL what is left."""
        for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
            for proc in self.procs.values():
                if proc.poll() is None:
                    with suppress(ProcessLookupError):  # our own group: start_new_session made pgid == pid
                        os.killpg(proc.pid, sig)
            deadline = time.monotonic() + wait
            for proc in self.procs.values():
                with suppress(subprocess.TimeoutExpired):
                    proc.wait(max(0.1, deadline - time.monotonic()))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(what: str, ok: Callable[[], bool], proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} while starting")
        try:
            if ok():
                return
        except OSError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"{what} did not start in {timeout:.0f}s")


def _health(url: str) -> bool:
    with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
        return r.status == 200


def _workers_up(address: str, n: int) -> bool:
    from distributed import Client

    with Client(address, timeout=10) as client:
        return len(client.scheduler_info(n_workers=-1)["workers"]) >= n


@contextmanager
def cluster(folder: Path, workers: int, api_url: str | None, prefect_port: int, scheduler_port: int
            ) -> Iterator[tuple[Services, str, dict[str, str]]]:
    """Started services, the scheduler's address and the environment runs share; all stopped on exit."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(folder / "prefect-home"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    services = Services(folder, env)
    try:
        if api_url is None:
            port = prefect_port or _free_port()
            api_url = f"http://127.0.0.1:{port}/api"
            server = services.start("prefect-server", [str(BIN / "prefect"), "server", "start", "--host",
                                                       "127.0.0.1", "--port", str(port), "--no-ui"])
            _wait_for("prefect server", lambda: _health(api_url), server, 300)
        env["PREFECT_API_URL"] = api_url
        address = f"tcp://127.0.0.1:{scheduler_port or _free_port()}"
        scheduler = services.start("scheduler", [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port",
                                                 address.rsplit(":", 1)[1], "--no-dashboard"])
        worker = services.start("workers", [str(BIN / "dask"), "worker", address, "--nworkers", str(workers),
                                            "--nthreads", "1", "--no-dashboard", "--memory-limit", "4GB"])
        _wait_for("dask scheduler", lambda: _workers_up(address, 0), scheduler, 120)
        _wait_for(f"{workers} dask workers", lambda: _workers_up(address, workers), worker, 180)
        yield services, address, env
    finally:
        services.stop()


def score(services: Services, env: dict[str, str], bucket: Path, ckpt: str, out: Path, images: int,
          shard_size: int, address: str | None, decode_workers: int = 0) -> Point:
    """One ``mpemd score`` run into a fresh ``out``; checks it scored every image in the expected shards."""
    argv = [sys.executable, "-m", "flows.launch", "score", str(bucket), "--checkpoint", ckpt, "--out", str(out),
            "--date", DATE, "--device", "cpu", "--num-workers", str(decode_workers), "--batch-size", "64",
            "--shard-size", str(shard_size)] + (["--dask-address", address] if address else [])
    load = os.getloadavg()[0]
    before = services.cpu()
    start = time.perf_counter()
    with (out.parent / f"{out.name}.stdout").open("w+b") as stdout, (out.parent / f"{out.name}.stderr").open("w+b") as stderr:
        proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=stdout, stderr=stderr)
        try:
            _, status, usage = os.wait4(proc.pid, 0)  # the client's own CPU, and its children's
        except BaseException:  # SIGTERM or Ctrl-C of the benchmark: the client goes too
            proc.kill()
            proc.wait()
            raise
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        after = services.cpu()
        stdout.seek(0), stderr.seek(0)
        text, errors = stdout.read().decode(), stderr.read().decode()
    if proc.returncode:
        raise RuntimeError(f"mpemd score failed ({proc.returncode}):\n{errors[-3000:]}")
    summary = json.loads(text[text.index("{\n"):])
    shards = math.ceil(images / shard_size)
    assert (summary["scored"], summary["shards"]) == (images, shards), summary
    cpu = {name: after[name] - before[name] for name in after}
    cpu["client"] = usage.ru_utime + usage.ru_stime
    return Point("dask" if address else "in-process", images, shard_size, shards, wall, cpu, load)


def fit(points: list[Point], value: str) -> dict[str, float]:
    """Least squares of ``value`` ("wall" or "cpu") on [1, shards] (+ images when they vary)."""
    several = len({p.images for p in points}) > 1
    x = np.array([[1.0, p.shards] + ([p.images] if several else []) for p in points])
    y = np.array([p.wall if value == "wall" else p.total_cpu for p in points])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    names = ["fixed", "per_shard"] + (["per_image"] if several else [])
    return dict(zip(names, coef.tolist(), strict=True))


def table(points: list[Point]) -> str:
    groups = sorted({k for p in points for k in p.cpu})
    head = ["mode", "images", "shard size", "shards", "wall s", "CPU s", *[f"{g} CPU s" for g in groups], "load 1m"]
    rows = [[p.mode, str(p.images), str(p.shard_size), str(p.shards), f"{p.wall:.1f}", f"{p.total_cpu:.1f}",
             *[f"{p.cpu.get(g, 0.0):.1f}" for g in groups], f"{p.load:.2f}"] for p in points]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def report(points: list[Point]) -> str:
    out = [table(points), ""]
    fits = {(mode, v): fit([p for p in points if p.mode == mode], v)
            for mode in ("in-process", "dask") for v in ("wall", "cpu")}
    for (mode, value), coef in fits.items():
        out.append(f"{mode:10s} {value:4s}: " + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in coef.items()))
    for value in ("wall", "cpu"):
        extra = fits[("dask", value)]["per_shard"] - fits[("in-process", value)]["per_shard"]
        out.append(f"Dask per-shard overhead ({value}): {extra * 1000:.0f} ms per shard")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help=f"{FULL[0]} images, shards of {FULL[1]}")
    parser.add_argument("--images", type=int, nargs="+", help="bucket sizes (default: quick or --full's)")
    parser.add_argument("--shard-sizes", type=int, nargs="+", help="shard sizes (default: quick or --full's)")
    parser.add_argument("--workers", type=int, default=2, help="dask worker processes, one thread each")
    parser.add_argument("--decode-workers", type=int, default=0,
                        help="mpemd score --num-workers (0: decode in the scoring process, as the scale benchmark)")
    parser.add_argument("--repeat", type=int, default=1, help="times each point is run (interleaved)")
    parser.add_argument("--api-url", help="a running Prefect API (default: start a prefect server)")
    parser.add_argument("--prefect-port", type=int, default=0, help="the started server's port (0: any free)")
    parser.add_argument("--scheduler-port", type=int, default=0, help="the scheduler's port (0: any free)")
    parser.add_argument("--workdir", type=Path, help="scratch folder (default: a temporary one, removed)")
    args = parser.parse_args(argv)
    sizes = args.images or [(FULL if args.full else QUICK)[0]]
    shard_sizes = args.shard_sizes or (FULL if args.full else QUICK)[1]

    folder = Path(tempfile.mkdtemp(prefix="bench-dask-", dir=args.workdir))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # cleanup (finally blocks) on a kill too
    try:
        ckpt = tiny_checkpoint(folder / "tiny.pt")
        blob = tiny_jpeg(64, 48)
        buckets = {}
        for n in sorted({*sizes, 8}):
            buckets[n] = folder / f"bucket-{n}"
            hard_linked(buckets[n], [f"{i // 1000:05d}/{i + 1}.jpg" for i in range(n)], blob)
        with cluster(folder, args.workers, args.api_url, args.prefect_port, args.scheduler_port) as (svc, addr, env):
            # Warm-up, not measured: each worker imports torch and loads the model once; the server's DB.
            for a in (None, addr):
                score(svc, env, buckets[8], ckpt, folder / "out", 8, 1, a, args.decode_workers)
                shutil.rmtree(folder / "out")
            points = []
            for _ in range(args.repeat):
                for n in sizes:
                    for s in shard_sizes:
                        for a in (None, addr):
                            point = score(svc, env, buckets[n], ckpt, folder / "out", n, s, a, args.decode_workers)
                            shutil.rmtree(folder / "out")  # each run scores the whole bucket afresh
                            print(f"{point.mode:10s} images {n} shard size {s}: {point.wall:.1f} s wall, "
                                  f"{point.total_cpu:.1f} s CPU, load {point.load:.2f}", flush=True)
                            points.append(point)
        print(f"\n{args.workers} dask workers x 1 thread; CPU = user + sys of every process; load "
              f"{os.getloadavg()[0]:.2f} at the end\n")
        print(report(points))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
