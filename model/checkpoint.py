"""Checkpoint files: the model's weights plus the metadata needed to rebuild and trust it.

Format (a plain dict, loadable with ``torch.load(weights_only=True)``, so no pickle from storage
ever executes code)::

    {"format": "mpemd-checkpoint", "format_version": 1,
     "backbone": str, "input_size": int, "num_bins": 10, "model": state_dict, "model_version": str,
     "metadata": {json-like: stage, patch settings, training config, command, package version},
     ...extra training state (optimizer, scheduler, scaler, epoch, RNG) when resuming is wanted}

``model_version`` is a content hash of the backbone name and the weights: the same weights give
the same version wherever they are saved, and scoring partitions by it.
"""

from __future__ import annotations

import hashlib
import io
import re
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from model.networks import AestheticNet, build_model

FORMAT = "mpemd-checkpoint"
FORMAT_VERSION = 1


_SAFE_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: corrupt, not ours, or for another backbone."""


def package_version() -> str:
    try:
        return importlib_metadata.version("mpemd")
    except importlib_metadata.PackageNotFoundError:
        return "0+unknown"


def state_hash(backbone: str, state: dict[str, torch.Tensor], length: int = 16) -> str:
    """Content hash of the weights, stable across devices and save locations."""
    digest = hashlib.sha256(backbone.encode())
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(key.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:length]


def _unwrap(model: nn.Module) -> AestheticNet:
    """The AestheticNet inside DDP / torch.compile wrappers."""
    for attr in ("module", "_orig_mod"):
        while hasattr(model, attr):
            model = getattr(model, attr)
    if not isinstance(model, AestheticNet):
        raise TypeError(f"expected an AestheticNet, got {type(model).__name__}")
    return model


def make_checkpoint(model: nn.Module, *, metadata: dict[str, Any] | None = None,
                    **training_state: Any) -> dict[str, Any]:
    """The checkpoint dict for ``model`` (unwrapped from DDP/compile), with optional resume state."""
    net = _unwrap(model)
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    backbone = net.config.name
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "backbone": backbone,
        "input_size": int(net.config.input_size),
        "num_bins": int(net.head[-1].out_features),
        "model": state,
        "model_version": state_hash(backbone, state),
        "metadata": {"package_version": package_version(), **(metadata or {})},
        **training_state,
    }


def save_checkpoint(target: str | Path | IO[bytes], model: nn.Module, *, metadata: dict[str, Any] | None = None,
                    **training_state: Any) -> str:
    """Save to a path or a writable binary file object; returns the ``model_version``."""
    checkpoint = make_checkpoint(model, metadata=metadata, **training_state)
    torch.save(checkpoint, target)
    return checkpoint["model_version"]


def checkpoint_bytes(model: nn.Module, *, metadata: dict[str, Any] | None = None, **training_state: Any) -> bytes:
    return serialize_checkpoint(make_checkpoint(model, metadata=metadata, **training_state))


def serialize_checkpoint(checkpoint: dict[str, Any]) -> bytes:
    """The bytes of a checkpoint dict from ``make_checkpoint`` (what ``load_checkpoint`` reads back)."""
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    return buffer.getvalue()


def load_checkpoint(source: str | Path | IO[bytes] | bytes, *, map_location: str | torch.device = "cpu",
                    name: str | None = None) -> dict[str, Any]:
    """Load and validate a checkpoint; never unpickles arbitrary objects (``weights_only=True``).
    ``name``: what the messages call it (its URL, where ``source`` is its bytes)."""
    if isinstance(source, bytes | bytearray):
        source = io.BytesIO(source)
    source_name = name or source
    try:
        checkpoint = torch.load(source, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {source_name}") from None
    except Exception as exc:  # corrupt zip, truncated file, or a pickle that is not plain data
        # torch's first line only: the rest advises weights_only=False, which would run the file's code
        reason = (str(exc).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"cannot load checkpoint {source_name}: not a checkpoint this code reads "
                              f"({type(exc).__name__}: {reason})") from exc
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != FORMAT:
        raise CheckpointError(f"{source_name} is not an mpemd checkpoint (missing format tag {FORMAT!r})")
    if checkpoint.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{source_name} has format version {checkpoint['format_version']}, newer than this code")
    for key in ("backbone", "model", "model_version"):
        if key not in checkpoint:
            raise CheckpointError(f"{source_name} lacks {key!r}")
    # model_version names an output folder (model_version=<v>/): a crafted file must not climb out of it.
    if not isinstance(checkpoint["model_version"], str) or not _SAFE_VERSION.fullmatch(checkpoint["model_version"]):
        raise CheckpointError(f"{source_name} has an invalid model_version {str(checkpoint['model_version'])[:80]!r}")
    return checkpoint


def model_from_checkpoint(checkpoint: dict[str, Any], *, backbone: str | None = None) -> AestheticNet:
    """Rebuild the network from a loaded checkpoint; ``backbone`` (if given) must match."""
    saved = checkpoint["backbone"]
    if backbone is not None and backbone != saved:
        raise CheckpointError(f"checkpoint is for backbone {saved!r}, not {backbone!r}")
    try:
        input_size = checkpoint.get("input_size") or checkpoint.get("metadata", {}).get("input_size")
        model = build_model(saved, weights="none", input_size=input_size)
    except ValueError as exc:  # a backbone this code does not know
        raise CheckpointError(f"checkpoint is for an unknown backbone: {exc}") from exc
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint weights do not fit backbone {saved!r}: {exc}") from exc
    return model


def load_model(source: str | Path | IO[bytes] | bytes, *, backbone: str | None = None,
               map_location: str | torch.device = "cpu") -> tuple[AestheticNet, dict[str, Any]]:
    """``load_checkpoint`` + ``model_from_checkpoint``: the model (eval mode) and its checkpoint dict."""
    checkpoint = load_checkpoint(source, map_location=map_location)
    return model_from_checkpoint(checkpoint, backbone=backbone).eval(), checkpoint
