"""Progress lines: the last line of a job reaches its total, or says what was left undone; training says
how many images a dropped last batch left out."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from benchmarks.toy_data import write_toy_dataset
from tasks.core.progress import Progress
from tasks.scoring.listing import cut_into_shards, list_source
from tasks.scoring.scorer import ScoringConfig, score_shards
from tasks.training.loop import fit
from tasks.training.presets import resolve_config
from tests.scoring_fixtures import make_checkpoint, write_images

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _lines(caplog: pytest.LogCaptureFixture, start: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mpemd" and r.getMessage().startswith(start)]


def test_a_job_stopped_short_never_says_done(caplog):
    caplog.set_level(logging.INFO, logger="mpemd")
    with Progress(10, "copy", disable=True) as bar:
        bar.update(4)
    (line,) = _lines(caplog, "copy:")
    assert line.startswith("copy: 4/10 img") and "6 img not done" in line and "done in" not in line


def test_scoring_shard_by_shard_ends_at_its_total(tmp_path: Path, caplog):
    """7 images in shards of 3 (batches of 2): the caller takes each shard's rows and stops after the
    last row, so a bar counted after its rows were handed out stopped at 6/7."""
    write_images(tmp_path / "photos", 7)
    checkpoint = str(tmp_path / "model.pt")
    make_checkpoint(checkpoint)
    objects = list_source(str(tmp_path / "photos")).objects
    caplog.set_level(logging.INFO, logger="mpemd")
    results = list(score_shards(cut_into_shards(objects, 3), checkpoint=checkpoint, out=str(tmp_path / "out"),
                                date="2026-02-03", config=ScoringConfig(batch_size=2, progress=False)))
    assert sum(r.images for r in results) == 7
    (last,) = [line for line in _lines(caplog, "score 7 images:") if "(done in" in line or "not done" in line]
    assert last.startswith("score 7 images: 7/7 img") and "(done in" in last, last


def test_training_says_how_many_images_the_dropped_last_batch_left_out(tmp_path: Path, caplog):
    write_toy_dataset(tmp_path, n_train=23, n_val=4, short_side=(72, 100))
    cfg = resolve_config("cpu-smoke", {"image_size": 64, "batch_size": 5, "epochs": 1, "n_patches": 2,
                                       "num_workers": 0})
    caplog.set_level(logging.INFO, logger="mpemd")
    fit(cfg, root=str(tmp_path), method="nima", run_id="nima-drop", resume=False)
    done = [line for line in (r.getMessage() for r in caplog.records) if "(done in" in line]
    train = [line for line in done if re.search(r"train\b", line.split(":")[0])]
    assert len(train) == 1, done
    assert "3 of 23 img in the dropped last partial batch" in train[0] and ": 20/20 img" in train[0], train[0]
