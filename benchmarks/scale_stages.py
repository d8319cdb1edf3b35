"""The stages of ``benchmarks/bench_scale.py``: for each, its sizes and how one point's inputs are made.

``prepare(folder, n)`` makes the inputs of size ``n`` under ``folder`` (not measured) and returns the
commands to measure, in order: ``(series name, argv, output folder, check)``; ``check(stdout)`` asserts
the run did what it must (e.g. a no-op scored nothing; an SQL answer equals the exact computation)
and may return extra figures for the table.

    python -m benchmarks.scale_stages train-epoch MANIFEST   # the training stage's measured child
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

BIN = Path(sys.executable).parent
MPEMD = str(BIN / "mpemd")
DATE = "2026-01-01"
NIGHTS = 20  # nights of history in the SQL stage: night 0 scores every image, each later one 10% again
RESCORED = 0.1
SPOT_CHECK_ROWS = 3_000_000  # the SQL answer is compared with the exact (pandas) computation up to here
BOOTSTRAP_ROWS = 10_000_000  # bootstrap's cost is images x resamples: 23 CPU-s at 10^6 rows
COMPARE_ROWS = 100_000_000  # compare_models: 21 CPU-s at 3x10^7 rows (b92d840)
LINKS_PER_FILE = 50_000

Run = tuple[str, list[str], Path | None, Callable[[str], dict | None] | None]


@dataclass(frozen=True)
class Stage:
    unit: str
    quick: list[int]
    full: list[int]
    prepare: Callable[[Path, int], list[Run]]


def tiny_jpeg(width: int, height: int, seed: int = 0) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(base).resize((width, height)).save(buffer, "JPEG", quality=80)
    return buffer.getvalue()


def hard_linked(folder: Path, names: list[str], blob: bytes) -> list[Path]:
    """One JPEG's bytes under each of ``names`` (relative paths), as hard links: a new original every
    ``LINKS_PER_FILE`` names (ext4 allows 65,000 links to one file)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, name in enumerate(names):
        if index % LINKS_PER_FILE == 0:
            original = folder.parent / f".{folder.name}-original-{index}.jpg"
            original.write_bytes(blob)
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        os.link(original, path)
        paths.append(path)
    return paths


def _summary(stdout: str) -> dict[str, Any]:
    return json.loads(stdout[stdout.index("{"):])


# --- ingest: label lines + a mirror of hard-linked JPEGs, first run and rerun --------------------


def write_labels(folder: Path, n: int) -> Path:
    """``n`` AVA-format label lines, images 1..n, in ``folder/AVA.txt``."""
    rng = np.random.default_rng(0)
    votes = rng.integers(0, 40, size=(n, 10))
    votes[:, 4] += 1  # every image has a vote
    labels = folder / "AVA.txt"
    with labels.open("w") as f:
        for i in range(n):
            f.write(f"{i + 1} {i + 1} {' '.join(map(str, votes[i]))} 0 0 0\n")
    return labels


def prepare_ingest(folder: Path, n: int) -> list[Run]:
    labels = write_labels(folder, n)
    hard_linked(folder / "images", [f"{i + 1}.jpg" for i in range(n)], tiny_jpeg(160, 120))
    root = folder / "root"
    cmd = [MPEMD, "ingest", "--labels", str(labels), "--images", str(folder / "images"), "--root", str(root),
           "--mode", "reference"]
    return [("first run", cmd, root, None), ("rerun", cmd, root, None)]


# --- scoring and the nightly no-op -------------------------------------------------------------


def tiny_checkpoint(path: Path) -> str:
    import torch

    from model.checkpoint import save_checkpoint
    from model.networks import build_model

    torch.manual_seed(0)
    save_checkpoint(str(path), build_model("mobilenet_v3_small", "none", input_size=64),
                    metadata={"method": "nima", "stage": "nima"})
    return str(path)


def _bucket(folder: Path, n: int) -> Path:
    bucket = folder / "bucket"
    hard_linked(bucket, [f"{i // 1000:05d}/{i + 1}.jpg" for i in range(n)], tiny_jpeg(64, 48))
    return bucket


def _score_cmd(source: Path | str, ckpt: str, out: Path | str) -> list[str]:
    return [MPEMD, "score", str(source), "--checkpoint", ckpt, "--out", str(out), "--date", DATE,
            "--device", "cpu", "--num-workers", "0", "--batch-size", "64"]


def _expect(scored: int, unchanged: int) -> Callable[[str], dict]:
    def check(stdout: str) -> dict:
        summary = _summary(stdout)
        assert (summary["scored"], summary["skipped_unchanged"]) == (scored, unchanged), summary
        return {}

    return check


def prepare_scoring(folder: Path, n: int) -> list[Run]:
    bucket = _bucket(folder, n)
    ckpt = tiny_checkpoint(folder / "tiny.pt")
    out = folder / "out"
    cmd = _score_cmd(bucket, ckpt, out)
    return [("first run", cmd, out, _expect(n, 0)), ("no-op rerun", cmd, out, _expect(0, n))]


def prepare_noop(folder: Path, n: int) -> list[Run]:
    """A bucket of ``n`` images whose output already holds a row for each (see ``write_scored_state``)."""
    bucket = _bucket(folder, n)
    ckpt = tiny_checkpoint(folder / "tiny.pt")
    out = folder / "out"
    write_scored_state(str(bucket), str(out), ckpt, folder / "seed")
    return [("no-op rerun", _score_cmd(bucket, ckpt, out), out, _expect(0, n))]


def write_scored_state(source: str, out: str, ckpt: str, seed: Path) -> None:
    """Make ``out`` hold a row for each image of ``source`` (a folder or bucket URL), as a finished
    (compacted) ``mpemd score`` leaves it: one image scored for real gives the row (model version,
    settings); the listing of the source (``list_source``, what the run lists) gives each image's facts."""
    import subprocess

    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.core import storage
    from tasks.scoring.listing import list_source

    hard_linked(seed, ["0.jpg"], tiny_jpeg(64, 48))
    subprocess.run(_score_cmd(seed, ckpt, out), check=True, capture_output=True,
                   env=dict(os.environ, PREFECT_API_URL=""))
    fs, out_path = storage.filesystem(out)
    (part,) = [p for p in fs.find(out_path) if p.rsplit("/", 1)[-1].startswith("part-")]
    with fs.open(part, "rb") as f:
        seeded = pq.read_table(f)
    row = seeded.to_pylist()[0]
    objects = list_source(source).objects
    columns = {name: [row[name]] * len(objects) for name in row}
    columns.update(uri=[o.uri for o in objects], image_id=[o.image_id for o in objects],
                   source_size=[o.size for o in objects], source_mtime=[o.mtime for o in objects],
                   source_etag=[o.etag for o in objects])
    table = pa.table(columns, schema=seeded.schema)
    fs.rm(part)
    with fs.open(f"{part.rsplit('/', 1)[0]}/part-00000-00000000000000aa.parquet", "wb") as f:
        pq.write_table(table, f)


# --- SQL over a nightly history ---------------------------------------------------------------


def write_history(root: Path, rows: int, seed: int = 0) -> int:
    """Two model versions (``base`` and ``bench``) scored on ``NIGHTS`` nights: night 0 every image,
    each later night a random ``RESCORED`` share again (a newer scored_at, another score), one file per
    (version, night) written in row groups of <= 1 M rows. ``rows`` in all; returns the image count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from benchmarks.bench_sql import _prediction_part
    from tasks.core.schemas import REJECTED_SCHEMA

    rng = np.random.default_rng(seed)
    n_images = max(10, int(rows / (2 * (1 + RESCORED * (NIGHTS - 1)))))
    (root / "manifests").mkdir(parents=True)
    writers: dict[tuple[str, int], pq.ParquetWriter] = {}
    manifest_writer = None
    chunk = 1_000_000
    for start in range(0, n_images, chunk):
        n = min(chunk, n_images - start)
        ids = pa.array(np.arange(start, start + n, dtype=np.int64))
        uri = pa.array([f"s3://bench/images/{i}.jpg" for i in range(start, start + n)])
        ratio = np.where(rng.random(n) < 0.8, rng.choice([0.6667, 0.75, 1.0, 1.5], n), rng.lognormal(-0.2, 0.4, n))
        true = np.clip(rng.normal(5.4, 0.75, n), 1, 10).round(3)
        manifest = pa.table({"image_id": ids, "uri": uri, "split": np.where(rng.random(n) < 0.9, "test", "val"),
                             "score_mean": true, "score_std": np.full(n, 1.4), "aspect_ratio": ratio,
                             "width": np.full(n, 1000, np.int32), "height": (1000 * ratio).astype(np.int32)})
        if manifest_writer is None:
            manifest_writer = pq.ParquetWriter(root / "manifests" / "test.parquet", manifest.schema)
        manifest_writer.write_table(manifest)
        for night in range(NIGHTS):
            take = np.arange(n) if night == 0 else np.flatnonzero(rng.random(n) < RESCORED)
            stamp = f"2025-12-{night + 1:02d}T02:00:00"
            for version, bias in (("base", 0.6), ("bench", 0.0)):
                part = _prediction_part(rng, ids.take(take), uri.take(take), true[take] + bias, ratio[take], stamp)
                key = (version, night)
                if key not in writers:
                    folder = root / "predictions" / f"model_version={version}" / f"date={stamp[:10]}"
                    folder.mkdir(parents=True)
                    writers[key] = pq.ParquetWriter(folder / f"part-00000-{night:016x}.parquet", part.schema,
                                                    compression="zstd")
                writers[key].write_table(part)
    for writer in [*writers.values(), manifest_writer]:
        writer.close()
    pq.write_table(pa.Table.from_batches([], schema=REJECTED_SCHEMA), root / "manifests" / "rejected.parquet")
    return n_images


def _exact_errors(root: Path) -> Callable[[str], dict]:
    """The CLI's per-bin table equals the plain pandas computation (bench_sql.run_pandas) to 1e-9."""
    def check(stdout: str) -> dict:
        import pandas as pd

        from benchmarks.bench_sql import COLUMNS, run_pandas

        cli = pd.read_csv(io.StringIO(stdout))
        exact = run_pandas(root)["rows"]
        for column in COLUMNS[1:]:
            np.testing.assert_allclose(cli[column].astype(float), exact[column].astype(float), rtol=1e-9,
                                       atol=1e-9, equal_nan=True, err_msg=column)
        return {"spot_checked": True}

    return check


def prepare_sql(folder: Path, n: int) -> list[Run]:
    root = folder / "data"
    write_history(root, n)

    def query(name: str, *params: str) -> list[str]:
        return [MPEMD, "sql", name, "--root", str(root), *(a for p in params for a in ("--param", p)),
                "--format", "csv"]

    check = _exact_errors(root) if n <= SPOT_CHECK_ROWS else None
    runs: list[Run] = [
        ("errors_by_aspect_bin", query("errors_by_aspect_bin", "model_version=bench"), None, check),
        ("prediction_sets", query("prediction_sets"), None, None)]
    if n <= COMPARE_ROWS:
        runs.append(("compare_models", query("compare_models", "nima_version=base", "mpemd_version=bench"), None,
                     None))
    if n <= BOOTSTRAP_ROWS:
        runs.append(("bootstrap (100 resamples)", query("bootstrap", "baseline_version=base",
                                                        "candidate_version=bench", "n_resamples=100"), None, None))
    return runs


# --- training data path -------------------------------------------------------------------------


def prepare_training(folder: Path, n: int) -> list[Run]:
    import pyarrow.parquet as pq

    from benchmarks.toy_data import manifest_table

    paths = hard_linked(folder / "images", [f"{i // 1000:05d}/{i + 1}.jpg" for i in range(n)], tiny_jpeg(160, 120))
    rows = [{"image_id": i + 1, "uri": str(p), "split": "train", "rating_counts": [1] * 10, "n_ratings": 10,
             "score_mean": 5.5, "score_std": 2.9, "width": 160, "height": 120, "aspect_ratio": 0.75,
             "aspect_bin": "0.6-0.8", "semantic_tags": [], "challenge_id": 0} for i, p in enumerate(paths)]
    manifest = folder / "train.parquet"
    pq.write_table(manifest_table(rows), manifest)
    cmd = [sys.executable, "-m", "benchmarks.scale_stages", "train-epoch", str(manifest)]
    return [("mpemd epoch (data path)", cmd, None, lambda out: json.loads(out.strip().splitlines()[-1]))]


def train_epoch(manifest: str) -> dict[str, float]:
    """One shuffled epoch of MPEMD training samples (|P| = 8 patches of 64 px) through the DataLoader:
    the start-up (manifest read to first batch) and the per-image cost after it."""
    from model.networks import backbone_config
    from tasks.training.datasets import ManifestDataset, make_loader, read_manifest

    start = time.perf_counter()  # after the imports: torch's import is the same at every size
    records = read_manifest(manifest)
    dataset = ManifestDataset(records, backbone_config("mobilenet_v3_small", 64), "mpemd", train=True, n_patches=8,
                              seed=0)
    loader = make_loader(dataset, batch_size=32, shuffle=True, seed=0, num_workers=0, pin_memory=False)
    loader.sampler.set_epoch(0)
    batches = iter(loader)
    seen = len(next(batches))
    startup = time.perf_counter() - start
    for batch in batches:
        seen += len(batch)
    rest = time.perf_counter() - start - startup
    assert seen == len(records), (seen, len(records))
    return {"startup_s": round(startup, 3), "us_per_image_after_startup": round(1e6 * rest / max(seen - 32, 1), 1)}


STAGES = {
    "ingest": Stage("image", [300, 1_000, 3_000, 10_000], [10_000, 30_000, 100_000, 255_530, 1_000_000],
                    prepare_ingest),
    "noop": Stage("image", [300, 1_000, 3_000, 10_000], [10_000, 30_000, 100_000, 300_000, 1_000_000], prepare_noop),
    "scoring": Stage("image", [100, 300, 1_000, 3_000], [1_000, 3_000, 10_000, 30_000, 100_000], prepare_scoring),
    "sql": Stage("row", [30_000, 100_000, 300_000, 1_000_000], [1_000_000, 3_000_000, 10_000_000, 30_000_000, 100_000_000],
                 prepare_sql),
    "training": Stage("image", [100, 300, 1_000, 3_000], [1_000, 3_000, 10_000, 30_000, 100_000], prepare_training),
}


if __name__ == "__main__":
    if sys.argv[1:2] == ["train-epoch"]:
        print(json.dumps(train_epoch(sys.argv[2])))
