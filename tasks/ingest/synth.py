"""A synthetic AVA: ``AVA.txt`` + ``images/<id>.jpg`` in AVA's exact format, whose scores follow a
known rule in which the aspect ratio matters. For the demo, the tests, and anyone without AVA.

The generative rule (per image ``i``, all draws from ``numpy.random.default_rng([seed, i])``, so
an image depends on (seed, i) only and any prefix of a larger set is the smaller set):

1. **Geometry.** Aspect ratio ``h/w`` from a mixture shaped like AVA's (the paper's Fig. 4): 2:3
   landscape (0.667, 32%), 3:4 (0.75, 14%), their portrait twins 1.5 (10%) and 1.333 (6%),
   squares (6%), near-squares (0.82-0.98, 1.02-1.25; 7%), anything 0.6-1.6 (2%), 16:9-ish
   0.5-0.6 (5%), panoramas 0.28-0.5 (10%) and tall images 1.6-2.2 (8%): every METHOD.md analysis
   bin holds images even in a 2,000-image set. Long side uniform in [384, 512] px; peaks get a
   1% multiplicative jitter (real crops are never exact).
2. **Roundness (the aspect-ratio-sensitive term, 45% of the latent variance).** The image is a
   jittered grid of cells about half the shorter side wide (so every 224-px patch of an image
   resized to a 256-px shorter side holds one or more shapes); each cell holds a filled ellipse of
   equal area (radius 0.12-0.19 of the shorter side) whose axis ratio ``r = exp(-e)`` is the
   image's own (``e`` = elongation, uniform in [0, 0.9], +-3% per shape) at a random angle. True
   circles (``e = 0``) as displayed score high, visibly stretched ellipses low. Squashing the
   whole image to a square (NIMA) multiplies every shape's axis ratio by ``h/w``: a 3:2 image
   distorts circles by 1.5x, a 0.4 panorama by 2.5x, a square not at all. Aspect-preserving
   square patches (MPEMD) see the shapes' true geometry at every aspect ratio.
3. **Sharpness (30%).** Pixel-scale luminance grain (std 14/255) is added, then the image is
   blurred with a Gaussian of sigma ``0.3 + 2.7 * (1 - s)`` px, ``s`` uniform in [0, 1]; crisp
   edges and visible grain score high. Squashing a long image shrinks its long side by
   ``long/224`` (2.3x here) and its short side much less, whereas MPEMD's shorter-side resize
   keeps ``short/256`` (<= 1.3x, often an upscale), so grain survives MPEMD's view better; the
   gap grows with ``|log(h/w)|`` and vanishes for squares.
4. **Contrast and colourfulness (10%, AR-independent).** ``c`` uniform in [0, 1] scales global
   contrast (0.45..1.2) and colour saturation (0.15..0.85).
5. **Noise (15%).** An independent normal term: what no model can learn.

The latent ``z`` is the weighted sum of the standardised terms (``-e``, ``s``, ``c``, noise) with
the weights' squares 0.45/0.30/0.10/0.15; the latent score is ``5.40 + 0.72 z``. Votes: ``n``
lognormal (mean ~210, sd ~63) clipped to [78, 649]; a per-image rating spread ``sd`` normal
(1.43, 0.20) clipped to [0.8, 2.3]; rating probabilities are a normal (latent score, sd) integrated
over the ten unit bins with the tails folded into 1 and 10; counts are a multinomial draw. This
matches the real val split's statistics (``tests/data/AVA_val_labels.txt``: vote mean 210.6, sd
63.0; score mean 5.38, sd 0.73; score-std mean 1.43). Tags and challenge ids follow the real
file's marginal frequencies (tag 2 only when tag 1 is present).

``synth_params.parquet`` (beside ``AVA.txt``) keeps every image's generative parameters for
analysis; the ingest path ignores it.
"""

from __future__ import annotations

import io
import logging
import math
import multiprocessing as mp
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
from PIL import Image, ImageFilter

from tasks.core import storage
from tasks.core.progress import Progress

logger = logging.getLogger("mpemd")

SCORE_MEAN = 5.40
SCORE_SPREAD = 0.72  # sd of the latent score; vote sampling adds the rest of the real 0.73
VARIANCE_SHARES = {"roundness": 0.45, "sharpness": 0.30, "contrast": 0.10, "noise": 0.15}
MAX_ELONGATION = 0.9
LONG_SIDE = (384, 512)
JPEG_QUALITY = 90

# (weight, kind, a, b): kind "peak" = a with 1% jitter; "uniform" = uniform in [a, b].
ASPECT_MIXTURE: tuple[tuple[float, str, float, float], ...] = (
    (0.32, "peak", 2 / 3, 0), (0.14, "peak", 3 / 4, 0), (0.10, "peak", 3 / 2, 0), (0.06, "peak", 4 / 3, 0),
    (0.06, "exact", 1.0, 0), (0.04, "uniform", 0.82, 0.98), (0.03, "uniform", 1.02, 1.25),
    (0.02, "uniform", 0.6, 1.6), (0.05, "uniform", 0.5, 0.6), (0.10, "uniform", 0.28, 0.5),
    (0.08, "uniform", 1.6, 2.2),
)
# Marginal counts of semantic_tag_1 / semantic_tag_2 (ids 0..66) in the real AVA val labels.
TAG1_COUNTS = (
    2343, 726, 284, 97, 209, 395, 88, 238, 102, 161, 182, 93, 393, 55, 763, 809, 204, 426, 551, 374, 232,
    338, 306, 57, 78, 39, 22, 54, 68, 80, 9, 47, 0, 5, 23, 36, 2, 2, 81, 45, 57, 16, 6, 2, 15, 10, 1, 14,
    5, 4, 18, 10, 2, 8, 0, 0, 0, 23, 3, 2, 0, 3, 2, 0, 0, 2, 0,
)
TAG2_COUNTS = (
    4272, 0, 6, 4, 2, 24, 18, 18, 24, 17, 80, 18, 85, 19, 148, 296, 121, 268, 193, 409, 245, 584, 443, 101,
    171, 75, 33, 205, 199, 236, 21, 98, 31, 30, 87, 151, 31, 11, 340, 130, 194, 74, 13, 17, 20, 50, 16, 70,
    70, 20, 169, 43, 17, 43, 2, 0, 2, 73, 15, 9, 0, 35, 8, 9, 1, 6, 0,
)
TAG2_ABSENT_GIVEN_TAG1 = 0.245  # P(tag 2 = 0 | tag 1 > 0) in the real file
CHALLENGE_RANGE = (1, 1450)


@dataclass(frozen=True)
class ImageSpec:
    """Everything that makes one synthetic image and its label."""

    index: int  # 0-based position; AVA.txt's index column is index + 1
    image_id: int
    width: int
    height: int
    elongation: float
    sharpness: float
    contrast: float
    noise: float
    latent_score: float
    rating_sd: float
    n_votes: int
    render_seed: int

    @property
    def aspect_ratio(self) -> float:
        return self.height / self.width

    @property
    def axis_ratio(self) -> float:
        return math.exp(-self.elongation)

    @property
    def blur_sigma(self) -> float:
        return 0.3 + 2.7 * (1.0 - self.sharpness)


def _draw_aspect_ratio(rng: np.random.Generator) -> float:
    weights = np.array([m[0] for m in ASPECT_MIXTURE])
    _, kind, a, b = ASPECT_MIXTURE[int(rng.choice(len(ASPECT_MIXTURE), p=weights / weights.sum()))]
    if kind == "peak":
        return a * math.exp(rng.normal(0.0, 0.01))
    if kind == "uniform":
        return float(rng.uniform(a, b))
    return a


# Standardisation of the terms' uniform draws: mean 0.5, sd sqrt(1/12) (elongation: scaled).
_UNIFORM_SD = math.sqrt(1.0 / 12.0)


def latent_z(elongation: float, sharpness: float, contrast: float, noise: float) -> float:
    """The standardised latent quality (mean 0, variance 1 over the draw distribution)."""
    w = {k: math.sqrt(v) for k, v in VARIANCE_SHARES.items()}
    roundness = -(elongation / MAX_ELONGATION - 0.5) / _UNIFORM_SD
    return (w["roundness"] * roundness + w["sharpness"] * (sharpness - 0.5) / _UNIFORM_SD
            + w["contrast"] * (contrast - 0.5) / _UNIFORM_SD + w["noise"] * noise)


def draw_params(seed: int, index: int) -> ImageSpec:
    rng = np.random.default_rng([seed, index])
    image_id = 1000 + 100 * index + int(rng.integers(100))  # unique, increasing, prefix-stable
    ratio = _draw_aspect_ratio(rng)
    long_side = int(rng.integers(LONG_SIDE[0], LONG_SIDE[1] + 1))
    if ratio <= 1.0:
        width, height = long_side, max(16, round(long_side * ratio))
    else:
        width, height = max(16, round(long_side / ratio)), long_side
    elongation = float(rng.uniform(0.0, MAX_ELONGATION))
    sharpness = float(rng.uniform())
    contrast = float(rng.uniform())
    noise = float(rng.normal())
    latent = SCORE_MEAN + SCORE_SPREAD * latent_z(elongation, sharpness, contrast, noise)
    n_votes = int(np.clip(round(rng.lognormal(math.log(210.0) - 0.043, 0.294)), 78, 649))
    rating_sd = float(np.clip(rng.normal(1.43, 0.20), 0.8, 2.3))
    return ImageSpec(index=index, image_id=image_id, width=width, height=height, elongation=elongation,
                     sharpness=sharpness, contrast=contrast, noise=noise, latent_score=latent,
                     rating_sd=rating_sd, n_votes=n_votes, render_seed=int(rng.integers(2**63)))


def rating_probabilities(score: float, sd: float) -> np.ndarray:
    """A normal (score, sd) over ratings 1..10, unit bins, tails folded into the end bins."""
    # Discretising adds 1/12 of variance; take it off so the counts' spread is about ``sd``.
    sd_c = math.sqrt(max(sd * sd - 1.0 / 12.0, 0.05))
    cdf = [0.0, *(0.5 * (1.0 + math.erf((edge - score) / (sd_c * math.sqrt(2.0)))) for edge in
                  np.arange(1.5, 10.0, 1.0)), 1.0]
    return np.diff(np.asarray(cdf))


def vote_counts(params: ImageSpec) -> np.ndarray:
    rng = np.random.default_rng([params.render_seed, 1])
    return rng.multinomial(params.n_votes, rating_probabilities(params.latent_score, params.rating_sd))


def tags_and_challenge(seed: int, index: int) -> tuple[int, int, int]:
    rng = np.random.default_rng([seed, index, 2])
    t1 = np.asarray(TAG1_COUNTS, dtype=np.float64)
    tag1 = int(rng.choice(len(t1), p=t1 / t1.sum()))
    tag2 = 0
    if tag1 and rng.uniform() >= TAG2_ABSENT_GIVEN_TAG1:
        t2 = np.asarray(TAG2_COUNTS, dtype=np.float64)
        t2[0] = 0.0
        t2[tag1] = 0.0
        tag2 = int(rng.choice(len(t2), p=t2 / t2.sum()))
    return tag1, tag2, int(rng.integers(CHALLENGE_RANGE[0], CHALLENGE_RANGE[1] + 1))


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6.0) % 6
    f = h * 6.0 - int(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i], dtype=np.float32)


def render_image(params: ImageSpec) -> np.ndarray:
    """The image as uint8 (H, W, 3), deterministic from ``params``."""
    rng = np.random.default_rng(params.render_seed)
    h, w = params.height, params.width
    short = min(h, w)
    saturation = 0.15 + 0.70 * params.contrast
    # Background: a two-colour gradient at a random angle.
    hue = rng.uniform()
    c0 = _hsv_to_rgb(hue, saturation, rng.uniform(0.25, 0.55))
    c1 = _hsv_to_rgb((hue + rng.uniform(0.05, 0.2)) % 1.0, saturation, rng.uniform(0.45, 0.8))
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = (xx * math.cos(angle) + yy * math.sin(angle)) / max(h, w)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = c0 + (c1 - c0) * t[..., None]

    # Shapes: one equal-area ellipse per cell of a jittered grid about half the shorter side wide.
    rows, cols = max(1, round(2 * h / short)), max(1, round(2 * w / short))
    cell_h, cell_w = h / rows, w / cols
    for r in range(rows):
        for c in range(cols):
            if rng.uniform() < 0.15:  # a few empty cells, so layouts differ
                continue
            radius = rng.uniform(0.12, 0.19) * short
            axis = math.exp(-params.elongation * rng.uniform(0.97, 1.03))
            a, b = radius / math.sqrt(axis), radius * math.sqrt(axis)
            theta = rng.uniform(0, math.pi)
            cy = (r + 0.5 + rng.uniform(-0.2, 0.2)) * cell_h
            cx = (c + 0.5 + rng.uniform(-0.2, 0.2)) * cell_w
            y0, y1 = max(0, int(cy - a) - 2), min(h, int(cy + a) + 3)
            x0, x1 = max(0, int(cx - a) - 2), min(w, int(cx + a) + 3)
            if y1 <= y0 or x1 <= x0:
                continue
            dy, dx = yy[y0:y1, x0:x1] - cy, xx[y0:y1, x0:x1] - cx
            u = dx * math.cos(theta) + dy * math.sin(theta)
            v = -dx * math.sin(theta) + dy * math.cos(theta)
            radial = np.sqrt((u / a) ** 2 + (v / b) ** 2)
            alpha = np.clip((1.0 - radial) * b + 0.5, 0.0, 1.0)[..., None]  # ~1 px anti-aliased edge
            patch = img[y0:y1, x0:x1]
            # Dark shapes on light ground and light on dark, so every shape is visible.
            light = float(patch.mean()) < 0.5
            value = rng.uniform(0.8, 1.0) if light else rng.uniform(0.05, 0.25)
            colour = _hsv_to_rgb(rng.uniform(), saturation, value)
            img[y0:y1, x0:x1] = patch + (colour - patch) * alpha

    # Contrast about the mean, then pixel-scale grain, then the blur that hides both.
    mean = img.mean(axis=(0, 1), keepdims=True)
    img = mean + (img - mean) * np.float32(0.45 + 0.75 * params.contrast)
    img += rng.standard_normal((h, w, 1), dtype=np.float32) * np.float32(14.0 / 255.0)
    arr = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    blurred = Image.fromarray(arr, "RGB").filter(ImageFilter.GaussianBlur(params.blur_sigma))
    return np.asarray(blurred)


def encode_jpeg(image: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image, "RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _render_jpeg(params: ImageSpec) -> tuple[int, bytes]:
    return params.image_id, encode_jpeg(render_image(params))


def label_line(params: ImageSpec, seed: int) -> str:
    counts = vote_counts(params)
    tag1, tag2, challenge = tags_and_challenge(seed, params.index)
    return " ".join(str(v) for v in (params.index + 1, params.image_id, *counts.tolist(), tag1, tag2, challenge))


def _write_images(out_url: str, batch: list[tuple[int, bytes]]) -> None:
    folder = storage.join(out_url, "images")
    if storage.protocol_of(out_url) == "file":
        for image_id, data in batch:
            storage.write_bytes_atomic(storage.join(folder, f"{image_id}.jpg"), data)
    else:  # one concurrent multi-PUT; each object PUT is atomic
        fs, path = storage.filesystem(folder)
        fs.pipe({f"{path}/{image_id}.jpg": data for image_id, data in batch})


def synthesize_ava(out_url: str, n: int, seed: int = 0, workers: int | None = None,
                   chunk: int = 64) -> dict:
    """Write ``{out}/AVA.txt``, ``{out}/images/<id>.jpg`` and ``{out}/synth_params.parquet``.

    ``workers`` processes render the images (default: the CPU count, at most 8; small sets run
    in-process). Returns ``{"n", "labels", "images", "params", "seconds"}``.
    """
    if n < 1:
        raise ValueError("n must be at least 1")
    params = [draw_params(seed, i) for i in range(n)]
    lines = [label_line(p, seed) for p in params]
    workers = workers if workers is not None else min(os.cpu_count() or 1, 8)
    with Progress(total=n, desc="synthesize AVA") as progress:
        if workers <= 1 or n < 64:
            for start in range(0, n, chunk):
                batch = [_render_jpeg(p) for p in params[start:start + chunk]]
                _write_images(out_url, batch)
                progress.update(len(batch))
        else:
            # spawn: never fork a process that may hold torch/CUDA state (DESIGN.md).
            with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
                batch: list[tuple[int, bytes]] = []
                for item in pool.map(_render_jpeg, params, chunksize=8):
                    batch.append(item)
                    if len(batch) >= chunk:
                        _write_images(out_url, batch)
                        progress.update(len(batch))
                        batch = []
                _write_images(out_url, batch)
                progress.update(len(batch))
        seconds = progress.elapsed
    labels_url = storage.join(out_url, "AVA.txt")
    storage.write_text_atomic(labels_url, "\n".join(lines) + "\n")
    params_url = storage.join(out_url, "synth_params.parquet")
    storage.write_parquet_atomic(params_table(params, seed), params_url)
    logger.info("synthesized %d images in %.1fs (%.0f img/s)", n, seconds, n / max(seconds, 1e-9))
    return {"n": n, "labels": labels_url, "images": storage.join(out_url, "images"), "params": params_url,
            "seconds": seconds}


def params_table(params: list[ImageSpec], seed: int) -> pa.Table:
    rows = []
    for p in params:
        row = asdict(p)
        row.update(aspect_ratio=p.aspect_ratio, axis_ratio=p.axis_ratio, blur_sigma=p.blur_sigma, seed=seed)
        rows.append(row)
    return pa.Table.from_pylist(rows)
