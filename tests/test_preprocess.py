"""Model inputs for NIMA and MPEMD, training and prediction, from one backbone config."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model.networks import BackboneConfig, backbone_config, normalize
from model.patch_modes import PATCH_MODES
from model.patches import resize_shorter_side
from model.preprocess import (
    PatchSettings,
    min_decode_side,
    mpemd_predict_input,
    mpemd_train_input,
    nima_predict_input,
    nima_train_input,
    predict_distribution,
    predict_input,
)

TINY = BackboneConfig("tiny", input_size=32)  # resize_size = round(32 * 342 / 299) = 37
INCEPTION = backbone_config("inception_v3")


def column_ramp(height: int, width: int) -> torch.Tensor:
    """uint8 (3, H, W) whose value grows left to right: reveals flips and horizontal positions."""
    ramp = torch.linspace(0, 255, width).round().to(torch.uint8)
    return ramp.view(1, 1, width).expand(3, height, width).contiguous()


def unnormalize(x: torch.Tensor, config: BackboneConfig) -> torch.Tensor:
    mean = torch.tensor(config.mean).view(3, 1, 1)
    std = torch.tensor(config.std).view(3, 1, 1)
    return (x * std + mean) * 255.0


def direction(patch: torch.Tensor) -> int:
    """+1 if the ramp increases left to right in this patch, -1 if it decreases."""
    row = patch[0, patch.shape[1] // 2]
    return 1 if float(row[-1] - row[0]) > 0 else -1


def test_tiny_config_geometry():
    assert TINY.resize_size == 37
    assert (INCEPTION.resize_size, INCEPTION.input_size) == (342, 299)
    assert min_decode_side(INCEPTION, "mpemd") == 342  # the patches need the resized shorter side
    assert min_decode_side(INCEPTION, "nima") == 299  # prediction warps straight to the input size
    assert min_decode_side(INCEPTION, "nima", train=True) == 342  # training warps to 342, then crops


def test_nima_predict_is_the_whole_image_squashed():
    image = column_ramp(60, 200)
    out = nima_predict_input(image, TINY)
    assert out.shape == (1, 3, 32, 32) and out.dtype == torch.float32
    pixels = unnormalize(out[0], TINY)
    # the whole width is kept: the first column is dark, the last bright
    assert float(pixels[0, :, 0].mean()) < 10 and float(pixels[0, :, -1].mean()) > 245
    flat = torch.full((3, 50, 90), 200, dtype=torch.uint8)
    torch.testing.assert_close(nima_predict_input(flat, TINY)[0], normalize(flat[:, :32, :32], TINY))


def test_nima_train_crops_and_flips_reproducibly():
    image = column_ramp(80, 120)
    outs = [nima_train_input(image, TINY, torch.Generator().manual_seed(s)) for s in range(12)]
    assert all(o.shape == (1, 3, 32, 32) for o in outs)
    assert torch.equal(outs[0], nima_train_input(image, TINY, torch.Generator().manual_seed(0)))
    directions = {direction(o[0]) for o in outs}
    assert directions == {1, -1}  # both flipped and unflipped crops occur
    # a crop, not the whole image: none of them spans the full ramp
    assert all(float(unnormalize(o[0], TINY)[0].amax() - unnormalize(o[0], TINY)[0].amin()) < 255 for o in outs)


def test_mpemd_train_patches_share_one_flip():
    image = column_ramp(40, 150)  # resized to 37 x 139: patches of 32 along the width
    for seed in range(8):
        patches = mpemd_train_input(image, TINY, 6, torch.Generator().manual_seed(seed))
        assert patches.shape == (6, 3, 32, 32)
        assert len({direction(p) for p in patches}) == 1  # one flip per image, not per patch


def test_mpemd_train_keeps_aspect_ratio():
    """A 1:3 image: patches come from a 37 x 111 resize (aspect kept), not a squashed square."""
    image = column_ramp(100, 300)
    resized = resize_shorter_side(image, TINY.resize_size)
    assert tuple(resized.shape[-2:]) == (37, 111)
    patches = mpemd_train_input(image, TINY, 8, torch.Generator().manual_seed(0))
    # each patch spans 32 of 111 columns: its ramp covers about 32/111 of the range, never all of it
    spans = [float(unnormalize(p, TINY)[0].amax() - unnormalize(p, TINY)[0].amin()) for p in patches]
    assert all(spans_i < 255 * 40 / 111 for spans_i in spans)


@pytest.mark.parametrize("mode", PATCH_MODES)
def test_mpemd_predict_is_reproducible(mode):
    image = torch.randint(0, 256, (3, 70, 130), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    settings = PatchSettings(n_patches=5, mode=mode, seed=0)
    first = mpemd_predict_input(image, TINY, settings, key=953619)
    torch.manual_seed(99)
    assert first.shape == (5, 3, 32, 32)
    assert torch.equal(first, mpemd_predict_input(image, TINY, settings, key=953619))
    other_key = mpemd_predict_input(image, TINY, settings, key=953620)
    other_seed = mpemd_predict_input(image, TINY, PatchSettings(5, mode, seed=1), key=953619)
    if mode == "random":
        assert not torch.equal(first, other_key) and not torch.equal(first, other_seed)
    else:  # the grid ignores keys and seeds
        assert torch.equal(first, other_key) and torch.equal(first, other_seed)


def test_predict_input_dispatch():
    image = torch.randint(0, 256, (3, 50, 60), dtype=torch.uint8)
    settings = PatchSettings(n_patches=3, mode="grid")
    assert predict_input(image, TINY, "nima", settings, key="a").shape == (1, 3, 32, 32)
    assert predict_input(image, TINY, "mpemd", settings, key="a").shape == (3, 3, 32, 32)
    with pytest.raises(ValueError, match="unknown method"):
        predict_input(image, TINY, "mpa", settings, key="a")
    assert PatchSettings() == PatchSettings(n_patches=8, mode="random", seed=0)  # METHOD.md's |P| = 8


def test_paper_geometry_on_inception_config():
    image = torch.randint(0, 256, (3, 400, 600), dtype=torch.uint8)
    views = mpemd_predict_input(image, INCEPTION, PatchSettings(8, "grid"), key=1)
    assert views.shape == (8, 3, 299, 299)
    assert nima_predict_input(image, INCEPTION).shape == (1, 3, 299, 299)
    small = torch.randint(0, 256, (3, 120, 90), dtype=torch.uint8)  # smaller than a patch: upscaled
    assert mpemd_predict_input(small, INCEPTION, PatchSettings(2, "random"), key=1).shape == (2, 3, 299, 299)


class _MeanColourHead(nn.Module):
    """A stand-in network: each view's distribution depends on its mean red value."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.stack([x[:, 0].mean((1, 2)) * i for i in range(10)], -1)
        return torch.softmax(logits, -1)


def test_predict_distribution_averages_views():
    model = _MeanColourHead()
    views = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    dist = predict_distribution(model, views)
    assert dist.shape == (10,)
    torch.testing.assert_close(dist, model(views).mean(0))
    torch.testing.assert_close(dist.sum(), torch.tensor(1.0))
    assert not dist.requires_grad


@pytest.mark.parametrize("method", ["nima", "mpemd"])
@pytest.mark.parametrize("mode", PATCH_MODES)
def test_predict_views_are_uint8_and_normalise_to_predict_input(method, mode):
    from model.preprocess import predict_views

    config = backbone_config("mobilenet_v3_small")
    image = torch.randint(0, 256, (3, 300, 520), dtype=torch.uint8)
    settings = PatchSettings(n_patches=3, mode=mode, seed=5)
    views = predict_views(image, config, method, settings, key="img-1")
    assert views.dtype == torch.uint8
    assert torch.equal(normalize(views, config), predict_input(image, config, method, settings, key="img-1"))


@pytest.mark.parametrize("backbone", ["mobilenet_v3_small", "efficientnet_b0"])  # bilinear, bicubic
def test_train_views_are_uint8_and_normalise_to_the_train_input(backbone):
    """The resize rounds to uint8 already, so normalising later (on the model's device) changes nothing."""
    from model.preprocess import mpemd_train_views, nima_train_views

    config = backbone_config(backbone)
    image = torch.randint(0, 256, (3, 310, 470), dtype=torch.uint8)
    for seed in range(3):
        nima = nima_train_views(image, config, torch.Generator().manual_seed(seed))
        mpemd = mpemd_train_views(image, config, 4, torch.Generator().manual_seed(seed))
        assert nima.dtype == mpemd.dtype == torch.uint8
        assert torch.equal(normalize(nima, config), nima_train_input(image, config, torch.Generator().manual_seed(seed)))
        assert torch.equal(normalize(mpemd, config),
                           mpemd_train_input(image, config, 4, torch.Generator().manual_seed(seed)))
