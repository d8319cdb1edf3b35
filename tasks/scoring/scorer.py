"""Score listed images with a checkpoint: decode in DataLoader workers, batch patches of many images.

The pipeline per shard::

    SourceObject -> (worker) fetch bytes, probe header, decode at the scale the patches need
                 -> model/preprocess.predict_input (THE prediction input, shared with evaluation)
    collate      -> all views of the batch's images in one (N, 3, s, s) tensor plus per-image counts
    forward      -> probabilities (N, 10); each image's distribution is the mean over ITS views,
                    exactly ``model/preprocess.predict_distribution``
    rows         -> tasks/scoring/predictions.py, one atomic Parquet part per shard

Decoding (fetch, check, decode, cut the views; on the CPU in workers or on the CUDA device) is
``tasks/scoring/decoding.py``; this module holds the scoring config, the model, the rows and the shards.

Batch invariance: the model runs in eval mode (BatchNorm uses running statistics, dropout is off),
and padding rows (used with ``torch.compile`` to keep shapes static) are dropped before the
per-image mean, so an image's score does not depend on its neighbours. Bad images never stop a
shard: each becomes an ``error`` row whose reason says what was wrong.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import itertools
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pydantic import ConfigDict, Field
from torch import Tensor

from model.checkpoint import load_checkpoint, load_model
from model.metrics import NUM_BINS, score_from_dist, std_from_dist
from model.networks import AestheticNet, normalize
from model.preprocess import METHODS, PatchSettings
from tasks.core import storage
from tasks.core.devices import resolve_device
from tasks.core.errors import missing_path
from tasks.core.progress import Progress
from tasks.scoring.decoding import (
    DecodedImage,
    ImageBatch,
    ImageDataset,
    decode_batch_on_device,
    image_loader,
)
from tasks.scoring.layout import part_url
from tasks.scoring.listing import SourceObject
from tasks.scoring.predictions import (
    ScoringSettings,
    rows_to_table,
    shard_key,
    write_part,
)
from tasks.scoring.settings import ScoringKnobs

logger = logging.getLogger("mpemd")

# Views per forward pass on the CPU. Memory follows the pass, not the batch: a whole cpu-preset batch
# in one pass made activations big enough to be mapped and faulted in anew every pass (half of user
# time in the kernel); 64 views cost no more CPU per image (docs/performance.md).
CPU_VIEWS_PER_PASS = 64


class ScoringConfig(ScoringKnobs):
    """How to score: prediction method and patches, ``ScoringKnobs``' knobs (declared there, shared
    with the flow's parameters), and the knobs only code sets."""

    model_config = ConfigDict(frozen=True)

    method: Literal["nima", "mpemd"] = "mpemd"
    patches: PatchSettings = Field(default_factory=PatchSettings)
    channels_last: bool = True
    pad_batches: bool | None = None  # pad every forward to the pass size; default: when compiling
    views_per_pass: int = Field(0, ge=0)  # most views per forward pass; 0: a whole batch on CUDA, CPU_VIEWS_PER_PASS on CPU
    progress: bool | None = None  # None: a bar when stderr is a terminal

    @property
    def views_per_image(self) -> int:
        return 1 if self.method == "nima" else self.patches.n_patches

    @property
    def settings(self) -> ScoringSettings:
        if self.method == "nima":
            return ScoringSettings("nima", "warp", 1)
        return ScoringSettings("mpemd", self.patches.mode, self.patches.n_patches)


def config_from_checkpoint(checkpoint: dict[str, Any], *, method: str | None = None, patch_mode: str | None = None,
                           n_patches: int | None = None, patch_seed: int | None = None, **knobs: Any
                           ) -> ScoringConfig:
    """Defaults from how the checkpoint was trained (``metadata["patch_settings"]``, written by the
    trainer through ``PatchSettings.to_dict``), overridden by what the caller gives."""
    meta = checkpoint.get("metadata") or {}
    trained = PatchSettings.from_dict(meta.get("patch_settings"))
    patches = PatchSettings(
        n_patches=int(n_patches if n_patches is not None else trained.n_patches),
        mode=str(patch_mode if patch_mode is not None else trained.mode),
        seed=int(patch_seed if patch_seed is not None else trained.seed),
    )
    stage = meta.get("stage") if meta.get("stage") in METHODS else None
    return ScoringConfig(method=method or stage or "mpemd", patches=patches, **knobs)


# ---- the model ----------------------------------------------------------------------------------

def checkpoint_fingerprint(checkpoint_url: str) -> str:
    """What identifies the checkpoint's CONTENT now: its ETag on object stores, else size, mtime and
    inode (an atomic overwrite is a new inode). One metadata request, no download."""
    try:
        version = storage.stat(checkpoint_url)
    except FileNotFoundError as exc:
        raise missing_path("checkpoint", checkpoint_url) from exc
    return version.fingerprint if version.etag else f"{version.fingerprint}|ino:{version.inode}"


def read_checkpoint_info(checkpoint_url: str) -> dict[str, Any]:
    """The checkpoint's ``model_version``, backbone and metadata (weights validated, then dropped).

    Cached by content: a long-lived worker reads an overwritten ``checkpoint-best.pt`` again."""
    return _checkpoint_info(checkpoint_url, checkpoint_fingerprint(checkpoint_url))


@functools.lru_cache(maxsize=8)
def _checkpoint_info(checkpoint_url: str, fingerprint: str) -> dict[str, Any]:
    try:
        data = storage.read_bytes(checkpoint_url)
    except FileNotFoundError as exc:
        raise missing_path("checkpoint", checkpoint_url) from exc
    checkpoint = load_checkpoint(data, map_location="cpu", name=checkpoint_url)
    return {k: v for k, v in checkpoint.items() if k != "model"}


def load_scoring_model(checkpoint_url: str, device: str = "cpu") -> tuple[AestheticNet, dict[str, Any]]:
    """The eval-mode model and its checkpoint dict (weights dropped), cached per process by the
    checkpoint's content (``checkpoint_fingerprint``), not its URL."""
    return _scoring_model(checkpoint_url, checkpoint_fingerprint(checkpoint_url), device)


@functools.lru_cache(maxsize=4)
def _scoring_model(checkpoint_url: str, fingerprint: str, device: str) -> tuple[AestheticNet, dict[str, Any]]:
    model, checkpoint = load_model(storage.read_bytes(checkpoint_url), map_location="cpu")
    checkpoint = {k: v for k, v in checkpoint.items() if k != "model"}
    return model.to(device).eval(), checkpoint


class Scorer:
    """Runs batches through the model: inference mode, channels_last, AMP on CUDA, optional compile."""

    def __init__(self, model: AestheticNet, config: ScoringConfig, device: torch.device | None = None) -> None:
        self.device = device or next(model.parameters()).device
        self.config = config
        self.backbone = model.config
        model = model.eval()
        if config.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.forward = torch.compile(model, dynamic=False) if config.compile else model
        batch_views = config.batch_size * config.views_per_image
        limit = config.views_per_pass or (batch_views if self.device.type == "cuda" else CPU_VIEWS_PER_PASS)
        self.pass_size = min(limit, batch_views)
        pad = config.compile if config.pad_batches is None else config.pad_batches
        self.pad_to = self.pass_size if pad else 0

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.config.amp and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def probabilities(self, views: Tensor) -> Tensor:
        """(N, 3, s, s) uint8 views -> (N, 10) float32 on the CPU, in passes of at most ``pass_size``
        views; padding never reaches the result."""
        if not views.shape[0]:
            return torch.empty(0, NUM_BINS)
        return torch.cat([self._one_pass(chunk) for chunk in views.split(self.pass_size)])

    def _one_pass(self, views: Tensor) -> Tensor:
        n = views.shape[0]
        if self.pad_to and n < self.pad_to:
            views = torch.cat([views, views.new_zeros((self.pad_to - n, *views.shape[1:]))])
        x = normalize(views.to(self.device, non_blocking=True), self.backbone)
        if self.config.channels_last:  # normalised in the contiguous layout: per-channel loops stay long
            x = x.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            probs = self.forward(x)
        return probs[:n].float().cpu()

    def distributions(self, batch: ImageBatch) -> list[Tensor | None]:
        """One (10,) distribution per image (None for images without views)."""
        if not batch.views.numel():
            return [None] * len(batch.counts)
        per_view = self.probabilities(batch.views).split(batch.counts)
        # The same reduction as model/preprocess.predict_distribution: the mean over the image's views.
        return [p.mean(dim=0) if c else None for p, c in zip(per_view, batch.counts, strict=True)]


# ---- rows ----------------------------------------------------------------------------------------

def prediction_row(obj: SourceObject, image: DecodedImage, dist: Tensor | None, settings: ScoringSettings,
                   scored_at: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "uri": obj.uri, "image_id": obj.image_id, "model": settings.method, "patch_mode": settings.patch_mode,
        "n_patches": settings.n_patches, "width": image.width, "height": image.height,
        "aspect_ratio": image.height / image.width if image.width and image.height else None,
        "source_etag": obj.etag, "source_size": obj.size, "source_mtime": obj.mtime, "scored_at": scored_at,
    }
    if dist is None:
        return {**row, "dist": None, "score": None, "score_std": None, "status": "error",
                "error": image.error or "decode: no views produced"}
    d = dist.numpy().astype(np.float32)
    return {**row, "dist": d.tolist(), "score": float(score_from_dist(d.astype(np.float64))),
            "score_std": float(std_from_dist(d.astype(np.float64))), "status": "ok", "error": None}


def device_decodes(config: ScoringConfig, device: torch.device) -> bool:
    """Whether JPEGs go to the model's device for decoding: ``decode="gpu"`` on a CUDA device. Asked
    for without one, the workers decode on the CPU (same rows) and a warning says so."""
    if config.decode != "gpu":
        return False
    if device.type != "cuda":
        logger.warning("decode=gpu: the model runs on %s, not CUDA; decoding on the CPU instead", device)
        return False
    return True


def score_images(objects: Sequence[SourceObject], model: AestheticNet, config: ScoringConfig,
                 progress_desc: str = "score") -> Iterator[dict[str, Any]]:
    """Prediction rows for ``objects``, in order; one per object whatever happens to it."""
    device = next(model.parameters()).device
    scorer = Scorer(model, config, device)
    dataset = ImageDataset(objects, model.config, config)
    dataset.leave_jpegs = device_decodes(config, device)
    loader = image_loader(dataset, config.batch_size, config.num_workers, pin_memory=device.type == "cuda")
    settings = config.settings
    with Progress(len(dataset), progress_desc, disable=None if config.progress is None else not config.progress) as bar:
        for batch in loader:
            if dataset.leave_jpegs:
                batch = decode_batch_on_device(batch, model.config, config, device)
            dists = scorer.distributions(batch)
            now = dt.datetime.now(dt.timezone.utc)
            # Counted before the rows are handed out: a caller that stops after the last row it wants
            # (one shard at a time) must still see the bar reach its total.
            bar.update(len(batch.images), errors=sum(dist is None for dist in dists))
            for image, dist in zip(batch.images, dists, strict=True):
                yield prediction_row(dataset.objects[image.index], image, dist, settings, now)


# ---- one shard: the unit of work of the flow ----------------------------------------------------

@dataclass(frozen=True)
class ShardResult:
    shard_index: int
    part_url: str
    images: int
    ok: int
    errors: int
    reused: bool  # the part was already committed (a re-run of a finished shard): nothing scored
    seconds: float  # from the previous commit (or the start) to this one


def score_shards(shards: Sequence[Sequence[SourceObject]], *, checkpoint: str, out: str, date: str,
                 config: ScoringConfig, first_index: int = 0) -> Iterator[ShardResult]:
    """Score shards in order, committing each as one Parquet part as soon as its last row is ready.

    One DataLoader streams through all the shards, so decoding workers start once per call, not
    once per shard. A shard whose part is already committed (a re-run) is skipped without decoding.
    """
    device = str(resolve_device(config.device))
    model, info = load_scoring_model(checkpoint, device)
    version = info["model_version"]
    todo = []
    for index, shard in enumerate(shards, start=first_index):
        url = part_url(out, version, date, index, shard_key(version, config.settings, shard, config.patches.seed))
        if storage.exists(url):
            logger.info("shard %d already committed at %s; skipping", index, url)
            yield ShardResult(index, url, len(shard), 0, 0, True, 0.0)
        else:
            todo.append((index, shard, url))
    objects = [obj for _, shard, _ in todo for obj in shard]
    rows = score_images(objects, model, config, progress_desc=f"score {len(objects)} images")
    for index, shard, url in todo:
        start = time.perf_counter()
        shard_rows = list(itertools.islice(rows, len(shard)))
        write_part(rows_to_table(shard_rows), url)
        errors = sum(r["status"] == "error" for r in shard_rows)
        yield ShardResult(index, url, len(shard_rows), len(shard_rows) - errors, errors, False,
                          time.perf_counter() - start)
    rows.close()  # its progress bar ends (and says so) now, not when the generator is collected


def score_shard(objects: Sequence[SourceObject], *, shard_index: int, checkpoint: str, out: str, date: str,
                config: ScoringConfig) -> ShardResult:
    """Score one shard and commit it as one Parquet part; a re-run of a committed shard does nothing."""
    (result,) = score_shards([objects], checkpoint=checkpoint, out=out, date=date, config=config,
                             first_index=shard_index)
    return result
