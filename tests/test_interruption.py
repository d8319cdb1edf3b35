"""SIGKILL at random points (several seeds), then rerun: scoring outputs are complete and exactly once;
training resumes from its last checkpoint and ends bit-for-bit where an uninterrupted run ends.

The single fixed-point kill tests live beside their stages (tests/test_score_bucket.py,
tests/test_training.py); these vary the moment of the kill, reusing the training suite's helpers."""

from __future__ import annotations

import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from model.checkpoint import load_checkpoint
from tasks.listing import list_source
from tasks.predictions import list_parts, plan_scoring, read_predictions
from tasks.presets import resolve_config
from tasks.scoring import ScoringConfig, score_shards
from tasks.training import fit, run_paths
from tests.scoring_fixtures import make_checkpoint, write_images
from tests.test_training import REPO, TIMING, TINY, _metrics, toy_root  # noqa: F401  (toy_root: a fixture)

DATE = "2026-04-05"

_SCORER = textwrap.dedent("""
    import sys
    from tasks.listing import list_source
    from tasks.predictions import plan_scoring
    from tasks.scoring import ScoringConfig, load_scoring_model, score_shards
    src, ckpt, out = sys.argv[1:4]
    config = ScoringConfig(batch_size=1, progress=False)
    _, info = load_scoring_model(ckpt, "cpu")
    plan = plan_scoring(list_source(src).objects, out, info["model_version"], config.settings, 1)
    print("ready", flush=True)
    for _ in score_shards(plan.shards, checkpoint=ckpt, out=out, date=sys.argv[4], config=config):
        pass
""")


def _kill_at_random(cmd: list[str], seed: int, ready: callable, max_delay_s: float) -> float:
    """Start ``cmd``, wait until ``ready()``, SIGKILL it after a seeded random delay; returns the delay."""
    delay = random.Random(seed).uniform(0, max_delay_s)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ready(proc):
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "the child never got ready"
            time.sleep(0.01)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()
    return delay


# One torch thread: bitwise-equal runs across processes, and a 2-core machine is not oversubscribed.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def scoring_setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    folder = tmp_path_factory.mktemp("kill-scoring")
    write_images(folder / "src", 16)
    version = make_checkpoint(folder / "model.pt")
    return folder, str(folder / "model.pt"), version


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_scoring_killed_anywhere_then_rerun_scores_each_image_once(scoring_setup, tmp_path: Path, seed: int) -> None:
    folder, checkpoint, version = scoring_setup
    out = str(tmp_path / "out")
    cmd = [sys.executable, "-c", _SCORER, str(folder / "src"), checkpoint, out, DATE]
    _kill_at_random(cmd, seed, lambda p: p.stdout.readline().strip() == "ready", max_delay_s=1.5)
    done = len(list_parts(out, version))
    config = ScoringConfig(batch_size=4, progress=False)
    objects = list_source(str(folder / "src")).objects
    plan = plan_scoring(objects, out, version, config.settings, 3)
    assert plan.skipped_unchanged == done and plan.pending == 16 - done  # the output is the state
    list(score_shards(plan.shards, checkpoint=checkpoint, out=out, date=DATE, config=config))
    uris = read_predictions(out, version, latest=False).column("uri").to_pylist()
    assert sorted(uris) == sorted(o.uri for o in objects)  # complete, and no image twice


@pytest.fixture(scope="module")
def straight_nima(toy_root: Path) -> pd.DataFrame:  # noqa: F811
    cfg = resolve_config("cpu-smoke", {**TINY, "epochs": 3})
    torch.set_num_threads(1)  # as in the killed child (OMP_NUM_THREADS=1): bitwise-equal runs need it
    fit(cfg, root=str(toy_root), method="nima", run_id="nima-straight-ref", resume=False)
    return _metrics(toy_root, "nima-straight-ref").drop(columns=TIMING)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [11, 12])
def test_training_killed_anywhere_resumes_from_its_last_checkpoint(toy_root: Path, straight_nima: pd.DataFrame,  # noqa: F811
                                                                    seed: int, caplog) -> None:
    run_id = f"nima-kill-{seed}"
    overrides = {**TINY, "epochs": 3}
    cmd = [sys.executable, "-m", "tasks.training", "nima", "--root", str(toy_root), "--preset", "cpu-smoke",
           "--run-id", run_id, *[a for k, v in overrides.items() for a in ("--set", f"{k}={v}")]]
    paths = run_paths(str(toy_root), run_id)
    _kill_at_random(cmd, seed, lambda p: Path(paths.config).exists(), max_delay_s=4.0)
    last = Path(paths.last)
    killed_after = int(load_checkpoint(last.read_bytes())["epoch"]) if last.exists() else None
    caplog.set_level(logging.INFO, logger="mpemd")
    fit(resolve_config("cpu-smoke", overrides), root=str(toy_root), method="nima", run_id=run_id)
    if killed_after is not None:
        assert f"resuming {run_id} after epoch {killed_after + 1}" in caplog.text
    else:
        assert "resuming" not in caplog.text  # killed before the first checkpoint: starts afresh
    resumed = _metrics(toy_root, run_id).drop(columns=TIMING)
    pd.testing.assert_frame_equal(resumed, straight_nima, check_exact=True)
