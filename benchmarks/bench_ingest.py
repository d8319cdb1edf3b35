"""Ingest benchmarks: header-only size scan vs full decode, and label parsing speed.

    .venv/bin/python benchmarks/bench_ingest.py [--images 2000] [--workdir /tmp/bench-ingest]

1. Header scan vs full decode of the same JPEGs (a synthetic AVA, made once in ``--workdir``):
   ``probe_image`` (header + EXIF + end marker) against ``probe_image(full_decode=True)``; images/s
   of each and the ratio. Files are read into memory first, so this times the image work, not disk.
2. Label parsing of 255,530 lines made by repeating tests/data/AVA_val_labels.txt (image ids
   offset per copy, so that they stay unique as in the real AVA.txt): seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.core.images import probe_image
from tasks.ingest.labels import parse_labels_text
from tasks.ingest.synth import synthesize_ava

AVA_LINES = 255_530


def bench_probe(workdir: Path, n: int) -> dict:
    images = workdir / "images"
    if not images.exists() or len(list(images.glob("*.jpg"))) < n:
        synthesize_ava(str(workdir), n, seed=0)
    blobs = [p.read_bytes() for p in sorted(images.glob("*.jpg"))[:n]]
    out = {}
    for name, full in (("header", False), ("full_decode", True)):
        start = time.perf_counter()
        for data in blobs:
            probe_image(data, full_decode=full)
        out[name] = len(blobs) / (time.perf_counter() - start)
    out["ratio"] = out["header"] / out["full_decode"]
    return out


def bench_labels() -> float:
    lines = (Path(__file__).resolve().parents[1] / "tests" / "data" / "AVA_val_labels.txt").read_text().splitlines()
    rows = []
    copy = 0
    while len(rows) < AVA_LINES:
        for line in lines:
            f = line.split()
            f[1] = str(int(f[1]) + copy * 1_000_000)
            rows.append(" ".join([str(len(rows) + 1), *f[1:]]))
            if len(rows) == AVA_LINES:
                break
        copy += 1
    text = "\n".join(rows) + "\n"
    start = time.perf_counter()
    parsed = parse_labels_text(text)
    seconds = time.perf_counter() - start
    assert parsed.labels.num_rows == AVA_LINES, parsed.summary()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--workdir", default=os.path.join("/tmp", "bench-ingest"))
    args = parser.parse_args()
    probe = bench_probe(Path(args.workdir), args.images)
    print(f"header scan: {probe['header']:.0f} images/s; full decode: {probe['full_decode']:.0f} images/s; "
          f"ratio {probe['ratio']:.1f}x ({args.images} JPEGs)")
    print(f"label parsing: {AVA_LINES} lines in {bench_labels():.2f} s")


if __name__ == "__main__":
    main()
