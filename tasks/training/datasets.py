"""Training and validation samples from a manifest: fetch (fsspec), decode once, build model inputs.

- Samples are uint8 views, normalised on the model's device by ``Batch.inputs``: a quarter of the
  bytes through shared memory from loader workers (and host-to-device), and no float work in them.
- NIMA samples are (3, s, s): warp to resize x resize, random s crop, random flip (train) or the
  whole image warped to s x s (eval). MPEMD samples are (P, 3, s, s): shorter side -> resize, P
  random patches, one flip per image (train) or P patches seeded by the image id (eval).
- Geometry and normalisation come from the backbone's registered config;
  ``model.networks.backbone_config`` applies an ``image_size`` override (the resize keeps
  METHOD.md's 342/299 ratio).
- Augmentation randomness is a pure function of (seed, epoch, sample index), and the sampler's
  order a pure function of (seed, epoch): the data a step sees never depends on the number of
  workers or on where a run was resumed.
- A sample that cannot be fetched or decoded (or has no votes) becomes a ``SkippedSample``; the
  collate function drops it and reports it in the batch, so the loop counts and logs it.

No Prefect, DuckDB or s3fs import here: GPU machines run this module without them.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from model.networks import BackboneConfig, normalize
from model.preprocess import (
    METHODS,
    PatchSettings,
    min_decode_side,
    mpemd_train_views,
    nima_train_views,
    predict_views,
)
from tasks.core import storage
from tasks.core.collate import stack
from tasks.core.images import ImageError, decode_to_tensor

logger = logging.getLogger("mpemd")


@dataclass(frozen=True)
class ManifestRecords:
    """The columns training needs, as plain arrays (cheap to send to worker processes)."""

    image_id: np.ndarray  # int64 (n,)
    uri: list[str]
    counts: np.ndarray  # float64 (n, 10) vote counts
    aspect_ratio: np.ndarray  # float64 (n,)

    def __len__(self) -> int:
        return len(self.uri)

    def head(self, n: int) -> ManifestRecords:
        if not n or n >= len(self):
            return self
        return ManifestRecords(self.image_id[:n], self.uri[:n], self.counts[:n], self.aspect_ratio[:n])


def read_manifest(url: str, limit: int = 0) -> ManifestRecords:
    """Read ``image_id, uri, rating_counts, aspect_ratio`` from a manifest Parquet file (any fsspec URL)."""
    table = storage.read_parquet(url, columns=["image_id", "uri", "rating_counts", "aspect_ratio"])
    counts = table.column("rating_counts").to_pylist()
    records = ManifestRecords(
        image_id=np.asarray(table.column("image_id").to_pylist(), dtype=np.int64),
        uri=[str(u) for u in table.column("uri").to_pylist()],
        counts=np.asarray(counts, dtype=np.float64).reshape(len(counts), 10),
        aspect_ratio=np.asarray(table.column("aspect_ratio").to_pylist(), dtype=np.float64),
    )
    return records.head(limit)


@dataclass(frozen=True)
class SkippedSample:
    index: int
    image_id: int
    reason: str


@dataclass
class Batch:
    images: Tensor  # uint8 views: (B, 3, s, s) for NIMA, (B, P, 3, s, s) for MPEMD
    targets: Tensor  # (B, 10) ground-truth distributions, float32
    indices: Tensor  # (B,) positions in the manifest
    skipped: list[SkippedSample] = field(default_factory=list)
    config: BackboneConfig | None = None  # mean/std that ``inputs`` normalises uint8 views with

    def __len__(self) -> int:
        return int(self.indices.numel())

    def pin_memory(self) -> Batch:
        # DataLoader(pin_memory=True) calls this on custom batch types.
        return replace(self, images=self.images.pin_memory(), targets=self.targets.pin_memory())

    def inputs(self, device: torch.device) -> Tensor:
        """The model input on ``device``: uint8 views moved there, then normalised (float32)."""
        images = self.images.to(device, non_blocking=True)
        if images.dtype != torch.uint8:  # already normalised (a caller's float batch)
            return images.float()
        if self.config is None:
            raise ValueError("a batch of uint8 views needs its BackboneConfig to be normalised")
        return normalize(images, self.config)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for one sample's augmentation in one epoch."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class ManifestDataset(Dataset):
    """Indexed by ``(index, epoch)`` keys (see ``EpochSampler``); returns a sample dict or a skip."""

    def __init__(self, records: ManifestRecords, config: BackboneConfig, method: str, *, train: bool,
                 n_patches: int = 8, patch_settings: PatchSettings | None = None, seed: int = 0) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
        self.records = records
        self.config = config
        self.method = method
        self.train = train
        self.n_patches = n_patches
        self.patch_settings = patch_settings or PatchSettings(n_patches=n_patches)
        self.seed = seed
        self.decode_side = min_decode_side(config, method, train)

    def __len__(self) -> int:
        return len(self.records)

    def load_image(self, index: int) -> Tensor:
        """Fetch and decode one image (uint8 (3,H,W)); raises ``ImageError``."""
        uri = self.records.uri[index]
        try:
            data = storage.read_bytes(uri, small=True)
        except (OSError, ValueError) as exc:
            raise ImageError(f"cannot fetch {uri}: {type(exc).__name__}: {exc}", stage="fetch") from exc
        return decode_to_tensor(data, min_short_side=self.decode_side)

    def make_views(self, image: Tensor, index: int, epoch: int) -> Tensor:
        """uint8 views: (3,s,s) for NIMA, (P,3,s,s) for MPEMD; ``normalize`` gives the model input."""
        if self.train:
            generator = torch.Generator().manual_seed(sample_seed(self.seed, epoch, index))
            if self.method == "nima":
                return nima_train_views(image, self.config, generator)[0]
            return mpemd_train_views(image, self.config, self.n_patches, generator)
        views = predict_views(image, self.config, self.method, self.patch_settings, int(self.records.image_id[index]))
        return views[0] if self.method == "nima" else views

    def __getitem__(self, key: int | tuple[int, int]) -> dict | SkippedSample:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        image_id = int(self.records.image_id[index])
        counts = self.records.counts[index]
        total = float(counts.sum())
        if not total > 0:
            return SkippedSample(index, image_id, "label: no votes")
        try:
            image = self.load_image(index)
            views = self.make_views(image, index, epoch)
        except ImageError as exc:
            return SkippedSample(index, image_id, f"{exc.stage}: {exc.reason}")
        except Exception as exc:  # a sample must never crash the epoch; it is counted instead
            return SkippedSample(index, image_id, f"decode: {type(exc).__name__}: {exc}")
        target = torch.from_numpy(counts / total).float()
        return {"image": views, "target": target, "index": index}


def collate_samples(samples: Sequence[dict | SkippedSample], config: BackboneConfig | None = None) -> Batch:
    """Stack good samples; keep the skipped ones aside so the loop can count and log them.

    ``config`` (the dataset's) travels with the batch so ``Batch.inputs`` can normalise its views.
    """
    good = [s for s in samples if isinstance(s, dict)]
    skipped = [s for s in samples if isinstance(s, SkippedSample)]
    if not good:
        return Batch(torch.empty(0, dtype=torch.uint8), torch.empty(0, 10), torch.empty(0, dtype=torch.long),
                     skipped, config)
    return Batch(
        images=stack([s["image"] for s in good]),
        targets=stack([s["target"] for s in good]),
        indices=torch.tensor([s["index"] for s in good], dtype=torch.long),
        skipped=skipped,
        config=config,
    )


@dataclass(frozen=True)
class Collate:
    """``collate_samples`` bound to a dataset's config (picklable, unlike a lambda, for spawn workers)."""

    config: BackboneConfig

    def __call__(self, samples: Sequence[dict | SkippedSample]) -> Batch:
        return collate_samples(samples, self.config)


class EpochSampler(DistributedSampler):
    """``DistributedSampler`` (seeded shuffle, per-rank shard) that yields ``(index, epoch)`` keys.

    The key carries the epoch into worker processes (persistent workers never see ``set_epoch``),
    so augmentation draws depend on (seed, epoch, index) only.
    """

    idle = False  # True while ``start_workers`` creates the workers: they get no work yet

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        if self.idle:
            return
        epoch = self.epoch
        for index in super().__iter__():
            yield (int(index), epoch)


def make_loader(dataset: ManifestDataset, *, batch_size: int, shuffle: bool, seed: int, num_workers: int,
                pin_memory: bool, rank: int = 0, world_size: int = 1, drop_last: bool = False,
                mp_context: str = "") -> DataLoader:
    """A DataLoader over ``dataset`` with a seeded, epoch-keyed (and per-rank) order.

    Call ``loader.sampler.set_epoch(epoch)`` before each epoch. Workers persist across epochs.
    """
    sampler = EpochSampler(dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed,
                           drop_last=drop_last)
    kwargs: dict = {}
    if num_workers > 0:
        kwargs.update(persistent_workers=True, prefetch_factor=2)
        if mp_context:
            kwargs["multiprocessing_context"] = mp_context
    return DataLoader(
        dataset,  # type: ignore[arg-type]
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=Collate(dataset.config),
        pin_memory=pin_memory,
        drop_last=drop_last,
        # Its own generator, so creating worker iterators never draws from the global RNG
        # (dropout uses that one, and resume must replay it exactly).
        generator=torch.Generator().manual_seed(seed),
        **kwargs,
    )


def start_workers(loader: DataLoader) -> None:
    """Fork a loader's persistent workers now, with no work queued (nothing is decoded in vain).

    Workers forked later, after training has grown this process's heap, share every page of it, and
    the next training step copies each page it writes (copy-on-write; docs/performance.md). Forked
    while the process is still small, there is little to copy.
    """
    if not (loader.persistent_workers and loader.num_workers > 0):
        return
    sampler = loader.sampler
    assert isinstance(sampler, EpochSampler)
    sampler.idle = True
    try:
        iter(loader)  # creates and keeps the workers; the first epoch's iteration resets them
    finally:
        sampler.idle = False
