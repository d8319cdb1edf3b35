"""Patch geometry of METHOD.md, on uint8 or float tensors of shape (C, H, W) or (B, C, H, W).

NIMA warps the whole image to a square (aspect ratio lost); MPEMD resizes the shorter side and
crops square patches fully inside the image (aspect ratio kept). Prediction is reproducible:
``patch_seed`` derives a generator seed from the image's id, or ``grid`` places patches at equal
intervals along the long side (centred on the short side), the follow-up paper's better choice.
"""

from __future__ import annotations

import hashlib

import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torchvision.transforms import InterpolationMode

from model.patch_modes import PATCH_MODES


def resize_shorter_side(image: Tensor, size: int, interpolation: str = "bilinear") -> Tensor:
    """Resize so the shorter side is ``size`` pixels, keeping the aspect ratio (to within 1 px)."""
    h, w = image.shape[-2:]
    if min(h, w) == size:
        return image
    if h <= w:
        new_h, new_w = size, max(size, round(w * size / h))
    else:
        new_h, new_w = max(size, round(h * size / w)), size
    return TF.resize(image, [new_h, new_w], interpolation=InterpolationMode(interpolation), antialias=True)


def warp_square(image: Tensor, size: int, interpolation: str = "bilinear") -> Tensor:
    """Squash the whole image to ``size x size`` (NIMA; the aspect ratio is not preserved)."""
    return TF.resize(image, [size, size], interpolation=InterpolationMode(interpolation), antialias=True)


def _ensure_fits(image: Tensor, size: int) -> Tensor:
    """Upscale (aspect kept) an image whose shorter side is below the patch size."""
    return resize_shorter_side(image, size) if min(image.shape[-2:]) < size else image


def random_patch_boxes(height: int, width: int, n: int, size: int, generator: torch.Generator | None = None
                       ) -> list[tuple[int, int]]:
    """``n`` (top, left) corners drawn uniformly so that every patch lies fully inside."""
    if height < size or width < size:
        raise ValueError(f"image {height}x{width} is smaller than the patch {size}")
    tops = torch.randint(0, height - size + 1, (n,), generator=generator)
    lefts = torch.randint(0, width - size + 1, (n,), generator=generator)
    return [(int(t), int(left)) for t, left in zip(tops, lefts, strict=True)]


def grid_patch_boxes(height: int, width: int, n: int, size: int) -> list[tuple[int, int]]:
    """``n`` corners at equal intervals along the long side, centred on the short side."""
    if height < size or width < size:
        raise ValueError(f"image {height}x{width} is smaller than the patch {size}")

    def spaced(extent: int) -> list[int]:
        if n == 1:
            return [(extent - size) // 2]
        return [round(i * (extent - size) / (n - 1)) for i in range(n)]

    if width >= height:
        top = (height - size) // 2
        return [(top, left) for left in spaced(width)]
    left = (width - size) // 2
    return [(top, left) for top in spaced(height)]


def crop_boxes(image: Tensor, boxes: list[tuple[int, int]], size: int) -> Tensor:
    """(C, H, W) and corners -> (n, C, size, size)."""
    return torch.stack([image[..., t:t + size, left:left + size] for t, left in boxes])


def random_patches(image: Tensor, n: int, size: int, generator: torch.Generator | None = None) -> Tensor:
    """Uniformly random square patches, fully inside; (C,H,W) -> (n,C,s,s), (B,C,H,W) -> (B,n,C,s,s)."""
    image = _ensure_fits(image, size)
    if image.dim() == 4:
        return torch.stack([random_patches(im, n, size, generator) for im in image])
    h, w = image.shape[-2:]
    return crop_boxes(image, random_patch_boxes(h, w, n, size, generator), size)


def grid_patches(image: Tensor, n: int, size: int) -> Tensor:
    """Equal-interval square patches; same shapes as ``random_patches``."""
    image = _ensure_fits(image, size)
    if image.dim() == 4:
        return torch.stack([grid_patches(im, n, size) for im in image])
    h, w = image.shape[-2:]
    return crop_boxes(image, grid_patch_boxes(h, w, n, size), size)


def patch_seed(key: str | int, base_seed: int = 0) -> int:
    """A stable 63-bit seed from an image key (id, URI or content hash) and a base seed."""
    digest = hashlib.blake2b(f"{base_seed}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def seeded_generator(key: str | int, base_seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(patch_seed(key, base_seed))


def extract_patches(image: Tensor, n: int, size: int, mode: str = "random",
                    generator: torch.Generator | None = None) -> Tensor:
    """Dispatch on ``mode`` (``random`` or ``grid``)."""
    if mode == "random":
        return random_patches(image, n, size, generator)
    if mode == "grid":
        return grid_patches(image, n, size)
    raise ValueError(f"unknown patch mode {mode!r}; choose from {PATCH_MODES}")
