"""``ingest-ava`` end to end on real files: a synthetic AVA with broken files of every kind and
EXIF-rotated ones, from a local folder (through the CLI and the Prefect flow), from S3 (moto on
loopback), and over HTTP with transient errors and an interrupted run."""

from __future__ import annotations

import hashlib
import http.server
import io
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageOps

from model.aspect_bins import aspect_bin
from tasks.core import storage
from tasks.ingest.fetch import FetchConfig, fetch_images, load_state
from tasks.ingest.manifests import MANIFEST_SCHEMA, hash_split, read_manifest_table
from tasks.ingest.pipeline import ingest_ava
from tasks.ingest.settings import IngestParams
from tasks.ingest.synth import synthesize_ava

N_IMAGES = 120
BAD_LABEL_LINES = ["121 5 not a label line", "122 {dup} 1 1 1 1 1 1 1 1 1 1 0 0 1",
                   "123 77777 0 0 0 0 0 0 0 0 0 0 0 0 3"]
EXPECTED_REJECTED = {"decode": 4, "fetch": 2, "label": 1, "parse": 2}


def _bomb_png() -> bytes:
    """A valid 1x1 PNG whose header claims 30000 x 30000 pixels (CRC fixed)."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = data[12:29]  # type + 13 data bytes
    ihdr[4:12] = struct.pack(">II", 30000, 30000)
    data[12:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(ihdr)))
    return bytes(data)


def _rotate_exif(path: Path, orientation: int) -> None:
    img = Image.open(path)
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=90, exif=exif.tobytes())
    path.write_bytes(buffer.getvalue())


@pytest.fixture(scope="session")
def mirror(tmp_path_factory) -> dict:
    """A synthetic AVA folder with broken files of each kind, EXIF-rotated ones, and bad label lines."""
    out = tmp_path_factory.mktemp("mirror")
    synthesize_ava(str(out), N_IMAGES, seed=11, workers=1)
    lines = (out / "AVA.txt").read_text().splitlines()
    ids = [int(line.split()[1]) for line in lines]
    images = out / "images"
    (images / f"{ids[0]}.jpg").unlink()  # missing
    (images / f"{ids[1]}.jpg").write_bytes(b"")  # empty
    full = (images / f"{ids[2]}.jpg").read_bytes()
    (images / f"{ids[2]}.jpg").write_bytes(full[: len(full) // 2])  # truncated
    (images / f"{ids[3]}.jpg").write_bytes(b"<!DOCTYPE html><html>404 Not Found</html>")  # not an image
    (images / f"{ids[4]}.jpg").write_bytes(_bomb_png())  # decompression bomb
    # Unsupported format: EPS (Pillow identifies it, but decoding would run Ghostscript). PPM and the
    # other formats Pillow decodes natively are accepted (tests/test_reliability_corpus.py).
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\nshowpage\n%%EOF\n"
    (images / f"{ids[5]}.jpg").write_bytes(eps)
    # EXIF rotation only shows on non-square images.
    turn = [i for i in ids[6:] if len(set(Image.open(images / f"{i}.jpg").size)) == 2][:2]
    _rotate_exif(images / f"{turn[0]}.jpg", 6)
    _rotate_exif(images / f"{turn[1]}.jpg", 8)
    bad = [line.format(dup=ids[10]) for line in BAD_LABEL_LINES]
    (out / "AVA.txt").write_text("\n".join(lines + bad) + "\n")
    return {"dir": out, "ids": ids, "broken": ids[:6], "rotated": {turn[0]: 6, turn[1]: 8}}


def _all_manifests(root: str) -> pa.Table:
    return pa.concat_tables([read_manifest_table(root, s) for s in ("train", "val", "test")])


def _check_manifests(root: str, mirror: dict, images_dir: Path) -> pa.Table:
    table = _all_manifests(root)
    assert table.schema == MANIFEST_SCHEMA
    rejected = read_manifest_table(root, "rejected")
    lines = [line for line in (mirror["dir"] / "AVA.txt").read_text().splitlines() if line.strip()]
    assert table.num_rows + rejected.num_rows == len(lines)  # count in == count out
    stages = rejected.column("stage").to_pylist()
    assert {s: stages.count(s) for s in set(stages)} == EXPECTED_REJECTED
    assert set(mirror["broken"]) <= set(rejected.column("image_id").to_pylist())
    assert len(set(table.column("image_id").to_pylist())) == table.num_rows == N_IMAGES - 6

    raw = {int(f[1]): np.array(f[2:12], dtype=np.int64) for f in (line.split() for line in lines[:N_IMAGES])}
    for row in table.to_pylist():
        counts = raw[row["image_id"]]
        assert row["rating_counts"] == counts.tolist() and row["n_ratings"] == counts.sum()
        assert row["score_mean"] == pytest.approx((counts * np.arange(1, 11)).sum() / counts.sum())
        data = (images_dir / f"{row['image_id']}.jpg").read_bytes()
        assert hashlib.md5(data).hexdigest() == row["checksum"] and row["bytes"] == len(data)
        shown = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
        assert (row["width"], row["height"]) == shown.size
        assert row["aspect_ratio"] == pytest.approx(row["height"] / row["width"])
        assert row["aspect_bin"] == aspect_bin(row["height"] / row["width"])
        assert row["split"] == hash_split(np.array([row["image_id"]]), 0)[0]
    rotated = {r["image_id"]: r for r in table.to_pylist() if r["image_id"] in mirror["rotated"]}
    for image_id, orientation in mirror["rotated"].items():
        r = rotated[image_id]
        assert r["orientation"] == orientation
        assert (r["width"], r["height"]) == (r["raw_height"], r["raw_width"]) and r["width"] != r["height"]
    return table


def test_ingest_local_through_cli_and_flow(mirror, tmp_path, prefect_harness):
    from flows.cli import main

    root = str(tmp_path / "root")
    args = ["ingest", "--labels", str(mirror["dir"] / "AVA.txt"), "--images", str(mirror["dir"] / "images"),
            "--root", root]
    assert main(args) == 0
    table = _check_manifests(root, mirror, Path(root) / "ava" / "images")
    assert (Path(root) / "ava" / "AVA.txt").read_bytes() == (mirror["dir"] / "AVA.txt").read_bytes()
    hist = storage.read_parquet(os.path.join(root, "stats", "aspect_ratio_histogram.parquet"))
    assert sum(hist.column("count").to_pylist()) == table.num_rows
    assert (Path(root) / "stats" / "aspect_ratio_histogram.png").read_bytes()[:4] == b"\x89PNG"
    assert "0.6-0.8" in (Path(root) / "stats" / "aspect_ratio_histogram.md").read_text()
    splits_before = dict(zip(table.column("image_id").to_pylist(), table.column("split").to_pylist(), strict=True))

    # Rerun: nothing verified is fetched again, nothing is duplicated, the split is unchanged.
    from flows.ingest_ava import ingest_ava_flow

    summary = ingest_ava_flow(labels=str(mirror["dir"] / "AVA.txt"),
                              images=str(mirror["dir"] / "images"), root=root)
    assert summary["skipped"] == N_IMAGES - 6 and summary["fetched"] == 5  # the broken files are retried
    again = _check_manifests(root, mirror, Path(root) / "ava" / "images")
    assert dict(zip(again.column("image_id").to_pylist(), again.column("split").to_pylist(),
                    strict=True)) == splits_before


def test_adding_images_keeps_every_split(mirror, tmp_path):
    src = tmp_path / "grown"
    shutil.copytree(mirror["dir"], src)
    root = str(tmp_path / "root")
    first = ingest_ava(IngestParams(labels=str(src / "AVA.txt"), images=str(src / "images"), root=root))
    before = _all_manifests(root)
    more = tmp_path / "more"
    synthesize_ava(str(more), 30, seed=99, workers=1)
    new_lines = [line for line in (more / "AVA.txt").read_text().splitlines()
                 if int(line.split()[1]) not in set(mirror["ids"])]
    for line in new_lines:
        image_id = line.split()[1]
        shutil.copy(more / "images" / f"{image_id}.jpg", src / "images" / f"{image_id}.jpg")
    with open(src / "AVA.txt", "a") as f:
        f.write("\n".join(new_lines) + "\n")
    second = ingest_ava(IngestParams(labels=str(src / "AVA.txt"), images=str(src / "images"), root=root))
    after = _all_manifests(root)
    assert after.num_rows == before.num_rows + len(new_lines)
    old = dict(zip(before.column("image_id").to_pylist(), before.column("split").to_pylist(), strict=True))
    new = dict(zip(after.column("image_id").to_pylist(), after.column("split").to_pylist(), strict=True))
    assert all(new[i] == s for i, s in old.items())
    assert second["fetched"] == len(new_lines) + 5 and second["skipped"] == first["fetched"] - 5 == N_IMAGES - 6


@pytest.mark.s3
def test_ingest_from_and_to_s3(mirror, s3_bucket):
    fs, _ = storage.filesystem(s3_bucket)
    fs.put(str(mirror["dir"] / "images"), f"{s3_bucket[5:]}/raw/images", recursive=True)
    fs.put(str(mirror["dir"] / "AVA.txt"), f"{s3_bucket[5:]}/raw/AVA.txt")
    root = storage.join(s3_bucket, "out")
    summary = ingest_ava(IngestParams(labels=storage.join(s3_bucket, "raw/AVA.txt"),
                                      images=storage.join(s3_bucket, "raw/images"), root=root, max_concurrency=8))
    assert summary["rejected"] == EXPECTED_REJECTED
    table = _all_manifests(root)
    assert table.num_rows == N_IMAGES - 6
    uris = table.column("uri").to_pylist()
    assert all(u.startswith(f"{root}/ava/images/") for u in uris)
    row = table.slice(0, 1).to_pylist()[0]
    assert hashlib.md5(storage.read_bytes(row["uri"])).hexdigest() == row["checksum"]
    assert storage.exists(storage.join(root, "stats", "aspect_ratio_histogram.png"))
    again = ingest_ava(IngestParams(labels=storage.join(s3_bucket, "raw/AVA.txt"),
                                    images=storage.join(s3_bucket, "raw/images"), root=root))
    assert again["skipped"] == N_IMAGES - 6 and _all_manifests(root).num_rows == N_IMAGES - 6


class _FlakyHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the mirror; every file's first request fails with 503, and each answer is slow."""

    seen: ClassVar[set[str]] = set()
    lock = threading.Lock()
    delay = 0.02

    def do_GET(self):
        time.sleep(self.delay)
        with self.lock:
            first = self.path not in self.seen
            self.seen.add(self.path)
        if first:
            self.send_error(503, "try again")
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def flaky_http(mirror):
    handler = type("Handler", (_FlakyHandler,), {"seen": set()})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: handler(*a, directory=str(mirror["dir"] / "images")))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


_CHILD = """
import sys
from tasks.ingest.fetch import FetchConfig, fetch_images
ids = [int(x) for x in sys.argv[3].split(",")]
fetch_images(ids, sys.argv[1] + "/{image_id}.jpg", sys.argv[2],
             FetchConfig(max_concurrency=2, batch_size=8, backoff_s=0.01, retries=3))
"""


def test_http_retries_and_resume_after_kill(mirror, flaky_http, tmp_path):
    base, handler = flaky_http
    root = str(tmp_path / "root")
    ids = mirror["ids"]
    child = subprocess.Popen([sys.executable, "-c", _CHILD, base, root, ",".join(map(str, ids))],
                             cwd=str(Path(__file__).parents[1]), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = tmp_path / "root" / "ava" / "_fetch"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and child.poll() is None:
            # a committed part, not a writer's temporary (.tmp-*: what load_state skips)
            if state.exists() and any(p.suffix == ".parquet" and not p.name.startswith(".") for p in state.iterdir()):
                break
            time.sleep(0.02)
        assert child.poll() is None, child.stderr.read().decode()[-2000:]
        child.send_signal(signal.SIGKILL)  # an interruption mid-run
    finally:
        child.wait(timeout=30)
    done_before = len(load_state(root))
    assert 8 <= done_before < N_IMAGES - 6

    result = fetch_images(ids, base + "/{image_id}.jpg", root, FetchConfig(max_concurrency=4, backoff_s=0.01))
    assert result.n_skipped == done_before
    got = result.images.column("image_id").to_pylist()
    assert len(got) == len(set(got)) == N_IMAGES - 6
    stages = result.rejected.column("stage").to_pylist()
    assert sorted(stages) == ["decode"] * 4 + ["fetch"] * 2
    reasons = dict(zip(result.rejected.column("image_id").to_pylist(), result.rejected.column("reason").to_pylist(),
                       strict=True))
    assert "missing" in reasons[ids[0]] and "empty" in reasons[ids[1]]
    files = sorted(p.name for p in (tmp_path / "root" / "ava" / "images").iterdir() if p.suffix == ".jpg")
    assert files == sorted(f"{i}.jpg" for i in got)
    assert len(handler.seen) >= N_IMAGES - 1  # every file was asked for (and first refused with 503)
