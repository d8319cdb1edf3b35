"""Model inputs from decoded images: one definition for training, validation and scoring.

Inputs are uint8 tensors (3, H, W) in display orientation. Geometry and normalisation come from
the backbone's config (``resize_size`` / ``input_size``: 342 / 299 for Inception-V3).

- NIMA train: warp to resize x resize, random input crop, random flip.
- NIMA predict: warp the whole image to input x input.
- MPEMD train: shorter side -> resize, |P| random input-size patches, one flip per image.
- MPEMD predict: the same patches, seeded per image (``random``) or equally spaced (``grid``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from model.networks import BackboneConfig, normalize
from model.patch_modes import PATCH_MODES
from model.patches import extract_patches, random_patches, resize_shorter_side, seeded_generator, warp_square

METHODS = ("nima", "mpemd")  # NIMA: one warped view; MPEMD: patches of the aspect-kept resize

# Longest side / shorter side kept for patch sampling. A 50x20000 strip resized to a 342 shorter side
# would be 137k pixels long (140 MB); beyond this ratio the centre part is kept, so memory per image
# stays bounded (342 x 2736 at most) whatever the input. AVA's widest panoramas are well inside it.
MAX_PATCH_ASPECT = 8.0


@dataclass(frozen=True)
class PatchSettings:
    """How MPEMD places patches at prediction. Checkpoints store it as ``metadata["patch_settings"]``
    through ``to_dict`` (the trainer) and read it back through ``from_dict`` (scoring): one format."""

    n_patches: int = 8
    mode: str = "random"  # random | grid
    seed: int = 0  # base seed mixed with each image's key at prediction time

    def __post_init__(self) -> None:
        if self.mode not in PATCH_MODES:
            raise ValueError(f"patch mode must be one of {PATCH_MODES}, got {self.mode!r}")
        if self.n_patches < 1:
            raise ValueError(f"n_patches must be >= 1, got {self.n_patches}")

    def to_dict(self) -> dict[str, Any]:
        return {"n_patches": self.n_patches, "mode": self.mode, "seed": self.seed}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> PatchSettings:
        """Inverse of ``to_dict``; missing keys take the defaults, unknown keys are an error."""
        data = dict(data or {})
        unknown = set(data) - {"n_patches", "mode", "seed"}
        if unknown:
            raise ValueError(f"unknown patch settings {sorted(unknown)}")
        defaults = cls()
        return cls(n_patches=int(data.get("n_patches", defaults.n_patches)),
                   mode=str(data.get("mode", defaults.mode)), seed=int(data.get("seed", defaults.seed)))


def limit_aspect(image: Tensor, max_aspect: float = MAX_PATCH_ASPECT) -> Tensor:
    """Centre-crop the long side of (…, H, W) so that long / short <= ``max_aspect``."""
    h, w = image.shape[-2:]
    short = min(h, w)
    keep = max(short, int(short * max_aspect))
    if h > keep:
        top = (h - keep) // 2
        return image[..., top:top + keep, :]
    if w > keep:
        left = (w - keep) // 2
        return image[..., :, left:left + keep]
    return image


def aspect_preserving_resize(image: Tensor, config: BackboneConfig) -> Tensor:
    """METHOD.md's MPEMD geometry: shorter side -> ``config.resize_size``, aspect ratio kept."""
    return resize_shorter_side(limit_aspect(image), config.resize_size, config.interpolation)


def nima_train_views(image: Tensor, config: BackboneConfig, generator: torch.Generator | None = None) -> Tensor:
    """(3,H,W) uint8 -> (1,3,s,s) uint8: warp, random crop, random horizontal flip (not normalised).

    The resize already rounds to uint8 (torchvision's uint8 kernel), so normalising these views
    anywhere later gives exactly ``nima_train_input``: loader workers send them as uint8 (a quarter
    of the float bytes through shared memory) and training normalises on the model's device.
    """
    warped = warp_square(image, config.resize_size, config.interpolation)
    crop = random_patches(warped, 1, config.input_size, generator)
    if torch.rand((), generator=generator) < 0.5:
        crop = crop.flip(-1)
    return crop


def nima_train_input(image: Tensor, config: BackboneConfig, generator: torch.Generator | None = None) -> Tensor:
    """(3,H,W) uint8 -> (1,3,s,s) float: ``nima_train_views`` normalised."""
    return normalize(nima_train_views(image, config, generator), config)


def nima_predict_input(image: Tensor, config: BackboneConfig) -> Tensor:
    """(3,H,W) uint8 -> (1,3,s,s) float: the whole image squashed to the input size."""
    return predict_input(image, config, "nima", PatchSettings(), key=0)


def mpemd_train_views(image: Tensor, config: BackboneConfig, n_patches: int,
                      generator: torch.Generator | None = None) -> Tensor:
    """(3,H,W) uint8 -> (P,3,s,s) uint8: aspect-preserving resize, P random patches, one flip."""
    resized = aspect_preserving_resize(image, config)
    if torch.rand((), generator=generator) < 0.5:
        resized = resized.flip(-1)
    return random_patches(resized, n_patches, config.input_size, generator)


def mpemd_train_input(image: Tensor, config: BackboneConfig, n_patches: int,
                      generator: torch.Generator | None = None) -> Tensor:
    """(3,H,W) uint8 -> (P,3,s,s) float: ``mpemd_train_views`` normalised."""
    return normalize(mpemd_train_views(image, config, n_patches, generator), config)


def mpemd_predict_input(image: Tensor, config: BackboneConfig, settings: PatchSettings, key: str | int) -> Tensor:
    """(3,H,W) uint8 -> (P,3,s,s) float, reproducible for the same ``key`` (image id or URI)."""
    return predict_input(image, config, "mpemd", settings, key)


def predict_views(image: Tensor, config: BackboneConfig, method: str, settings: PatchSettings,
                  key: str | int) -> Tensor:
    """The prediction views' pixels, before normalisation: (V,3,s,s) in the input's dtype.

    ``normalize(predict_views(...), config)`` is exactly ``predict_input(...)``; bulk scoring moves
    these uint8 views between processes (a quarter of the float bytes) and normalises them on the
    model's device.
    """
    if method == "nima":
        return warp_square(image, config.input_size, config.interpolation).unsqueeze(0)
    if method == "mpemd":
        resized = aspect_preserving_resize(image, config)
        generator = seeded_generator(key, settings.seed) if settings.mode == "random" else None
        return extract_patches(resized, settings.n_patches, config.input_size, settings.mode, generator)
    raise ValueError(f"unknown method {method!r}; choose from {METHODS}")


def predict_input(image: Tensor, config: BackboneConfig, method: str, settings: PatchSettings,
                  key: str | int) -> Tensor:
    """Prediction input for ``method`` ``nima`` (1 view) or ``mpemd`` (P patches), normalised."""
    return normalize(predict_views(image, config, method, settings, key), config)


def min_decode_side(config: BackboneConfig, method: str, train: bool = False) -> int:
    """The shorter side a decoder must keep (JPEG draft mode may shrink down to it): what the path
    resizes to. MPEMD (both) and NIMA training resize to ``resize_size`` (342 for 299: NIMA warps to
    342x342, then crops); only NIMA's prediction warps straight to ``input_size``."""
    return config.resize_size if method == "mpemd" or train else config.input_size


@torch.inference_mode()
def predict_distribution(model: torch.nn.Module, views: Tensor) -> Tensor:
    """(V,3,s,s) views of ONE image -> its (10,) distribution: the mean of the views' distributions."""
    return model(views).float().mean(dim=0)
