"""Deployments against a real Prefect server: every deployment of infra/prefect.yaml deployed and run
as a user runs them.

One ``prefect server start`` for the module (127.0.0.1, SQLite, a temporary PREFECT_HOME; a port
taken between picking and binding is retried), its work pools, ``prefect deploy --all``, and one
process worker. Then:

- every deployment of the file is on the server with its schedule, pool and concurrency, and the
  nightly schedule is inactive (its parameters are placeholders);
- ``train-mpemd/smoke`` runs with its declared ``init: latest`` and says what that resolved to;
- ``train-nima/smoke`` on a root with no dataset synthesizes and ingests one, says so in its logs and
  summary artifact, and its logs on the server hold every epoch line;
- two overlapping runs of ``score-bucket/nightly``: the second ends Cancelled (``CANCEL_NEW``), the
  first completes and scores every image exactly once;
- ``MPEMD_SCORE_TIMEOUT_S`` stops a run that hangs (its source is an endpoint that never answers).

- from a fresh ``git clone`` (its own server, README's steps): ``train-mpemd/smoke``, ``train-nima/smoke``
  and ``reproduce/demo`` complete with nothing ingested first, and their logs hold the epochs.

Every process started is stopped at the end of the module (the fresh clone's at the end of its test).
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
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from benchmarks.toy_data import write_toy_dataset
from flows.params import demo_params
from model.checkpoint import load_checkpoint, save_checkpoint
from model.networks import build_model
from tasks.scoring.output_lock import output_lock
from tasks.scoring.predictions import list_parts, read_predictions
from tests.scoring_fixtures import make_checkpoint, write_images

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).parent / "prefect")
DEPLOYMENTS = yaml.safe_load((REPO / "infra" / "prefect.yaml").read_text())["deployments"]
TERMINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")
TINY_TRAINING = {"epochs": 1, "image_size": 64, "batch_size": 8, "n_patches": 2, "num_workers": 0}

pytestmark = [pytest.mark.server, pytest.mark.slow]


def _get_json(url: str, body: dict | None = None) -> dict | list:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


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


@dataclass
class Server:
    api: str
    env: dict[str, str]
    logs: Path
    repo: Path = REPO  # where `prefect` commands run (the checkout deployed from)

    def cli(self, *args: str, timeout: float = 180) -> str:
        done = subprocess.run([PREFECT, *args], cwd=self.repo, env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        assert done.returncode == 0, f"prefect {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
        return done.stdout + done.stderr

    def run(self, deployment: str, params: dict, *extra: str) -> str:
        """``prefect deployment run`` with ``params`` (merged per key into the deployment's); the run id."""
        out = self.cli("deployment", "run", deployment, "--params", json.dumps(params), *extra)
        match = re.search(r"UUID:\s*([0-9a-f-]{36})", out)
        assert match, out
        return match.group(1)

    def flow_run(self, run_id: str) -> dict:
        return _get_json(f"{self.api}/flow_runs/{run_id}")

    def wait(self, run_id: str, states: tuple[str, ...] = TERMINAL, timeout: float = 240) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.flow_run(run_id)
            if run["state"]["type"] in states:
                return run
            time.sleep(0.5)
        raise AssertionError(f"flow run {run_id} still {run['state']['type']} after {timeout} s:\n{self.worker_log()}")

    def worker_log(self) -> str:
        return (self.logs / "worker.log").read_text()[-4000:]

    def run_logs(self, run_id: str, *wanted: str, timeout: float = 60) -> str:
        """The flow run's logs as ``prefect flow-run logs`` prints them, once every ``wanted`` text is
        there (the last batch of a finished run can reach the server a moment after its state)."""
        deadline = time.monotonic() + timeout
        while True:
            logs = self.cli("flow-run", "logs", run_id)
            if all(w in logs for w in wanted) or time.monotonic() > deadline:
                return logs
            time.sleep(1)

    def artifact(self, run_id: str, key: str) -> str:
        found = _get_json(f"{self.api}/artifacts/filter",
                          {"artifacts": {"flow_run_id": {"any_": [run_id]}, "key": {"any_": [key]}}})
        assert found, f"no artifact {key} in flow run {run_id}"
        return found[0]["data"]


def _start_server(home: Path, env: dict[str, str], log: Path) -> tuple[subprocess.Popen, str, dict[str, str]]:
    """``prefect server start`` on a free port; a port taken between picking and binding is retried."""
    for _ in range(5):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        api = f"http://127.0.0.1:{port}/api"
        env = {**env, "PREFECT_API_URL": api, "PREFECT_SERVER_API_PORT": str(port)}
        with open(log, "a") as out:
            server = subprocess.Popen([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                                      cwd=home, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and server.poll() is None:
            try:
                _get_json(f"{api}/health")
                return server, api, env
            except OSError:
                time.sleep(0.5)
        _stop(server)  # exited (the port was taken meanwhile) or never healthy: another port
    raise RuntimeError(f"prefect server did not start:\n{log.read_text()[-3000:]}")


def _server_env(home: Path, repo_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "AWS_"))}
    env.update({
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_API_HOST": "127.0.0.1",
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home}/prefect.db",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "DO_NOT_TRACK": "1",
        "MPEMD_REPO_DIR": str(repo_dir),
        "MPEMD_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    })
    return env


@contextlib.contextmanager
def _prefect_stack(tmp: Path, repo_dir: Path, env: dict[str, str]) -> Iterator[Server]:
    """README's "Running deployments", from ``repo_dir``: a server, the two pools, ``prefect deploy --all``
    and a process worker whose pull step goes to ``MPEMD_REPO_DIR``; everything stopped at the end."""
    home = tmp / "prefect-home"
    home.mkdir()
    procs: list[subprocess.Popen] = []
    try:
        proc, api, env = _start_server(home, env, tmp / "server.log")
        procs.append(proc)
        srv = Server(api, env, tmp, repo_dir)
        for pool in ("mpemd-process", "mpemd-gpu"):
            srv.cli("work-pool", "create", pool, "--type", "process")
        srv.cli("--no-prompt", "deploy", "--all", "--prefect-file", "infra/prefect.yaml", timeout=300)
        with open(tmp / "worker.log", "w") as out:
            procs.append(subprocess.Popen([PREFECT, "worker", "start", "--pool", "mpemd-process", "--limit", "4"],
                                          cwd=tmp, env=env, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        yield srv
    finally:
        for proc in reversed(procs):
            _stop(proc)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("prefect-server")
    with _prefect_stack(tmp, REPO, _server_env(tmp / "prefect-home", REPO)) as srv:
        yield srv


def _deployment_name(d: dict) -> str:
    flow = Path(d["entrypoint"].split(":")[0]).stem
    return f"{d['entrypoint'].split(':')[1].replace('_', '-')}/{d['name']}" if flow else d["name"]


def test_deploy_all_declares_every_deployment_with_schedule_pool_and_concurrency(server):
    on_server = {}
    for d in _get_json(f"{server.api}/deployments/filter", {"limit": 200}):
        flow = _get_json(f"{server.api}/flows/{d['flow_id']}")
        on_server[f"{flow['name']}/{d['name']}"] = d
    assert len(on_server) == len(DEPLOYMENTS)
    for declared in DEPLOYMENTS:
        name = _deployment_name(declared)
        got = on_server[name]
        assert got["work_pool_name"] == declared["work_pool"]["name"], name
        assert got["entrypoint"] == declared["entrypoint"], name
        limit = declared.get("concurrency_limit")
        held = (got.get("global_concurrency_limit") or {}).get("limit")  # Prefect 3 keeps it there
        if isinstance(limit, dict):
            assert held == limit["limit"], name
            assert got["concurrency_options"]["collision_strategy"] == limit["collision_strategy"], name
        else:
            assert held == limit, name
        schedules = [(s["schedule"]["cron"], s["schedule"]["timezone"], s["active"]) for s in got["schedules"]]
        assert schedules == [(s["cron"], s["timezone"], s["active"]) for s in declared.get("schedules", [])], name
        for key, value in declared.get("parameters", {}).items():
            assert got["parameters"][key] == value, (name, key)
    nightly = on_server["score-bucket/nightly"]
    assert [s["active"] for s in nightly["schedules"]] == [False]  # placeholders: it must not fire at 02:00
    assert nightly["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"


def test_train_mpemd_smoke_runs_with_its_declared_init_latest(server, tmp_path):
    root = tmp_path / "data"
    write_toy_dataset(root, n_train=16, n_val=8, short_side=(72, 100))
    planted = root / "runs" / "nima-planted"
    planted.mkdir(parents=True)
    stage1 = build_model("mobilenet_v3_small", "none")
    version = save_checkpoint(planted / "checkpoint-best.pt", stage1, metadata={"stage": "nima", "method": "nima"})
    # No init parameter: the deployment's own `init: latest` must find the planted run.
    run_id = server.run("train-mpemd/smoke", {"root": str(root), "run_id": "mpemd-deployed",
                                              "overrides": TINY_TRAINING})
    run = server.wait(run_id)
    assert run["state"]["type"] == "COMPLETED", server.worker_log()
    run_dir = root / "runs" / "mpemd-deployed"
    for name in ("checkpoint-best.pt", "checkpoint-last.pt", "config.json", "metrics.parquet"):
        assert (run_dir / name).is_file(), name
    best = load_checkpoint((run_dir / "checkpoint-best.pt").read_bytes())
    assert best["metadata"]["method"] == "mpemd" and best["metadata"]["init"]["model_version"] == version
    artifacts = _get_json(f"{server.api}/artifacts/filter",
                          {"artifacts": {"flow_run_id": {"any_": [run_id]}, "key": {"any_": ["mpemd-init"]}}})
    assert artifacts, "what `latest` resolved to was not published"
    assert "latest" in artifacts[0]["data"] and "nima-planted" in artifacts[0]["data"] and version in artifacts[0]["data"]


def test_train_nima_smoke_on_a_root_without_data_makes_it_and_logs_every_epoch(server, tmp_path):
    root = tmp_path / "fresh-checkout" / "data"
    run_id = server.run("train-nima/smoke", {"root": str(root), "synth_if_missing": 60, "overrides": TINY_TRAINING})
    run = server.wait(run_id)
    assert run["state"]["type"] == "COMPLETED", server.worker_log()
    assert (root / "manifests" / "train.parquet").is_file() and list((root / "runs").glob("nima-*/checkpoint-best.pt"))
    # Said where a Prefect user looks: the run's logs (with the epochs and progress) and its summary.
    logs = server.run_logs(run_id, "epoch 1/1 train", "epoch 1/1:")
    assert f"no ingested dataset under {root}: synthesizing 60 images" in logs, logs
    assert "nima epoch 1/1 train" in logs and "(done in" in logs and "nima epoch 1/1: train loss" in logs, logs
    assert "60 synthetic images" in server.artifact(run_id, "nima-training-summary")


def _scoring_case(tmp_path: Path, n_images: int) -> dict:
    write_images(tmp_path / "photos", n_images)
    version = make_checkpoint(tmp_path / "model.pt")
    return {"source": str(tmp_path / "photos"), "checkpoint": str(tmp_path / "model.pt"),
            "out": str(tmp_path / "scores"), "num_workers": 0, "shard_size": 3, "date": "2026-02-03",
            "_version": version}


def test_overlapping_nightly_runs_cancel_the_second_and_score_once(server, tmp_path):
    case = _scoring_case(tmp_path, 8)
    version = case.pop("_version")
    params = {**case, "lock_wait_s": 600}
    # This test holds the output lock, so the first run waits inside the flow (Running, holding the
    # deployment's one slot) for as long as the test needs; no timing is guessed.
    with output_lock(case["out"]):
        first = server.run("score-bucket/nightly", params)
        server.wait(first, ("RUNNING", *TERMINAL))
        assert server.flow_run(first)["state"]["type"] == "RUNNING", server.worker_log()
        second = server.run("score-bucket/nightly", params)
        ended = server.wait(second)
        assert ended["state"]["type"] == "CANCELLED", (ended["state"], server.worker_log())
        assert server.flow_run(first)["state"]["type"] == "RUNNING"
    run = server.wait(first)
    assert run["state"]["type"] == "COMPLETED", server.worker_log()
    uris = read_predictions(case["out"], version, latest=False).column("uri").to_pylist()
    assert sorted(uris) == sorted(str(p) for p in (tmp_path / "photos").iterdir())  # every image, once
    assert len(list_parts(case["out"], version)) == 1  # 3 shard parts, merged at the end of the run


@contextlib.contextmanager
def _endpoint_that_never_answers() -> Iterator[str]:
    """A TCP server that accepts connections and never replies: an S3 endpoint that hangs."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(listener.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(timeout=5)
        for conn in held:
            conn.close()
        listener.close()


def test_the_flow_timeout_stops_a_run_that_hangs(server, tmp_path):
    case = _scoring_case(tmp_path, 2)
    case.pop("_version")
    with _endpoint_that_never_answers() as endpoint:
        env = {"MPEMD_SCORE_TIMEOUT_S": "8", "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "k",
               "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1"}
        run_id = server.run("score-bucket/nightly", {**case, "source": "s3://hangs/photos"},
                            "--job-variable", f"env={json.dumps(env)}")
        run = server.wait(run_id)
    assert run["state"]["type"] == "FAILED" and run["state"]["name"] == "TimedOut", (run["state"], server.worker_log())
    assert "8" in run["state"]["message"]


def _fresh_clone(tmp: Path) -> Path:
    """``git clone`` of this checkout's committed tree (nothing ingested, no data/, no runs)."""
    clone = tmp / "mpemd"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True, timeout=120)
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True)
    subprocess.run(["git", "-C", str(clone), "checkout", "--quiet", head.stdout.strip()], check=True, timeout=60)
    assert not (clone / "data").exists()
    return clone


def test_the_smoke_and_demo_deployments_complete_on_a_fresh_clone(tmp_path):
    """README's deployment steps from a fresh clone, then the three deployments a newcomer runs first,
    with their declared roots (./data, ./data/demo in the clone) and nothing ingested before. Sizes are
    cut by parameters (fewer synthetic images, one tiny epoch; the demo at --size tiny) to fit the
    suite; the code path is the declared one."""
    clone = _fresh_clone(tmp_path)
    env = _server_env(tmp_path / "prefect-home", clone)
    env.pop("PYTHONPATH", None)  # the clone's code runs, not this checkout's
    tiny = demo_params("tiny").model_dump(include={"synth_n", "overrides", "mpemd_overrides", "n_patches",
                                                   "report_name"})
    with _prefect_stack(tmp_path, clone, env) as srv:
        # Stage 2 first: on a fresh root it makes the dataset and a stage 1 itself.
        demo = srv.run("reproduce/demo", tiny)
        mpemd = srv.run("train-mpemd/smoke", {"synth_if_missing": 60, "overrides": {**TINY_TRAINING, "mpemd_epochs": 1}})
        assert srv.wait(mpemd, timeout=600)["state"]["type"] == "COMPLETED", srv.worker_log()
        nima = srv.run("train-nima/smoke", {"overrides": TINY_TRAINING})
        assert srv.wait(nima, timeout=600)["state"]["type"] == "COMPLETED", srv.worker_log()
        assert srv.wait(demo, timeout=900)["state"]["type"] == "COMPLETED", srv.worker_log()
        logs = srv.run_logs(mpemd, "mpemd epoch 1/1:")
        for line in ("no ingested dataset under ./data: synthesizing 60 images", "no nima run under ./data",
                     "nima epoch 1/1: train loss", "mpemd epoch 1/1: train loss"):
            assert line in logs, (line, logs)
        summary = srv.artifact(mpemd, "mpemd-training-summary")
        assert "60 synthetic images" in summary and "stage 1 was trained first" in summary, summary
        assert "nima epoch 1/1: train loss" in srv.run_logs(nima, "nima epoch 1/1:")
        assert "synthesizing" not in srv.run_logs(nima)  # the dataset is there now: used, not made again
    data = clone / "data"
    assert len(list((data / "runs").glob("nima-*/checkpoint-best.pt"))) == 2
    assert len(list((data / "runs").glob("mpemd-*/checkpoint-best.pt"))) == 1
    assert (data / "demo" / "reports" / "demo-tiny" / "protocol.md").is_file()
