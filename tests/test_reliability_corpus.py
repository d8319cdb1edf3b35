"""The bad-input corpus (tests/corpus) through every stage: each item handled right or refused with
its reason, the run completes, count in == count out. The label corpus through the parser."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from model.checkpoint import load_checkpoint
from model.networks import backbone_config
from tasks.core import storage
from tasks.ingest.labels import parse_labels_text
from tasks.scoring.listing import SourceObject
from tasks.scoring.scorer import ImageDataset, ScoringConfig, config_from_checkpoint
from tasks.training.datasets import make_loader
from tests.corpus.make_corpus import (
    ALWAYS_FILES,
    ALWAYS_FORMATS,
    canonical_pixels,
    expected_counts,
    formats_of,
    image_corpus_files,
    label_corpus_lines,
    make_label_corpus,
    skipped_codecs,
)
from tests.corpus.stages import StageRun, corpus_dataset, run_ingest, run_scoring, run_training_path
from tests.scoring_fixtures import make_checkpoint

REPO = Path(__file__).resolve().parents[1]
REFUSED = {"rejected", "error", "skipped"}
# Items whose displayed pixels must equal the canonical picture (EXIF applied, colour converted).
CANONICAL = [f"exif_orientation_{o}.jpg" for o in range(2, 9)] + ["cmyk.jpg", "with space.jpg", "ünïcödé_写真.jpg",
                                                                   "..dots..jpg", "-leading-dash.jpg"]


# One torch thread: bitwise-equal runs across processes, and a 2-core machine is not oversubscribed.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def assert_every_item(run: StageRun, allowed_skips: tuple[str, ...] = ()) -> None:
    """Every corpus item has exactly the expected fate; nothing is missing; count in == count out."""
    assert run.n_in == run.n_out == len(run.items)
    assert set(run.outcomes) == {it.name for it in run.items}, "an item vanished"
    for it in run.items:
        got = run.outcomes[it.name]
        if it.name.endswith(allowed_skips):
            assert got.status == "skipped", (it.name, got)
        elif it.expect == "ok":
            assert (got.status, got.width, got.height) == ("ok", it.width, it.height), (it.name, got)
        else:
            assert got.status in REFUSED and it.reason_contains in got.reason.lower(), (it.name, got)


@pytest.mark.parametrize("full_decode", [False, True], ids=["header-check", "full-decode"])
def test_ingest_handles_the_whole_corpus(tmp_path: Path, full_decode: bool) -> None:
    run = run_ingest(tmp_path, full_decode=full_decode)
    assert_every_item(run)
    summary = run.extra["summary"]
    n_bad = sum(it.expect == "error" for it in run.items)
    assert sum(summary["rejected"].values()) == n_bad and sum(summary["splits"].values()) == len(run.items) - n_bad
    # Only verified images were copied; a refused file never lands under {root}/ava/images.
    copied = {p.name for p in (Path(run.extra["root"]) / "ava" / "images").iterdir()}
    assert copied == {f"{it.image_id}.jpg" for it in run.items if it.expect == "ok"}


def _hwc(tensor: torch.Tensor) -> np.ndarray:
    return tensor.permute(1, 2, 0).numpy().astype(np.float64)


def test_training_data_path_handles_the_whole_corpus(tmp_path: Path) -> None:
    run = run_training_path(tmp_path)
    assert_every_item(run)
    n_ok = sum(it.expect == "ok" for it in run.items)
    assert run.extra["batch_shape"] == (n_ok, 2, 3, 64, 64)  # every good item became a full sample


def test_training_data_path_applies_exif_and_converts_colour(tmp_path: Path) -> None:
    items, dataset = corpus_dataset(tmp_path, method="nima", train=False)
    canonical = canonical_pixels().astype(np.float64)
    mirrored = canonical[:, ::-1]  # what a missed flip looks like
    for index, it in enumerate(items):
        if it.name in CANONICAL:
            pixels = _hwc(dataset.load_image(index))
            assert np.abs(pixels - canonical).mean() < 6, it.name  # JPEG noise only
            assert np.abs(pixels - mirrored).mean() > 40, it.name
    # An epoch through the real DataLoader: every index comes back once, as a sample or a skip.
    loader = make_loader(dataset, batch_size=5, shuffle=True, seed=1, num_workers=0, pin_memory=False)
    loader.sampler.set_epoch(0)
    seen = [i for b in loader for i in [*b.indices.tolist(), *(s.index for s in b.skipped)]]
    assert sorted(seen) == list(range(len(items)))


@pytest.fixture(scope="module")
def scorer_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    path = tmp_path_factory.mktemp("model") / "model.pt"
    return str(path), make_checkpoint(path)


def test_scoring_handles_the_whole_corpus(tmp_path: Path, scorer_checkpoint: tuple[str, str]) -> None:
    checkpoint, version = scorer_checkpoint
    run = run_scoring(tmp_path, checkpoint, version)
    # Every format is scored (animated GIF, BMP, TIFF, no extension...); a file that is not an image by
    # name or content is skipped and counted (tasks/scoring/listing.py), never lost.
    assert_every_item(run, allowed_skips=("notes.txt",))
    assert run.extra["listing"].by_content == 2  # IMG_0001 and scan.dat
    rows = run.extra["rows"]
    uris = [r["uri"] for r in rows]
    assert len(uris) == len(set(uris)) == len(run.extra["listing"].objects)
    for row in rows:
        if row["status"] == "ok":
            assert abs(sum(row["dist"]) - 1) < 1e-4 and 1 <= row["score"] <= 10
        else:
            assert row["dist"] is None and row["score"] is None and row["error"]


def test_scoring_applies_exif_and_converts_colour(tmp_path: Path, scorer_checkpoint: tuple[str, str]) -> None:
    checkpoint, _ = scorer_checkpoint
    info = load_checkpoint(storage.read_bytes(checkpoint))
    config: ScoringConfig = config_from_checkpoint(info, progress=False)
    from tests.corpus.make_corpus import make_image_corpus

    items = make_image_corpus(tmp_path / "src")
    reference = {}
    for name, picture in (("canonical.png", canonical_pixels()), ("mirrored.png", canonical_pixels()[:, ::-1])):
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(picture)).save(buffer, "PNG")  # lossless: the exact picture
        (tmp_path / name).write_bytes(buffer.getvalue())
        reference[name] = SourceObject(str(tmp_path / name))
    objects = [SourceObject(str(tmp_path / "src" / it.name)) for it in items if it.name in CANONICAL]
    dataset = ImageDataset([*objects, *reference.values()], backbone_config(info["backbone"]), config)
    views = [None if item.views is None else item.views.float() for item in (dataset[i] for i in range(len(dataset)))]
    canonical, mirrored = views[-2], views[-1]
    assert canonical is not None and canonical.shape[0] == config.patches.n_patches
    for obj, v in zip(objects, views, strict=False):
        assert v is not None, obj.uri
        near, far = (v - canonical).abs().mean(), (v - mirrored).abs().mean()
        assert near < 0.25 * far, (obj.uri, float(near), float(far))


def test_label_corpus_through_the_parser() -> None:
    lines = label_corpus_lines()
    parsed = parse_labels_text(make_label_corpus(), uri="corpus/AVA.txt")
    non_blank = [n for n, line in enumerate(lines, 1) if line.expect != "skip"]
    assert parsed.n_lines == len(non_blank) == parsed.labels.num_rows + parsed.rejected.num_rows
    rejected = {r["line_number"]: r for r in parsed.rejected.to_pylist()}
    labelled = parsed.labels.column("line_number").to_pylist()
    for n, line in enumerate(lines, 1):
        if line.expect == "ok":
            assert n in labelled and n not in rejected
        elif line.expect == "rejected":
            assert line.reason_contains in rejected[n]["reason"].lower(), (line.text, rejected[n])
            assert rejected[n]["uri"] == "corpus/AVA.txt"
        else:
            assert n not in labelled and n not in rejected
    # The CRLF line is parsed like its LF twin; the duplicate's first occurrence keeps its label.
    table = parsed.labels.to_pylist()
    assert table[0]["rating_counts"] == table[1]["rating_counts"]
    assert table[0]["image_id"] == 910001 and labelled.count(1) == 1


def test_the_corpus_holds_every_format_this_pillow_reads_and_says_what_it_skipped(tmp_path: Path) -> None:
    """45 files in 16 formats where Pillow has JPEG 2000 and AVIF (here); one file and one format fewer
    per missing codec, named on the maker's last line, never dropped silently."""
    files, formats = expected_counts()
    made = image_corpus_files()
    assert len(made) == files and formats_of(made) == formats
    assert ALWAYS_FILES == 43 and len(ALWAYS_FORMATS) == 14 and files - ALWAYS_FILES == len(formats - ALWAYS_FORMATS)
    printed = subprocess.run([sys.executable, "-m", "tests.corpus.make_corpus", str(tmp_path)], cwd=REPO,
                             capture_output=True, text=True, check=True, timeout=300).stdout.splitlines()
    skipped = ", ".join(skipped_codecs()) or "none"
    assert printed[-2:] == [f"{files} files, {len(formats)} image formats",
                            f"skipped (this Pillow lacks the codec): {skipped}"]
    assert len(list(tmp_path.iterdir())) == files + 1  # and AVA.txt


def test_a_pillow_without_avif_makes_one_file_and_one_format_fewer_and_names_it(monkeypatch) -> None:
    from PIL import features

    has = features.check
    monkeypatch.setattr(features, "check", lambda name: name != "avif" and has(name))
    files, formats = expected_counts()
    made = image_corpus_files()
    assert "AVIF (avif)" in skipped_codecs() and "AVIF" not in formats
    assert len(made) == files and formats_of(made) == formats and "modern.avif" not in {it.name for it, _ in made}
