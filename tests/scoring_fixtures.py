"""Shared helpers for the scoring tests: a small checkpoint whose outputs differ between images, and
small images of several shapes. Plain functions (not fixtures) so subprocess scripts can use them."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from model.checkpoint import save_checkpoint
from model.networks import build_model, normalize
from tasks.core.images import decode_to_tensor

BACKBONE = "mobilenet_v3_small"
HEAD_SCALE = 0.1  # predictions spread over the bins, neither flat nor one-hot


def make_model(seed: int = 0) -> torch.nn.Module:
    """An untrained mobilenet_v3_small whose predictions vary with the image (a fresh one barely does):
    BatchNorm statistics from a few random batches, and a sharper head."""
    torch.manual_seed(seed)
    model = build_model(BACKBONE, weights="none")
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # cumulative: the statistics of exactly the batches below
    model.train()
    with torch.no_grad():
        images = torch.stack([decode_to_tensor(image_bytes(1000 + i, 80, 80)) for i in range(8)])
        model(normalize(images, model.config))
        model.head[1].weight.mul_(HEAD_SCALE)
    return model.eval()


def make_checkpoint(path: str | Path, seed: int = 0, **metadata: object) -> str:
    """Save a checkpoint (default metadata: mpemd, grid, 2 patches); returns its model_version."""
    # The trainer's key (PatchSettings.to_dict): scoring takes its defaults from it.
    meta = {"method": "mpemd", "patch_settings": {"mode": "grid", "n_patches": 2, "seed": 0}, **metadata}
    return save_checkpoint(str(path), make_model(seed), metadata=meta)


def image_bytes(seed: int, width: int, height: int, fmt: str = "JPEG") -> bytes:
    """A smooth random picture (gradients + blobs), different for every seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for _ in range(3):
        fx, fy, phase = [*rng.uniform(0.01, 0.2, 2).tolist(), rng.uniform(0, 6.28)]
        channels.append(127 + 120 * np.sin(fx * x + fy * y + phase))
    arr = np.clip(np.stack(channels, -1) + rng.normal(0, 8, (height, width, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, fmt)
    return buf.getvalue()


SHAPES = [(48, 32), (32, 48), (40, 40), (96, 24), (60, 44)]


def write_images(folder: str | Path, n: int, seed: int = 0, start_id: int = 1) -> list[Path]:
    """``n`` small images ``<id>.jpg`` / ``.png`` of mixed shapes in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        w, h = SHAPES[i % len(SHAPES)]
        fmt, ext = ("PNG", "png") if i % 4 == 3 else ("JPEG", "jpg")
        path = folder / f"{start_id + i}.{ext}"
        path.write_bytes(image_bytes(seed * 10_000 + i, w, h, fmt))
        paths.append(path)
    return paths
