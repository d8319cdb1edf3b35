"""End to end through a real Prefect server: deploy from infra/prefect.yaml, run train-mpemd/smoke.

Starts ``prefect server start`` on 127.0.0.1 (free port, SQLite, temporary PREFECT_HOME), creates
the process work pool, deploys the training deployments, starts a process worker and runs
``prefect deployment run train-mpemd/smoke`` on tiny synthetic data with an init checkpoint
prepared here; waits for Completed. Every process started is stopped in ``finally``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from model.checkpoint import load_checkpoint, save_checkpoint
from model.networks import build_model
from tasks.toy_data import write_toy_dataset

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).parent / "prefect")

pytestmark = [pytest.mark.server, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def _wait_healthy(api: str, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"prefect server exited with {server.returncode}")
        try:
            _get_json(f"{api}/health")
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError("prefect server did not become healthy")


def _stop(proc: subprocess.Popen) -> None:
    """Stop a process and its children (each was started in its own session)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except (subprocess.TimeoutExpired, ProcessLookupError):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def _cli(args: list[str], env: dict, timeout: float = 120) -> str:
    done = subprocess.run([PREFECT, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def test_train_mpemd_smoke_deployment_completes(tmp_path: Path) -> None:
    root = tmp_path / "data"
    write_toy_dataset(root, n_train=16, n_val=8, short_side=(72, 100))
    init_ckpt = tmp_path / "stage1.pt"
    torch.manual_seed(0)
    stage1 = build_model("mobilenet_v3_small", "none")
    stage1_version = save_checkpoint(init_ckpt, stage1, metadata={"stage": "nima", "method": "nima"})

    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update({
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_SERVER_API_PORT": str(port),
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "MPEMD_REPO_DIR": str(REPO),
        "MPEMD_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    })
    logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("server", "worker")}  # noqa: SIM115
    procs: list[subprocess.Popen] = []
    try:
        server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                  cwd=tmp_path, env=env, stdout=logs["server"], stderr=subprocess.STDOUT,
                                  start_new_session=True)
        procs.append(server)
        _wait_healthy(api, server, timeout=90)

        _cli(["work-pool", "create", "mpemd-process", "--type", "process"], env)
        out = _cli(["--no-prompt", "deploy", "--prefect-file", "infra/prefect.yaml",
                    "--name", "train-mpemd/smoke"], env)
        assert "train-mpemd/smoke" in out

        worker = subprocess.Popen([PREFECT, "worker", "start", "--pool", "mpemd-process", "--limit", "1"],
                                  cwd=tmp_path, env=env, stdout=logs["worker"], stderr=subprocess.STDOUT,
                                  start_new_session=True)
        procs.append(worker)

        params = {"root": str(root), "preset": "cpu-smoke", "init": str(init_ckpt), "run_id": "mpemd-deployed",
                  "overrides": {"epochs": 1, "image_size": 64, "batch_size": 8, "n_patches": 2}}
        out = _cli(["deployment", "run", "train-mpemd/smoke", "--params", json.dumps(params)], env)
        match = re.search(r"UUID:\s*([0-9a-f-]{36})", out)
        assert match, out
        flow_run_id = match.group(1)

        deadline = time.monotonic() + 150
        state = None
        while time.monotonic() < deadline:
            state = _get_json(f"{api}/flow_runs/{flow_run_id}")["state"]["type"]
            if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                break
            assert worker.poll() is None, "the worker died"
            time.sleep(1.0)
        logs["worker"].flush()
        assert state == "COMPLETED", f"flow run ended {state}:\n{(tmp_path / 'worker.log').read_text()[-4000:]}"

        run_dir = root / "runs" / "mpemd-deployed"
        for name in ("checkpoint-best.pt", "checkpoint-last.pt", "config.json", "metrics.parquet", "curves.png"):
            assert (run_dir / name).is_file(), name
        best = load_checkpoint((run_dir / "checkpoint-best.pt").read_bytes())
        assert best["metadata"]["method"] == "mpemd"
        assert best["metadata"]["init"]["model_version"] == stage1_version
        assert "mpemd train-mpemd" in best["metadata"]["command"]
    finally:
        for proc in reversed(procs):
            _stop(proc)
        for f in logs.values():
            f.close()
