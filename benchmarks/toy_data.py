"""A tiny learnable AVA-like dataset for tests, benchmarks and GPU checks: JPEGs plus manifests.

Each image's brightness sets its score (score mean = 2 + 6 * brightness, a discretised Gaussian of
100 votes), so a network can really learn it and "the loss goes down" means something. Sizes and
aspect ratios vary (portrait, landscape, square, panoramas). Manifests follow the manifest contract
(``image_id, uri, split, rating_counts list<int32>[10], n_ratings, score_mean, ...``).

Only numpy, Pillow and pyarrow: safe to import on the GPU machine.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from model.aspect_bins import aspect_bin
from tasks.core import storage
from tasks.core.schemas import MANIFEST_CONTRACT_SCHEMA

ASPECT_RATIOS = (0.5, 0.62, 0.67, 0.75, 1.0, 1.33, 1.5, 2.0)  # height / width


def toy_counts(brightness: float, n_votes: int = 100, spread: float = 1.2) -> np.ndarray:
    """Vote counts for bins 1..10 around ``2 + 6 * brightness`` (sums to ``n_votes``)."""
    centre = 2.0 + 6.0 * brightness
    weights = np.exp(-0.5 * ((np.arange(1, 11) - centre) / spread) ** 2)
    counts = np.floor(weights / weights.sum() * n_votes).astype(np.int64)
    counts[int(np.argmax(weights))] += n_votes - int(counts.sum())
    return counts


def toy_jpeg(width: int, height: int, brightness: float, rng: np.random.Generator, quality: int = 90) -> bytes:
    """A textured RGB JPEG whose mean brightness follows ``brightness``."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = 255.0 * (0.1 + 0.8 * brightness)
    tint = rng.uniform(-30, 30, size=3)
    wave = 20.0 * np.sin(xx / rng.uniform(5, 25) + rng.uniform(0, 6)) * np.cos(yy / rng.uniform(5, 25))
    noise = rng.normal(0, 12, size=(height, width, 3))
    pixels = np.clip(base + tint + wave[..., None] + noise, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def manifest_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=MANIFEST_CONTRACT_SCHEMA)


def write_toy_dataset(root: str | Path, *, n_train: int = 32, n_val: int = 16, n_test: int = 0,
                      short_side: tuple[int, int] = (80, 140), seed: int = 0,
                      corrupt_ids: tuple[int, ...] = ()) -> dict[str, str]:
    """Write ``{root}/images/*.jpg`` and ``{root}/manifests/{train,val,test}.parquet``; return the URLs.

    ``corrupt_ids`` (positions in 0..n-1) get a truncated JPEG, to exercise the skip path.
    """
    root = str(root)
    rng = np.random.default_rng(seed)
    splits = {"train": n_train, "val": n_val, "test": n_test}
    urls, image_id = {}, 1000
    position = 0
    for split, count in splits.items():
        rows = []
        for _ in range(count):
            ar = float(rng.choice(ASPECT_RATIOS))
            short = int(rng.integers(short_side[0], short_side[1] + 1))
            width, height = (short, round(short * ar)) if ar >= 1 else (round(short / ar), short)
            brightness = float(rng.uniform(0, 1))
            data = toy_jpeg(width, height, brightness, rng)
            if position in corrupt_ids:
                data = data[: len(data) // 3]
            uri = storage.join(root, "images", f"{image_id}.jpg")
            storage.write_bytes_atomic(uri, data)
            counts = toy_counts(brightness)
            p = counts / counts.sum()
            mean = float((np.arange(1, 11) * p).sum())
            std = math.sqrt(float(((np.arange(1, 11) - mean) ** 2 * p).sum()))
            rows.append({
                "image_id": image_id, "uri": uri, "split": split, "rating_counts": counts.tolist(),
                "n_ratings": int(counts.sum()), "score_mean": mean, "score_std": std, "width": width,
                "height": height, "aspect_ratio": height / width, "aspect_bin": aspect_bin(height / width),
                "semantic_tags": [], "challenge_id": 0,
            })
            image_id += 1
            position += 1
        if count:
            urls[split] = storage.join(root, "manifests", f"{split}.parquet")
            storage.write_parquet_atomic(manifest_table(rows), urls[split])
    return urls
