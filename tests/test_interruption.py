"""SIGKILL at drawn moments of real processes, then rerun: every kill must land mid-run, and the
rerun must leave the output exactly once with the values of an uninterrupted run (scoring), or end
where an uninterrupted run ends (training).

Scoring: the real command. ``mpemd score`` (the console script: flow, output lock, compaction) runs
once uninterrupted and its timeline is measured from outside (when each shard's part appeared in the
output). Kill moments are drawn over that measured run (early, mid, uniform), seeded
(``MPEMD_KILL_SEED``, default below, in every assertion message). No sleep in the child: a shard's
time is its real work (one 320x240 image, 16 patches). A drawn time ``t`` is carried out relative to
the last commit before it ("``t - c_k`` seconds after the k-th part appeared"), and draws end
``MARGIN`` shards before the last commit, so a parent that sees a commit late or stalls for a few
shards still kills mid-run. Each kill must be a SIGKILL that left some but not all parts (or a
compaction marker); the rerun (the same command) must score exactly the missing images and leave
every row equal to the uninterrupted run's, none missing, none twice in the raw files.

Two exact points of the commit are held by a hook of the child script below (test code, not the
product): ``KILLTEST_PAUSE`` holds the child after a part's temporary file is written and before its
rename (``rename:<shard>``, local disk), or after a part's PUT returned and before the next shard
(``put:<shard>``, S3); the kill lands there. Training children are killed at drawn moments between
epoch checkpoints, measured the same way.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pytest
import torch

from model.checkpoint import load_checkpoint
from tasks.core import storage
from tasks.scoring.listing import list_source
from tasks.scoring.output_lock import lock_url
from tasks.scoring.predictions import list_parts, partition_url, plan_scoring
from tasks.scoring.scorer import ScoringConfig, score_shards
from tasks.training.loop import fit, run_paths
from tasks.training.presets import resolve_config
from tests.score_command import (
    ScoreProcess,
    child_env,
    data_files,
    markers,
    raw_rows,
    score_args,
    shard_parts,
)
from tests.scoring_fixtures import image_bytes, make_checkpoint, write_images
from tests.test_training import REPO, TIMING, TINY, _metrics, toy_root  # noqa: F401  (toy_root: a fixture)

DATE = "2026-04-05"
N_SHARDS, PER_SHARD = 6, 2
EPOCHS = 4
SEED = int(os.environ.get("MPEMD_KILL_SEED", "20261206"))  # fixed: every run draws the same kills
LANDED: list[str] = []  # one line per kill, printed at the end of the module (docs/reliability.md)

_SCORER = textwrap.dedent("""
    import os, re, sys, time
    from tasks.scoring import scorer as scoring
    from tasks.scoring.listing import list_source
    from tasks.scoring.predictions import plan_scoring
    src, ckpt, out, date, shard_size = sys.argv[1:6]
    pause = os.environ.get("KILLTEST_PAUSE", "")

    def emit(event, index):
        print(event, index, flush=True)

    def shard_of(url):
        return int(re.search(r"part-(\\d+)-", str(url)).group(1))

    def hold(index):
        emit("paused", index)
        time.sleep(600)  # until the parent's SIGKILL

    real_write, real_replace = scoring.write_part, os.replace

    def write_part(table, url):
        real_write(table, url)
        emit("committed", shard_of(url))
        if pause == f"put:{shard_of(url)}":
            hold(shard_of(url))
        return url

    def replace(src_path, dst_path, *args, **kwargs):
        if "part-" in str(dst_path) and pause == f"rename:{shard_of(dst_path)}":
            hold(shard_of(dst_path))  # the temporary file is written, the part not yet renamed
        return real_replace(src_path, dst_path, *args, **kwargs)

    scoring.write_part, os.replace = write_part, replace
    config = scoring.ScoringConfig(batch_size=1, progress=False)
    _, info = scoring.load_scoring_model(ckpt, "cpu")
    plan = plan_scoring(list_source(src).objects, out, info["model_version"], config.settings, int(shard_size))
    emit("ready", -1)
    for _ in scoring.score_shards(plan.shards, checkpoint=ckpt, out=out, date=date, config=config):
        pass
    emit("done", -1)
""")


# ---- a child process, its timeline, and a kill at a point of it -------------------------------------

# Importing torch and the project takes seconds; a kill test needs a fresh process per kill. A zygote
# imports once, then forks one child per run (a real, separate process: it is the one SIGKILLed and
# reaped, and the zygote reports how it died).
_ZYGOTE = textwrap.dedent("""
    import json, os, runpy, sys, traceback
    import tasks.scoring.scorer, tasks.training.loop, tasks.scoring.listing, tasks.scoring.predictions  # noqa: F401  (the slow imports)
    print("zygote 0", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                os.environ.update(request["env"])
                sys.argv = request["argv"]
                if request["module"]:
                    runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
                else:
                    exec(compile(request["code"], "<child>", "exec"), {"__name__": "__main__"})
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
        print("child", pid, flush=True)
        _, status = os.waitpid(pid, 0)
        print("exit", os.waitstatus_to_exitcode(status), flush=True)
""")


@dataclass
class ChildRun:
    events: list[tuple[float, str, int]] = field(default_factory=list)  # (monotonic time, event, index)
    returncode: int | None = None
    pid: int | None = None

    def at(self, event: str, index: int) -> float | None:
        return next((t for t, e, i in self.events if e == event and i == index), None)

    def timeline(self, event: str) -> list[float]:
        """Seconds from ``ready`` to each ``event``, in order."""
        ready = self.at("ready", -1)
        assert ready is not None, self.events
        return [t - ready for t, e, _ in self.events if e == event]


@dataclass(frozen=True)
class KillPoint:
    name: str
    event: str  # kill ``delay_s`` after this event of the child...
    index: int
    delay_s: float
    pause: str = ""  # ...held there by KILLTEST_PAUSE
    drawn_s: float | None = None  # the drawn moment on the measured timeline (seconds after ready)

    def due(self, run: ChildRun, now: float) -> bool:
        seen = run.at(self.event, self.index)
        return seen is not None and now >= seen + self.delay_s


class Zygote:
    """One forking parent process for the module's children (see ``_ZYGOTE``)."""

    def __init__(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.proc = subprocess.Popen([sys.executable, "-c", _ZYGOTE], cwd=REPO, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.lock = threading.Lock()
        self.run: ChildRun | None = None
        self.ready = threading.Event()
        self.errors: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=lambda: self.errors.extend(self.proc.stderr), daemon=True).start()
        assert self.ready.wait(240), "".join(self.errors)[-3000:]

    def _read(self) -> None:
        for line in self.proc.stdout:
            words = line.split()
            if len(words) != 2 or not words[1].lstrip("-").isdigit():
                continue
            event, value = words[0], int(words[1])
            with self.lock:
                if event == "zygote":
                    self.ready.set()
                elif self.run is None:
                    continue
                elif event == "child":
                    self.run.pid = value
                elif event == "exit":
                    self.run.returncode = value
                else:
                    self.run.events.append((time.monotonic(), event, value))

    def start(self, argv: list[str], env: dict[str, str], module: str | None = None, code: str = "") -> ChildRun:
        with self.lock:
            self.run = ChildRun()
        aws = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}  # the moto endpoint, when set
        request = {"argv": argv, "env": {**aws, **env}, "module": module, "code": code}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return self.run

    def wait(self, run: ChildRun, kill: KillPoint | None = None,
             poll: Callable[[], tuple[str, int] | None] | None = None) -> ChildRun:
        """Record ``poll()``'s events beside the child's; SIGKILL the child when ``kill`` is due."""
        deadline, killed = time.monotonic() + 240, False
        while True:
            with self.lock:
                if run.returncode is not None:
                    return run
                seen = poll() if poll else None
                if seen is not None and run.at(*seen) is None:
                    run.events.append((time.monotonic(), *seen))
                due = not killed and run.pid is not None and kill is not None and kill.due(run, time.monotonic())
            assert time.monotonic() < deadline, ("the child ran past 240 s", "".join(self.errors)[-3000:])
            if due:
                os.kill(run.pid, signal.SIGKILL)
                killed = True
            time.sleep(0.005)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def zygote() -> Zygote:
    z = Zygote()
    yield z
    z.close()


def draw(name: str, marks: list[float], t: float, event: str, cap_s: float) -> KillPoint:
    """The kill at drawn time ``t``: after the last of ``marks`` (event times) before it."""
    k = max(i for i, mark in enumerate(marks) if mark <= t)
    return KillPoint(name, event, k, min(t - marks[k], cap_s), drawn_s=round(t, 3))


def assert_sigkilled(run: ChildRun, point: KillPoint) -> None:
    assert run.returncode == -signal.SIGKILL, (SEED, point, run.returncode)


# ---- scoring: the real command, killed at drawn moments --------------------------------------------

N_IMAGES, PATCHES, MARGIN = 16, 16, 4  # MARGIN: draws end this many shards before the last commit
COMMAND_KILLS = ["early", "mid", "uniform"]


@dataclass(frozen=True)
class CommandSetup:
    src: str
    checkpoint: str
    version: str
    commits: list[float]  # seconds from the command's start to each part, measured uninterrupted
    rows: list[dict]  # the uninterrupted run's rows (raw, every file), the reference for values

    def args(self, out: str) -> list[str]:
        return score_args(self.src, self.checkpoint, out, DATE, "--n-patches", str(PATCHES))

    def partition(self, out: str) -> str:
        return partition_url(out, self.version, DATE)


@pytest.fixture(scope="module")
def scored_reference(tmp_path_factory: pytest.TempPathFactory) -> CommandSetup:
    folder = tmp_path_factory.mktemp("kill-command")
    (folder / "src").mkdir()
    for i in range(N_IMAGES):  # real work per shard (decode, 16 patches), no sleep
        (folder / "src" / f"{i:02d}.jpg").write_bytes(image_bytes(i, 320, 240))
    version = make_checkpoint(folder / "model.pt")
    setup = CommandSetup(str(folder / "src"), str(folder / "model.pt"), version, [], [])
    out = str(folder / "reference-out")
    run = ScoreProcess(setup.args(out), child_env(), setup.partition(out), folder / "logs").wait()
    assert run.returncode() == 0, run.stderr()[-3000:]
    # The watcher may miss the last parts on a stalled machine (compaction deletes them within
    # milliseconds); draws need only the commits up to MARGIN before the last.
    assert N_IMAGES - MARGIN < len(run.commits) <= N_IMAGES, (run.commits, "parts missed by the watcher")
    rows = raw_rows(setup.partition(out))
    assert len(rows) == N_IMAGES and len(data_files(setup.partition(out))) == 1  # compacted
    return CommandSetup(setup.src, setup.checkpoint, version, run.commits, rows)


def command_kills(commits: list[float], rng: random.Random) -> dict[str, tuple[float, int, float]]:
    """name -> (drawn time, kill after this many parts, this many seconds after the last of them)."""
    first, last = commits[0], commits[N_IMAGES - MARGIN - 1]
    span = last - first
    drawn = {"early": rng.uniform(first, first + 0.25 * span), "mid": rng.uniform(first + 0.4 * span, first + 0.6 * span),
             "uniform": rng.uniform(first, last)}
    points = {}
    for name, t in drawn.items():
        k = sum(1 for c in commits if c <= t)
        points[name] = (round(t, 3), k, t - commits[k - 1])
    return points


@pytest.mark.slow
@pytest.mark.parametrize("name", COMMAND_KILLS)
def test_the_command_killed_at_a_drawn_moment_then_rerun_equals_an_uninterrupted_run(scored_reference, tmp_path,
                                                                                      name):
    setup = scored_reference
    drawn, after, delay = command_kills(setup.commits, random.Random(SEED))[name]
    out = str(tmp_path / "out")
    partition = setup.partition(out)
    run = ScoreProcess(setup.args(out), child_env(), partition, tmp_path / "killed")
    run.wait(until=lambda r: r.due(after, delay))
    run.send(signal.SIGKILL)
    assert run.returncode() == -signal.SIGKILL, (SEED, name, run.returncode(), run.stderr()[-2000:])
    committed, marked = len(shard_parts(partition)), bool(markers(partition))
    assert 0 < committed < N_IMAGES or marked, (SEED, name, committed, "the kill did not land mid-run")
    LANDED.append(f"mpemd score {name}: drawn at {drawn} s ({delay:.3f} s after part {after}), "
                  f"{committed}/{N_IMAGES} parts committed when killed{', compaction marker' if marked else ''}")

    rerun = ScoreProcess(setup.args(out), child_env(), partition, tmp_path / "rerun").wait()
    assert rerun.returncode() == 0, rerun.stderr()[-3000:]
    summary = rerun.summary()
    assert summary["skipped_unchanged"] == committed and summary["scored"] == N_IMAGES - committed, summary
    rows = raw_rows(partition)
    uris = [r["uri"] for r in rows]
    assert len(uris) == len(set(uris)) == N_IMAGES, (SEED, name, "an image missing or twice in the raw files")
    assert rows == setup.rows, (SEED, name, "a value differs from the uninterrupted run")
    assert markers(partition) == [] and len(data_files(partition)) == 1


@pytest.mark.slow
def test_the_command_sent_sigterm_mid_run_releases_its_lock_and_the_rerun_scores_the_rest(scored_reference, tmp_path):
    """SIGTERM (a supervisor's stop, Prefect's cancel of a process, ``timeout``) unwinds the run: exit
    143, the lock deleted (a rerun on another machine would otherwise wait out its 5-minute heartbeat:
    the pid check only works on the same host), the committed parts kept, and the rerun scores the rest."""
    setup = scored_reference
    out = str(tmp_path / "out")
    partition = setup.partition(out)
    run = ScoreProcess(setup.args(out), child_env(), partition, tmp_path / "terminated")
    run.wait(until=lambda r: len(r.commits) >= 2)
    run.send(signal.SIGTERM)
    assert run.returncode() == 143, (run.returncode(), run.stderr()[-2000:])
    assert run.stderr().rstrip().endswith("terminated (SIGTERM)"), run.stderr()[-2000:]
    committed = len(shard_parts(partition))
    assert 2 <= committed < N_IMAGES or markers(partition), (committed, "the signal did not land mid-run")
    assert not storage.exists(lock_url(out)), "the lock was left to its heartbeat"

    rerun = ScoreProcess(setup.args(out), child_env(), partition, tmp_path / "rerun").wait()
    assert rerun.returncode() == 0, rerun.stderr()[-3000:]
    assert "taking over stale output lock" not in rerun.stderr()
    assert rerun.summary()["scored"] == N_IMAGES - rerun.summary()["skipped_unchanged"]
    assert raw_rows(partition) == setup.rows


# ---- scoring: held at an exact point of a commit ----------------------------------------------------

@dataclass(frozen=True)
class ScoringSetup:
    src: str
    checkpoint: str
    version: str
    rows: list[dict]  # the uninterrupted child's rows


def _score(zygote: Zygote, src: str, checkpoint: str, out: str, env: dict[str, str],
           kill: KillPoint | None = None) -> ChildRun:
    run = zygote.start(["scorer", src, checkpoint, out, DATE, str(PER_SHARD)], env, code=_SCORER)
    return zygote.wait(run, kill)


def _measure(zygote: Zygote, src: str, checkpoint: str, version: str, out: str) -> ScoringSetup:
    run = _score(zygote, src, checkpoint, out, {})
    assert run.returncode == 0 and run.at("done", -1) is not None, "".join(zygote.errors)[-3000:]
    assert len(run.timeline("committed")) == N_SHARDS and len(list_parts(out, version)) == N_SHARDS
    return ScoringSetup(src, checkpoint, version, raw_rows(partition_url(out, version, DATE)))


@pytest.fixture(scope="module")
def local_scoring(zygote: Zygote, tmp_path_factory: pytest.TempPathFactory) -> ScoringSetup:
    folder = tmp_path_factory.mktemp("kill-scoring")
    write_images(folder / "src", N_SHARDS * PER_SHARD)
    version = make_checkpoint(folder / "model.pt")
    return _measure(zygote, str(folder / "src"), str(folder / "model.pt"), version, str(folder / "reference-out"))


def held_kill(pause: str) -> KillPoint:
    kind, shard = pause.split(":")
    return KillPoint(f"{kind}-shard-{shard}", "paused", int(shard), 0.0, pause=pause)


def kill_and_rerun_scoring(zygote: Zygote, setup: ScoringSetup, point: KillPoint, out: str) -> None:
    run = _score(zygote, setup.src, setup.checkpoint, out, {"KILLTEST_PAUSE": point.pause}, kill=point)
    assert_sigkilled(run, point)
    committed = len(list_parts(out, setup.version))
    assert 1 <= committed < N_SHARDS, (SEED, point, committed, "the kill did not land mid-run")
    LANDED.append(f"scoring {'s3' if out.startswith('s3://') else 'local'} {point.name}: held there, "
                  f"{committed}/{N_SHARDS} parts committed when killed")
    # Rerun: the output is the state; exactly the missing images are scored.
    config = ScoringConfig(batch_size=1, progress=False)
    objects = list_source(setup.src).objects
    plan = plan_scoring(objects, out, setup.version, config.settings, PER_SHARD)
    assert plan.skipped_unchanged == committed * PER_SHARD and plan.pending == len(objects) - plan.skipped_unchanged
    torch.set_num_threads(1)  # as the child (OMP_NUM_THREADS=1): bitwise-equal scores need it
    list(score_shards(plan.shards, checkpoint=setup.checkpoint, out=out, date=DATE, config=config))
    rows = raw_rows(partition_url(out, setup.version, DATE))
    uris = [r["uri"] for r in rows]
    assert sorted(uris) == sorted(o.uri for o in objects) and len(set(uris)) == len(uris), (SEED, point, uris)
    assert rows == setup.rows, (SEED, point, "a value differs from the uninterrupted run")


@pytest.mark.slow
def test_scoring_killed_inside_the_final_rename_then_rerun_scores_each_image_once(zygote, local_scoring, tmp_path):
    point = held_kill(f"rename:{N_SHARDS - 1}")
    kill_and_rerun_scoring(zygote, local_scoring, point, str(tmp_path / "out"))
    part_dir = Path(storage.filesystem(str(tmp_path / "out"))[1])  # the temporary file was the only trace
    assert any(p.name.startswith(".tmp-") for p in part_dir.rglob("*")), "the kill missed the commit"


@pytest.fixture(scope="module")
def s3_scoring(zygote: Zygote, s3_server, tmp_path_factory: pytest.TempPathFactory) -> tuple[ScoringSetup, str]:
    import uuid

    import s3fs

    bucket = f"kill-{uuid.uuid4().hex[:10]}"
    s3fs.S3FileSystem(endpoint_url=s3_server, skip_instance_cache=True).mkdir(bucket)
    folder = tmp_path_factory.mktemp("kill-scoring-s3")
    for path in write_images(folder / "src", N_SHARDS * PER_SHARD):
        storage.write_bytes_atomic(f"s3://{bucket}/src/{path.name}", path.read_bytes())
    version = make_checkpoint(folder / "model.pt")
    setup = _measure(zygote, f"s3://{bucket}/src", str(folder / "model.pt"), version, f"s3://{bucket}/reference-out")
    return setup, bucket


@pytest.mark.slow
@pytest.mark.s3
def test_scoring_to_s3_killed_after_a_put_then_rerun_scores_each_image_once(zygote, s3_scoring):
    setup, bucket = s3_scoring
    kill_and_rerun_scoring(zygote, setup, held_kill(f"put:{N_SHARDS - 2}"), f"s3://{bucket}/out-put")


# ---- training -------------------------------------------------------------------------------------

def _train(zygote: Zygote, root: Path, run_id: str, kill: KillPoint | None = None) -> ChildRun:
    overrides = {**TINY, "epochs": EPOCHS}
    argv = ["tasks.training", "nima", "--root", str(root), "--preset", "cpu-smoke", "--run-id", run_id,
            *[a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]]
    return zygote.wait(zygote.start(argv, {}, module="tasks.training"), kill, poll=_epoch_watch(root, run_id))


def _epoch_watch(root: Path, run_id: str) -> Callable[[], tuple[str, int] | None]:
    """Reports ``ready`` once the run folder's config exists, then ``epoch n`` at each new last checkpoint."""
    paths, seen = run_paths(str(root), run_id), {"mtime": None, "n": 0, "ready": False}

    def poll() -> tuple[str, int] | None:
        if not seen["ready"]:
            seen["ready"] = Path(paths.config).exists()
            return ("ready", -1) if seen["ready"] else None
        try:
            mtime = os.stat(paths.last).st_mtime_ns
        except FileNotFoundError:
            return None
        if mtime != seen["mtime"]:
            seen["mtime"], seen["n"] = mtime, seen["n"] + 1
        return "epoch", seen["n"] - 1  # 0-based epoch whose checkpoint is the newest
    return poll


@pytest.fixture(scope="module")
def straight_training(zygote: Zygote, toy_root: Path) -> tuple[pd.DataFrame, list[float]]:  # noqa: F811
    """An uninterrupted child run: its metrics (the reference) and when each epoch's checkpoint appeared."""
    run_id = "nima-straight-child"
    run = _train(zygote, toy_root, run_id)
    assert run.returncode == 0, "".join(zygote.errors)[-3000:]
    epochs = run.timeline("epoch")
    assert len(epochs) == EPOCHS, (epochs, "an epoch checkpoint was missed")
    return _metrics(toy_root, run_id).drop(columns=TIMING), epochs


TRAINING_KILLS = ["early", "mid", "last-epoch", "uniform-1"]


def training_kills(epochs: list[float], rng: random.Random) -> dict[str, KillPoint]:
    cap = 0.6 * min(b - a for a, b in itertools.pairwise(epochs))

    def at(name: str, lo: float, hi: float) -> KillPoint:
        return draw(name, epochs, rng.uniform(lo, hi), "epoch", cap)

    # Draws end half an epoch before the last checkpoint: a parent that stalls still kills before it.
    end = epochs[-1] - 0.5 * (epochs[-1] - epochs[-2])
    points = [at("early", epochs[0], epochs[1]), at("mid", epochs[1], epochs[2]),
              at("last-epoch", epochs[-2], end), at("uniform-1", epochs[0], end)]
    return {p.name: p for p in points}


@pytest.mark.slow
@pytest.mark.parametrize("name", TRAINING_KILLS)
def test_training_killed_at_a_drawn_moment_resumes_to_the_uninterrupted_result(
        zygote: Zygote, toy_root: Path, straight_training, name: str, caplog) -> None:  # noqa: F811
    reference, epochs = straight_training
    point = training_kills(epochs, random.Random(SEED + 2))[name]
    run_id = f"nima-kill-{name}"
    run = _train(zygote, toy_root, run_id, kill=point)
    assert_sigkilled(run, point)
    last = Path(run_paths(str(toy_root), run_id).last)
    assert last.exists(), (SEED, point, "killed before the first checkpoint")
    killed_after = int(load_checkpoint(last.read_bytes())["epoch"])
    assert killed_after < EPOCHS - 1, (SEED, point, killed_after, "killed after the last epoch")
    LANDED.append(f"training {name}: drawn at {point.drawn_s} s, killed after epoch {killed_after + 1} of {EPOCHS}")
    caplog.set_level(logging.INFO, logger="mpemd")
    torch.set_num_threads(1)  # as the child (OMP_NUM_THREADS=1): bitwise-equal runs need it
    fit(resolve_config("cpu-smoke", {**TINY, "epochs": EPOCHS}), root=str(toy_root), method="nima", run_id=run_id)
    assert re.search(rf"resuming \S*{run_id} after epoch {killed_after + 1}\b", caplog.text), caplog.text[-2000:]
    resumed = _metrics(toy_root, run_id).drop(columns=TIMING)
    pd.testing.assert_frame_equal(resumed, reference, check_exact=True)


def teardown_module() -> None:
    print(f"\nkills (seed {SEED}):\n" + "\n".join(LANDED))
