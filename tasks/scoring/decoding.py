"""Listed images -> model views, in DataLoader workers: fetch, check, decode at the scale the views
need, and collate the views of many images into one batch. With ``decode="gpu"`` the workers leave
plain JPEGs encoded and ``decode_batch_on_device`` decodes them on the model's CUDA device.

Everything a worker runs is top-level and picklable (workers are spawned). ``tasks/scoring/scorer.py`` runs
the model over these batches and writes the rows.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import hashlib
import logging
import multiprocessing
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from model.networks import BackboneConfig
from model.preprocess import PatchSettings, min_decode_side, predict_views
from tasks.core import collate, storage
from tasks.core.images import ImageError, decode_to_tensor, probe_image
from tasks.scoring.listing import SourceObject

logger = logging.getLogger("mpemd")

# What the device decoder takes: plain JPEGs nvJPEG decodes to RGB (CMYK and friends go to Pillow).
_DEVICE_DECODABLE = frozenset({"RGB", "L"})


class DecodeSettings(Protocol):
    """What decoding reads of a ``tasks.scoring.scorer.ScoringConfig``."""

    @property
    def method(self) -> str: ...
    @property
    def patches(self) -> PatchSettings: ...
    @property
    def max_bytes(self) -> int: ...


@dataclass
class DecodedImage:
    """One image ready for the model, or the reason it is not."""

    index: int  # position in the dataset
    views: Tensor | None  # (V, 3, s, s) uint8; the Scorer normalises them
    width: int | None = None
    height: int | None = None
    error: str | None = None  # "<stage>: <reason>"
    encoded: Tensor | None = None  # JPEG bytes (uint8) left for the device decoder; views is None then
    key: str | int | None = None  # its patch key (the content hash needs the bytes)


def patch_key(obj: SourceObject, data: bytes) -> str | int:
    """The seed key of an image's random patches: its AVA id, else its content (a copy scores the same)."""
    if obj.image_id is not None:
        return obj.image_id
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def fetch_bytes(obj: SourceObject, max_bytes: int) -> bytes:
    if obj.size is not None and obj.size > max_bytes:
        raise ImageError(f"too large: {obj.size} bytes > limit {max_bytes}", stage="size")
    try:
        data = storage.read_bytes(obj.uri, small=True)
    except FileNotFoundError:
        raise ImageError("I/O error: not found (deleted since listing?)", stage="fetch") from None
    except Exception as exc:  # network, permissions, throttling: worth a retry next run
        raise ImageError(f"I/O error: {type(exc).__name__}: {exc}", stage="fetch") from exc
    if len(data) > max_bytes:
        raise ImageError(f"too large: {len(data)} bytes > limit {max_bytes}", stage="size")
    return data


class ImageDataset(Dataset):
    """Listed images -> ``DecodedImage`` (views for ``method``), decoded at the scale the views need."""

    def __init__(self, objects: Sequence[SourceObject], backbone: BackboneConfig, config: DecodeSettings) -> None:
        self.objects = list(objects)
        self.backbone = backbone
        self.method = config.method
        self.patches = config.patches
        self.max_bytes = config.max_bytes
        self.min_side = min_decode_side(backbone, config.method)
        self.leave_jpegs = False  # set by score_images when the device decodes

    def __len__(self) -> int:
        return len(self.objects)

    def __getitem__(self, index: int) -> DecodedImage:
        obj = self.objects[index]
        try:
            data = fetch_bytes(obj, self.max_bytes)
            info = probe_image(data)  # header and integrity checks: the same verdicts either way
            if self.leave_jpegs and info.format == "JPEG" and info.mode in _DEVICE_DECODABLE:
                encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                return DecodedImage(index, None, info.width, info.height, encoded=encoded,
                                    key=patch_key(obj, data))
            image = decode_to_tensor(data, min_short_side=self.min_side)
            # uint8 views: a quarter of the bytes through the worker pipe; the Scorer normalises them
            views = predict_views(image, self.backbone, self.method, self.patches, patch_key(obj, data))
            return DecodedImage(index, views, info.width, info.height)
        except ImageError as exc:
            return DecodedImage(index, None, error=f"{exc.stage}: {exc.reason}")
        except Exception as exc:  # a bug or an exotic file must cost one row, not the shard
            return DecodedImage(index, None, error=f"decode: {type(exc).__name__}: {exc}")


@dataclass
class ImageBatch:
    """The views of several images in one tensor; ``counts[i]`` views belong to ``images[i]``."""

    views: Tensor  # (N, 3, s, s)
    counts: list[int]
    images: list[DecodedImage]  # views dropped (they live in ``views``)


def collate_images(items: list[DecodedImage]) -> ImageBatch:
    """All views in one (N, 3, s, s) tensor: one shared-memory segment per batch when a DataLoader
    worker collates (``tasks.core.collate``; ``torch.cat`` into private memory made the queue copy it again)."""
    parts = [it.views for it in items if it.views is not None]
    counts = [0 if it.views is None else int(it.views.shape[0]) for it in items]
    views = collate.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)
    return ImageBatch(views, counts, [replace(it, views=None) for it in items])  # encoded bytes stay


def decode_batch_on_device(batch: ImageBatch, backbone: BackboneConfig, config: DecodeSettings,
                           device: torch.device) -> ImageBatch:
    """Decode the batch's left-over JPEGs on ``device`` (one batched nvJPEG call), cut their views
    there, and return the batch with every image's views in order. An image the device cannot
    decode falls back to the CPU decoder, alone; one neither can decode becomes an error row."""
    pending = [i for i, it in enumerate(batch.images) if it.encoded is not None]
    if not pending:
        return batch
    decoded = _device_decode([batch.images[i].encoded for i in pending], device)
    per_image = list(batch.views.split(batch.counts)) if batch.views.numel() else [None] * len(batch.counts)
    images, counts = list(batch.images), list(batch.counts)
    for i, pixels in zip(pending, decoded, strict=True):
        item = images[i]
        try:
            if pixels is None:  # the device refused it: the CPU decoder, as with --decode cpu
                min_side = min_decode_side(backbone, config.method)
                pixels = decode_to_tensor(item.encoded.numpy().tobytes(), min_short_side=min_side)
            views = predict_views(pixels, backbone, config.method, config.patches, item.key).to(device)
            per_image[i], counts[i] = views, int(views.shape[0])
            images[i] = replace(item, encoded=None)
        except Exception as exc:
            reason = f"{exc.stage}: {exc.reason}" if isinstance(exc, ImageError) else f"decode: {exc}"
            per_image[i], counts[i] = None, 0
            images[i] = replace(item, encoded=None, error=reason)
    parts = [v.to(device) for v, c in zip(per_image, counts, strict=True) if c]
    views = torch.cat(parts) if parts else torch.empty(0)
    return ImageBatch(views, counts, images)


def _device_decode(encoded: list[Tensor], device: torch.device) -> list[Tensor | None]:
    """RGB uint8 (3,H,W) per JPEG in display orientation, None where the device decoder failed."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return list(decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True))
    except Exception as exc:  # one bad file fails the batched call: retry one by one
        logger.debug("batched device decode failed (%s); decoding one by one", exc)
    out: list[Tensor | None] = []
    for data in encoded:
        try:
            out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True))
        except Exception as exc:
            logger.debug("device decode failed (%s); the CPU decodes this image", exc)
            out.append(None)
    return out


def init_decoding_worker(_: int) -> None:
    """A decoding worker's start: one intra-op thread, and an exit that skips the interpreter's teardown."""
    # Each worker decodes one image at a time; intra-op threads would only fight the model's.
    torch.set_num_threads(1)
    # The main process waits for its workers' exit at the end of every scoring call, and a spawned
    # worker's teardown (a final collection over all that torch imported) is most of that wait
    # (docs/performance.md, "Figures moved from code comments"). Its queues are flushed before atexit
    # runs, and a failing worker is still reported by the DataLoader, so it may leave at once.
    gc.freeze()  # and the objects made so far are skipped by the worker's collections
    atexit.register(_exit_without_teardown)


def _exit_without_teardown() -> None:
    """Flush logs and standard streams (tested), then leave with no interpreter teardown."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


def image_loader(dataset: ImageDataset, batch_size: int, num_workers: int, pin_memory: bool = False) -> DataLoader:
    """Batches in listing order; the last, short batch is kept (``drop_last=False``).

    In a daemonic process (a Dask worker's, a ``--local-dask`` cluster's) decoding stays in-process:
    such a process may not start children, and every shard failed with "daemonic processes are not
    allowed to have children" (add Dask worker processes instead; docs/performance.md)."""
    if num_workers > 0 and multiprocessing.current_process().daemon:
        logger.warning("decoding in-process: this is a daemonic process (a Dask worker's), which cannot "
                       "start the %d decoding processes asked for", num_workers)
        num_workers = 0
    extra: dict[str, Any] = {}
    if num_workers > 0:
        # spawn: safe with CUDA and with fsspec/aiohttp clients, which do not survive a fork
        extra = {"multiprocessing_context": "spawn", "worker_init_fn": init_decoding_worker, "prefetch_factor": 4,
                 "persistent_workers": False}
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False, num_workers=num_workers,
                      collate_fn=collate_images, pin_memory=pin_memory, **extra)
