"""The nightly no-op: score a bucket, then score it again unchanged. Prints first-run vs rerun wall,
user and sys (the rerun should cost < 5% of the first run), two ways:

- ``cli``: ``mpemd score`` as a fresh process each time, no Prefect API configured (the CLI runs the
  flow in-process);
- ``server``: ``prefect deployment run score-bucket/nightly`` against a running ``prefect server``
  with a process worker (deployed from infra/prefect.yaml). Wall is the flow run's own, from the
  API: Pending (the worker starts the run's process) to Completed; user/sys are the worker's children
  (the run's process), measured by stopping a worker started for each run.

The model is mobilenet_v3_small (random weights) at 224 px: a light model makes the first run
short, so the ratio is a conservative one (heavier models make the no-op's share smaller). ``--method
nima`` scores one warped view per image (the worst case for the ratio); ``--method mpemd`` scores the
method this tool is for, |P| = 8 random patches per image, with the same network.

    .venv/bin/python -m benchmarks.bench_noop --images 10000 --mode cli server [--method mpemd]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from benchmarks.bench_load import write_images
from benchmarks.bench_startup import start_server

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DATE = "2026-01-01"


def _children_cpu() -> tuple[float, float]:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime, usage.ru_stime


def _measured(run: Callable[[], dict[str, float]]) -> dict[str, float]:
    user0, sys0 = _children_cpu()
    start = time.perf_counter()
    extra = run() or {}
    user1, sys1 = _children_cpu()
    return {"wall": time.perf_counter() - start, "user": user1 - user0, "sys": sys1 - sys0, **extra}


def _method_settings(method: str) -> dict[str, str]:
    """The scoring flags of ``method`` (the checkpoint was trained as NIMA; MPEMD scores its patches)."""
    return {"method": "nima"} if method == "nima" else {"method": "mpemd", "patch_mode": "random", "n_patches": "8"}


def cli_runs(src: Path, ckpt: str, out: str, workers: int, method: str = "nima") -> list[dict[str, float]]:
    env = {**os.environ, "PREFECT_API_URL": ""}
    argv = [str(BIN / "mpemd"), "score", str(src), "--checkpoint", ckpt, "--out", out, "--date", DATE,
            "--shard-size", "2000", "--num-workers", str(workers)]
    for key, value in _method_settings(method).items():
        argv += [f"--{key.replace('_', '-')}", value]

    def once() -> dict[str, float]:
        done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=7200)
        assert done.returncode == 0, done.stderr[-3000:]
        summary = json.loads(done.stdout[done.stdout.index("{"):])
        return {"scored": summary["scored"], "unchanged": summary["skipped_unchanged"]}

    return [_measured(once), _measured(once)]


def _prefect(args: list[str], env: dict[str, str]) -> str:
    done = subprocess.run([str(BIN / "prefect"), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def _api(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def _stamp(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _stop(worker: subprocess.Popen) -> None:
    """Stop a worker and its children; a worker that ignores SIGTERM (seen once with Prefect 3.9.1, idle
    in its event loop after the signal) is killed after 30 s, so the benchmark still reports."""
    os.killpg(worker.pid, signal.SIGTERM)
    try:
        worker.wait(timeout=30)
    except subprocess.TimeoutExpired:
        print(f"worker {worker.pid} ignored SIGTERM for 30 s: killed", file=sys.stderr)
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=30)


def server_runs(src: Path, ckpt: str, out: str, home: Path, workers: int, method: str = "nima"
                ) -> list[dict[str, float]]:
    server, api, _ = start_server(home)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({"PREFECT_HOME": str(home), "PREFECT_API_URL": api, "MPEMD_REPO_DIR": str(REPO),
                "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    try:
        _prefect(["work-pool", "create", "mpemd-process", "--type", "process"], env)
        _prefect(["--no-prompt", "deploy", "--prefect-file", "infra/prefect.yaml", "--name", "score-bucket/nightly"],
                 env)

        def once() -> dict[str, float]:
            worker = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "mpemd-process"],
                                      cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      start_new_session=True)
            try:
                text = _prefect(["deployment", "run", "score-bucket/nightly", "--param", f"source={src}",
                                 "--param", f"checkpoint={ckpt}", "--param", f"out={out}", "--param", f"date={DATE}",
                                 "--param", f"num_workers={workers}",
                                 *(a for k, v in _method_settings(method).items() for a in ("--param", f"{k}={v}"))],
                                env)
                run_id = text.split("UUID:")[1].split()[0]
                while (run := _api(f"{api}/flow_runs/{run_id}"))["state"]["type"] not in (
                        "COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                    time.sleep(0.5)
                assert run["state"]["type"] == "COMPLETED", run["state"]
                states = _api(f"{api}/flow_run_states/?flow_run_id={run_id}")
                pending = min(_stamp(s["timestamp"]) for s in states if s["type"] == "PENDING")
                return {"api_wall": _stamp(run["end_time"]) - pending,
                        "api_running": _stamp(run["end_time"]) - _stamp(run["start_time"])}
            finally:
                _stop(worker)

        return [_measured(once), _measured(once)]
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--size", default="320x240", help="image width x height")
    p.add_argument("--mode", nargs="+", choices=["cli", "server"], default=["cli"])
    p.add_argument("--num-workers", type=int, default=1, help="decoding processes while scoring")
    p.add_argument("--method", choices=["nima", "mpemd"], default="nima",
                   help="nima: one view per image (the worst case for the ratio); mpemd: |P| = 8 patches")
    args = p.parse_args()
    import torch

    from model.checkpoint import save_checkpoint
    from model.networks import build_model

    w, h = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        src, ckpt = work / "bucket", str(work / "model.pt")
        write_images(src, args.images, (w, h))
        torch.manual_seed(0)
        save_checkpoint(ckpt, build_model("mobilenet_v3_small", "none", input_size=224),
                        metadata={"method": "nima", "stage": "nima"})
        results = {}
        if "cli" in args.mode:
            results["mpemd score (no Prefect API)"] = cli_runs(src, ckpt, str(work / "out-cli"), args.num_workers,
                                                                    args.method)
        if "server" in args.mode:
            results["score-bucket/nightly (running server, process worker)"] = server_runs(
                src, ckpt, str(work / "out-server"), work / "prefect-home", args.num_workers, args.method)
    print(f"{args.images} images {w}x{h}, {args.method} ({_method_settings(args.method)}), {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    for name, (first, rerun) in results.items():
        print(f"\n{name}")
        for key in ("wall", "user", "sys", "api_wall", "api_running"):
            if key in first:
                print(f"  {key:<12} first {first[key]:8.2f} s   rerun {rerun[key]:7.2f} s   "
                      f"rerun/first {rerun[key] / max(first[key], 1e-9):6.1%}")
        for key in ("scored", "unchanged"):
            if key in first:
                print(f"  {key:<12} first {first[key]:8d}     rerun {rerun[key]:7d}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
