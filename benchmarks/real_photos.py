"""An AVA-format set from real photographs whose ground truth is known: degraded crops.

Each image is a crop of one of the given photographs (any aspect ratio in [0.5, 2]) degraded by a
known amount: Gaussian blur, sensor-like noise and under-exposure grow as a hidden quality ``q`` in
[0, 1] falls, and the vote histogram (150 votes) is drawn around the score ``2.5 + 5 q``. A model
that learns here learns a rule from real photographic content, not from the synthetic shapes of
``tasks/ingest/synth.py``. Used to choose the ``cpu`` preset and for the training figures of
docs/performance.md.

Where the photographs come from: any folder of JPEG or PNG photographs (a few are enough: each image
is a different crop). The runs in docs/ used the colour sample photographs of scikit-image
(``skimage.data``, BSD-licensed); the exact list was not recorded. To get such a folder::

    pip install scikit-image pooch   # pooch fetches the samples not shipped in the wheel
    mkdir photos && python -c "import skimage.data as d, skimage.io as io
    for n in ('astronaut', 'chelsea', 'coffee', 'rocket'):
        io.imsave(f'photos/{n}.png', getattr(d, n)())"

Then::

    python -m benchmarks.real_photos --photos photos --out /tmp/real --n 600
    mpemd reproduce --labels /tmp/real/AVA.txt --images /tmp/real/images --preset cpu --root /tmp/real-run
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

SUFFIXES = (".jpg", ".jpeg", ".png")


def degrade(image: Image.Image, q: float, rng: np.random.Generator) -> Image.Image:
    """Blur, noise and darkening that grow as the quality ``q`` falls."""
    out = image.filter(ImageFilter.GaussianBlur(radius=2.5 * (1.0 - q)))
    pixels = np.asarray(out, dtype=np.float32)
    pixels = pixels * (0.55 + 0.45 * q) + rng.normal(0.0, 22.0 * (1.0 - q), pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def random_crop(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A crop of aspect ratio (height / width) in [0.5, 2], its longer side at most 400 px."""
    width, height = image.size
    aspect = float(np.exp(rng.uniform(np.log(0.5), np.log(2.0))))
    w = int(min(width, height / aspect) * rng.uniform(0.5, 1.0))
    h = int(w * aspect)
    left, top = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
    crop = image.crop((left, top, left + w, top + h))
    scale = min(1.0, 400 / max(crop.size))
    return crop.resize((max(32, int(w * scale)), max(32, int(h * scale))), Image.BICUBIC)


def votes(score: float, rng: np.random.Generator, n_votes: int = 150, spread: float = 1.3) -> np.ndarray:
    bins = np.arange(1, 11)
    p = np.exp(-0.5 * ((bins - score) / spread) ** 2)
    return rng.multinomial(n_votes, p / p.sum())


def write_set(photos: list[Path], out: Path, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    bases = [Image.open(p).convert("RGB") for p in photos]
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        image_id = 100000 + i
        q = float(rng.uniform(0.0, 1.0))
        crop = degrade(random_crop(bases[int(rng.integers(len(bases)))], rng), q, rng)
        crop.save(out / "images" / f"{image_id}.jpg", quality=92)
        counts = " ".join(str(int(c)) for c in votes(2.5 + 5.0 * q, rng))
        lines.append(f"{i + 1} {image_id} {counts} 0 0 0")
    (out / "AVA.txt").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=Path, required=True, help="folder of real photographs (jpg/png)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    photos = sorted(p for p in args.photos.iterdir() if p.suffix.lower() in SUFFIXES)
    if not photos:
        parser.error(f"no photographs in {args.photos}")
    write_set(photos, args.out, args.n, args.seed)
    print(f"{args.n} images from {len(photos)} photographs -> {args.out}/AVA.txt, {args.out}/images/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
