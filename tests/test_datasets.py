"""Manifest dataset: geometry from the registry, sample shapes, skips, seeded order, workers, S3."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from benchmarks.toy_data import toy_counts, write_toy_dataset
from model.networks import backbone_config, list_backbones, normalize
from model.preprocess import (
    PatchSettings,
    mpemd_predict_input,
    mpemd_train_input,
    nima_predict_input,
    nima_train_input,
)
from tasks.core import storage
from tasks.core.images import decode_to_tensor
from tasks.training.datasets import (
    Batch,
    EpochSampler,
    ManifestDataset,
    ManifestRecords,
    SkippedSample,
    collate_samples,
    make_loader,
    read_manifest,
    sample_seed,
    start_workers,
)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("toy")
    write_toy_dataset(root, n_train=12, n_val=4, short_side=(72, 100), corrupt_ids=(2,))
    return root


def _records(root: Path, split: str = "train") -> ManifestRecords:
    return read_manifest(str(root / "manifests" / f"{split}.parquet"))


@pytest.mark.parametrize("backbone", list_backbones())
def test_geometry_comes_from_the_registry(backbone: str) -> None:
    config = backbone_config(backbone)
    assert config == backbone_config(backbone)
    assert config.resize_size == round(config.input_size * 342 / 299)
    if config.fixed_input_size:  # one input size only: the data refuses another, as build_model does
        with pytest.raises(ValueError, match="inputs only"):
            backbone_config(backbone, 64)
        return
    small = backbone_config(backbone, 64)
    assert (small.input_size, small.resize_size, small.mean) == (64, 73, config.mean)


def test_read_manifest_and_toy_labels(toy: Path) -> None:
    records = _records(toy)
    assert len(records) == 12 and records.counts.shape == (12, 10)
    assert records.image_id.dtype == np.int64 and len(set(records.image_id.tolist())) == 12
    assert (records.counts.sum(1) == 100).all()
    assert len(records.head(5)) == 5 and records.head(0) is records
    # brighter -> higher mean score: the label rule is monotone
    means = [(np.arange(1, 11) * toy_counts(b)).sum() / 100 for b in (0.1, 0.5, 0.9)]
    assert means[0] < means[1] < means[2]


@pytest.mark.parametrize("method, shape", [("nima", (3, 64, 64)), ("mpemd", (3, 3, 64, 64))])
def test_sample_shapes_and_seeded_augmentation(toy: Path, method: str, shape: tuple) -> None:
    ds = ManifestDataset(_records(toy), backbone_config("mobilenet_v3_small", 64), method, train=True, n_patches=3)
    a, b, c = ds[(0, 0)], ds[(0, 0)], ds[(0, 1)]
    assert tuple(a["image"].shape) == shape and a["image"].dtype == torch.uint8  # normalised on the device
    assert torch.equal(a["image"], b["image"])  # (seed, epoch, index) fixes the draw
    assert not torch.equal(a["image"], c["image"])  # a fresh draw every epoch
    assert torch.allclose(a["target"].sum(), torch.tensor(1.0))


def test_eval_samples_follow_the_prediction_protocol(toy: Path) -> None:
    records = _records(toy, "val")
    config = backbone_config("mobilenet_v3_small", 64)
    settings = PatchSettings(n_patches=3, mode="random", seed=5)
    image = decode_to_tensor(storage.read_bytes(records.uri[1]))
    nima = ManifestDataset(records, config, "nima", train=False)[(1, 0)]
    assert torch.allclose(normalize(nima["image"], config), nima_predict_input(image, config)[0], atol=2e-2)
    mpemd_ds = ManifestDataset(records, config, "mpemd", train=False, n_patches=3, patch_settings=settings)
    expected = mpemd_predict_input(image, config, settings, int(records.image_id[1]))
    # same seeded patch positions (draft decoding may shift pixels slightly, never the geometry)
    assert mpemd_ds[(1, 0)]["image"].shape == expected.shape
    assert torch.allclose(normalize(mpemd_ds[(1, 0)]["image"], config), expected, atol=0.15)
    assert torch.equal(mpemd_ds[(1, 0)]["image"], mpemd_ds[(1, 7)]["image"])  # eval ignores the epoch


def test_large_jpegs_decode_in_draft_mode(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (1600, 1200), (120, 60, 30)).save(buffer, format="JPEG")
    path = tmp_path / "big.jpg"
    path.write_bytes(buffer.getvalue())
    records = ManifestRecords(np.array([1]), [str(path)], np.ones((1, 10)), np.array([0.75]))
    ds = ManifestDataset(records, backbone_config("mobilenet_v3_small", 64), "mpemd", train=True, n_patches=2)
    decoded = ds.load_image(0)
    assert 73 <= min(decoded.shape[-2:]) < 1200  # shrunk by the JPEG decoder, still >= the resize side


def test_bad_samples_are_skipped_with_reasons(toy: Path, tmp_path: Path) -> None:
    records = _records(toy)
    counts = records.counts.copy()
    counts[3] = 0
    uris = list(records.uri)
    uris[4] = str(tmp_path / "missing.jpg")
    records = ManifestRecords(records.image_id, uris, counts, records.aspect_ratio)
    ds = ManifestDataset(records, backbone_config("mobilenet_v3_small", 64), "nima", train=True)
    reasons = {i: ds[(i, 0)].reason for i in range(len(ds)) if isinstance(ds[(i, 0)], SkippedSample)}
    assert set(reasons) == {2, 3, 4}
    assert reasons[2].startswith("decode: truncated")
    assert reasons[3] == "label: no votes"
    assert reasons[4].startswith("fetch:")
    batch = collate_samples([ds[(i, 0)] for i in range(6)])
    assert len(batch) == 3 and [s.index for s in batch.skipped] == [2, 3, 4]
    assert batch.indices.tolist() == [0, 1, 5]
    empty = collate_samples([ds[(2, 0)]])
    assert len(empty) == 0 and len(empty.skipped) == 1


def test_order_is_seeded_by_epoch_and_sharded_by_rank(toy: Path) -> None:
    ds = ManifestDataset(_records(toy), backbone_config("mobilenet_v3_small", 64), "nima", train=True)

    def order(epoch: int, seed: int = 0, rank: int = 0, world: int = 1) -> list[tuple[int, int]]:
        sampler = EpochSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert order(0) == order(0) and order(0) != order(1) and order(0) != order(0, seed=1)
    assert all(epoch == 3 for _, epoch in order(3))
    shards = [i for rank in range(3) for i, _ in order(2, rank=rank, world=3)]
    assert sorted(shards) == list(range(12))


def test_workers_give_the_same_batches_as_the_main_process(toy: Path) -> None:
    ds = ManifestDataset(_records(toy), backbone_config("mobilenet_v3_small", 64), "mpemd", train=True, n_patches=2)

    def epochs(num_workers: int) -> list[Batch]:
        loader = make_loader(ds, batch_size=4, shuffle=True, seed=3, num_workers=num_workers, pin_memory=False)
        start_workers(loader)  # as build_loaders does: forked early, idle until the first epoch
        out = []
        for epoch in range(2):  # persistent workers must see the new epoch through the sampler keys
            loader.sampler.set_epoch(epoch)
            out.extend(loader)
        return out

    main, workers = epochs(0), epochs(2)
    assert len(main) == len(workers) == 6
    for a, b in zip(main, workers, strict=True):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.images, b.images)
        assert a.images.dtype == torch.uint8 and torch.equal(a.inputs(CPU), b.inputs(CPU))
        assert b.images.is_shared()  # collated into shared memory by the worker, not copied there after
        assert [s.image_id for s in a.skipped] == [s.image_id for s in b.skipped]
    assert sum(len(b) + len(b.skipped) for b in main) == 24  # 2 epochs x 12: count in == count out


@pytest.mark.parametrize("method", ["nima", "mpemd"])
def test_batch_inputs_equal_the_float_pipeline_exactly(toy: Path, method: str) -> None:
    """Normalising the uint8 views after the loader gives bit for bit the input the float pipeline
    (resize, crop, flip, normalise in one go) gives: the resize already rounds to uint8."""
    records = _records(toy)
    config = backbone_config("mobilenet_v3_small", 64)
    ds = ManifestDataset(records, config, method, train=True, n_patches=3, seed=4)
    batch = collate_samples([ds[(i, 2)] for i in (0, 1, 3)], config)
    expected = []
    for i in (0, 1, 3):
        generator = torch.Generator().manual_seed(sample_seed(4, 2, i))
        image = ds.load_image(i)
        expected.append(nima_train_input(image, config, generator)[0] if method == "nima"
                        else mpemd_train_input(image, config, 3, generator))
    got = batch.inputs(CPU)
    assert got.dtype == torch.float32 and torch.equal(got, torch.stack(expected))
    assert torch.equal(Batch(got, batch.targets, batch.indices).inputs(CPU), got)  # float batches pass through
    with pytest.raises(ValueError, match="BackboneConfig"):
        Batch(batch.images, batch.targets, batch.indices).inputs(CPU)


@pytest.mark.s3
def test_dataset_reads_manifest_and_images_from_s3(s3_bucket: str) -> None:
    root = f"{s3_bucket}/ava"
    write_toy_dataset(root, n_train=3, n_val=0, short_side=(72, 80))
    records = read_manifest(f"{root}/manifests/train.parquet")
    assert records.uri[0].startswith("s3://")
    ds = ManifestDataset(records, backbone_config("mobilenet_v3_small", 64), "mpemd", train=True, n_patches=2)
    assert tuple(ds[(0, 0)]["image"].shape) == (2, 3, 64, 64)


def test_nima_training_decodes_at_its_resize_size(tmp_path: Path) -> None:
    """An 800x640 JPEG: draft mode may halve it to 400x320 for a 299 input, but NIMA's training warps
    to 342x342, so its decoder must keep a shorter side >= 342 (no decode-small-then-upsample)."""
    buffer = io.BytesIO()
    Image.new("RGB", (800, 640), (120, 60, 30)).save(buffer, format="JPEG")
    path = tmp_path / "photo.jpg"
    path.write_bytes(buffer.getvalue())
    records = ManifestRecords(np.array([1]), [str(path)], np.ones((1, 10)), np.array([0.8]))
    config = backbone_config("inception_v3")
    assert (config.input_size, config.resize_size) == (299, 342)
    train = ManifestDataset(records, config, "nima", train=True).load_image(0)
    predict = ManifestDataset(records, config, "nima", train=False).load_image(0)
    assert min(train.shape[-2:]) >= config.resize_size
    assert config.input_size <= min(predict.shape[-2:]) < config.resize_size  # the draft cut is real
    mpemd = ManifestDataset(records, config, "mpemd", train=True, n_patches=2).load_image(0)
    assert min(mpemd.shape[-2:]) >= config.resize_size
