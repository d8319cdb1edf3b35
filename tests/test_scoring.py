"""tasks/scoring/scorer.py: the same numbers as model/, whatever the batch, and a row for every image."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model.metrics import score_from_dist, std_from_dist
from model.preprocess import PatchSettings, min_decode_side, predict_distribution, predict_input
from tasks.core.images import decode_to_tensor
from tasks.scoring import decoding
from tasks.scoring import scorer as scoring
from tasks.scoring.decoding import ImageDataset, collate_images
from tasks.scoring.listing import SourceObject, list_source
from tasks.scoring.scorer import (
    CPU_VIEWS_PER_PASS,
    Scorer,
    ScoringConfig,
    config_from_checkpoint,
    score_images,
)
from tests.scoring_fixtures import image_bytes, make_model


@pytest.fixture(scope="module", autouse=True)
def _few_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    return make_model(seed=3)


# Float tolerance: convolution algorithms differ with batch size and memory format (seen: 3e-6).
ATOL = 1e-5
# Shapes that stress geometry: landscape, portrait, square, a 10:1 panorama, a tall strip, one tiny.
SHAPES = [(48, 32), (32, 48), (40, 40), (400, 40), (30, 120), (12, 9)]


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bucket")
    for i, (w, h) in enumerate(SHAPES):
        fmt, ext = ("PNG", "png") if i == 2 else ("JPEG", "jpg")
        (folder / f"{100 + i}.{ext}").write_bytes(image_bytes(i, w, h, fmt))
    (folder / "no-id.jpg").write_bytes(image_bytes(99, 50, 30))  # seeded by content hash
    return list_source(str(folder)).objects


def reference(model, obj: SourceObject, method: str, patches: PatchSettings) -> torch.Tensor:
    """What model/ says for this image: the evaluation code path, written out independently."""
    data = Path(obj.uri).read_bytes()
    image = decode_to_tensor(data, min_short_side=min_decode_side(model.config, method))
    key = obj.image_id if obj.image_id is not None else hashlib.blake2b(data, digest_size=16).hexdigest()
    return predict_distribution(model, predict_input(image, model.config, method, patches, key))


@pytest.mark.parametrize(("method", "mode"), [("nima", "random"), ("mpemd", "random"), ("mpemd", "grid")])
def test_rows_equal_model_outputs(model, bucket, method, mode):
    config = ScoringConfig(method=method, patches=PatchSettings(3, mode, seed=5), batch_size=4, progress=False)
    rows = list(score_images(bucket, model, config))
    assert [r["uri"] for r in rows] == [o.uri for o in bucket]
    for obj, row in zip(bucket, rows, strict=True):
        assert row["status"] == "ok", row["error"]
        expected = reference(model, obj, method, config.patches).numpy()
        np.testing.assert_allclose(row["dist"], expected, rtol=0, atol=ATOL)
        assert row["score"] == pytest.approx(float(score_from_dist(np.float64(row["dist"]))), abs=1e-12)
        assert row["score_std"] == pytest.approx(float(std_from_dist(np.float64(row["dist"]))), abs=1e-12)
        assert row["n_patches"] == (1 if method == "nima" else 3)
        assert row["patch_mode"] == ("warp" if method == "nima" else mode)
    w, h = SHAPES[3]
    pano = rows[3]
    assert (pano["width"], pano["height"], pano["aspect_ratio"]) == (w, h, h / w)
    # The images are scored differently (a model that says the same for all would hide mistakes).
    assert len({round(r["score"], 4) for r in rows}) == len(rows)


@pytest.fixture(scope="module")
def decoded(model, bucket):
    config = ScoringConfig(patches=PatchSettings(2, "random"), batch_size=64)
    dataset = ImageDataset(bucket, model.config, config)
    return config, [dataset[i] for i in range(len(dataset))]


@pytest.fixture(scope="module")
def alone(model, decoded):
    config, items = decoded
    scorer = Scorer(model, config)
    return [scorer.distributions(collate_images([it]))[0] for it in items]


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_batch_invariance(model, decoded, alone, data):
    """An image's distribution is the same alone, first, last, in the middle, beside a panorama, or
    with its views split over several forward passes."""
    config, items = decoded
    target = data.draw(st.integers(0, len(items) - 1), label="target")
    others = data.draw(st.lists(st.integers(0, len(items) - 1), min_size=0, max_size=7), label="others")
    position = data.draw(st.integers(0, len(others)), label="position")
    order = [*others[:position], target, *others[position:]]
    pad = data.draw(st.booleans(), label="pad")
    channels_last = data.draw(st.booleans(), label="channels_last")
    views_per_pass = data.draw(st.sampled_from([0, 1, 3, 7, 64]), label="views_per_pass")
    scorer = Scorer(model, ScoringConfig(patches=config.patches, batch_size=8, pad_batches=pad,
                                         channels_last=channels_last, views_per_pass=views_per_pass))
    dists = scorer.distributions(collate_images([items[i] for i in order]))
    for i, dist in zip(order, dists, strict=True):
        torch.testing.assert_close(dist, alone[i], rtol=0, atol=ATOL)


def test_cpu_forward_passes_are_bounded_whatever_the_batch(model):
    """On the CPU a batch's views go through the model in passes of at most CPU_VIEWS_PER_PASS (memory
    follows the pass); asked for, any pass size; a batch smaller than that is one pass."""
    big = ScoringConfig(batch_size=32, patches=PatchSettings(n_patches=8))
    assert Scorer(model, big).pass_size == CPU_VIEWS_PER_PASS < 32 * 8
    assert Scorer(model, big.model_copy(update={"views_per_pass": 5})).pass_size == 5
    assert Scorer(model, big.model_copy(update={"batch_size": 2})).pass_size == 16
    calls = []
    scorer = Scorer(model, big.model_copy(update={"views_per_pass": 5}))
    forward = scorer.forward
    scorer.forward = lambda x: calls.append(x.shape[0]) or forward(x)
    probs = scorer.probabilities(torch.zeros(12, 3, model.config.input_size, model.config.input_size,
                                             dtype=torch.uint8))
    assert calls == [5, 5, 2] and probs.shape == (12, 10)
    with pytest.raises(ValueError, match="views_per_pass"):
        ScoringConfig(views_per_pass=-1)


def test_batch_of_64_with_panorama_first_and_last(model, decoded, alone):
    config, items = decoded
    panorama = 3
    order = [panorama] + [i % len(items) for i in range(62)] + [panorama]
    dists = Scorer(model, config).distributions(collate_images([items[i] for i in order]))
    for i, dist in zip(order, dists, strict=True):
        torch.testing.assert_close(dist, alone[i], rtol=0, atol=ATOL)


def test_bad_images_become_error_rows_with_reasons(model, tmp_path):
    from tests.corpus.make_corpus import make_image_corpus

    corpus = make_image_corpus(tmp_path / "corpus")
    limit = max(p.stat().st_size for p in (tmp_path / "corpus").iterdir())
    (tmp_path / "corpus" / "big.jpg").write_bytes(image_bytes(1, 48, 32) + b"\0" * limit)  # over the limit
    listing = list_source(str(tmp_path / "corpus"))
    gone = SourceObject(str(tmp_path / "corpus" / "deleted.jpg"), size=10)
    objects = [*listing.objects, gone]
    config = ScoringConfig(method="nima", batch_size=5, progress=False, max_bytes=limit)
    rows = {r["uri"].rsplit("/", 1)[1]: r for r in score_images(objects, model, config)}
    assert len(rows) == len(objects)  # count in == count out
    listed = {o.uri.rsplit("/", 1)[1] for o in listing.objects}
    for item in corpus:
        if item.name not in listed:
            continue  # notes.txt: not an image by name or content, skipped and counted by the listing
        row = rows[item.name]
        if item.expect == "error":
            assert row["status"] == "error" and item.reason_contains in row["error"].lower(), (item.name, row["error"])
            assert row["dist"] is None and row["score"] is None
        else:
            assert row["status"] == "ok", (item.name, row["error"])
            assert (row["width"], row["height"]) == (item.width, item.height)
            assert 1 <= row["score"] <= 10
    assert rows["big.jpg"]["status"] == "error" and rows["big.jpg"]["error"].startswith("size: too large")
    assert rows["deleted.jpg"]["error"].startswith("fetch: I/O error: not found")
    assert listing.skipped_non_image == sum(item.name == "notes.txt" for item in corpus)


def test_large_photo_is_decoded_at_the_scale_the_patches_need(model, tmp_path, monkeypatch):
    from PIL import Image

    path = tmp_path / "1.jpg"
    Image.new("RGB", (4000, 3000), (120, 80, 40)).save(path, quality=80)
    shapes = []
    real = decoding.decode_to_tensor

    def spy(data, **kwargs):
        out = real(data, **kwargs)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(decoding, "decode_to_tensor", spy)  # the workers' decoder
    for method in ("nima", "mpemd"):
        shapes.clear()
        need = min_decode_side(model.config, method)
        item = ImageDataset(list_source(str(path)).objects, model.config, ScoringConfig(method=method))[0]
        assert item.error is None and (item.width, item.height) == (4000, 3000)
        short = min(shapes[0][1:])
        assert need <= short < 2 * need, (method, shapes)  # JPEG draft scale, never the 12 MP original


def _shm_files(pids: set[int]) -> set[str]:
    """torch's shared-memory files in /dev/shm (``torch_<pid>_...``) made by these processes."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        return set()
    return {p.name for p in shm.iterdir() if p.name.startswith("torch_") and int(p.name.split("_")[1]) in pids}


def _children() -> set[int]:
    """Live child processes of this one (their parent pid, field 4 of /proc/<pid>/stat)."""
    pids: set[int] = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == os.getpid():
                pids.add(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
    return pids


@pytest.mark.parametrize("method", ["nima", "mpemd"])
def test_workers_give_the_same_rows_and_leave_no_shared_memory(model, bucket, method):
    """Batches collated in a worker (one shared-memory tensor each) score bit for bit as in-process."""
    base = ScoringConfig(method=method, patches=PatchSettings(2, "grid"), batch_size=3, progress=False)
    in_process = list(score_images(bucket, model, base))
    workers: set[int] = set()
    with_workers = []
    for row in score_images(bucket, model, base.model_copy(update={"num_workers": 2})):
        workers |= _children()
        with_workers.append(row)
    assert workers, "no decoding worker seen"
    assert [(r["uri"], r["status"], r["width"], r["height"]) for r in with_workers] == [
        (r["uri"], r["status"], r["width"], r["height"]) for r in in_process]
    assert [r["dist"] for r in with_workers] == [r["dist"] for r in in_process]
    assert not _shm_files(workers | {os.getpid()})


def test_worker_batches_arrive_as_one_shared_tensor(model, bucket):
    config = ScoringConfig(patches=PatchSettings(2, "random"), batch_size=4)
    dataset = ImageDataset(bucket, model.config, config)
    for index, batch in enumerate(decoding.image_loader(dataset, 4, num_workers=1)):
        expected = collate_images([dataset[i] for i in range(index * 4, min(len(dataset), index * 4 + 4))])
        assert batch.views.is_shared() and torch.equal(batch.views, expected.views)
        assert batch.counts == expected.counts and [it.views for it in batch.images] == [None] * len(batch.images)
    local = collate_images([dataset[0], dataset[1]])
    assert not local.views.is_shared()
    assert torch.equal(local.views, torch.cat([dataset[0].views, dataset[1].views]))


def _decode_all_in_a_daemon(dataset, results) -> None:
    try:
        results.put(sum(len(batch.images) for batch in decoding.image_loader(dataset, 4, num_workers=2)))
    except Exception as error:  # reported to the test, which names it
        results.put(repr(error))


def test_decoding_workers_asked_for_in_a_daemonic_process_decode_in_process(model, bucket):
    """A Dask worker's process is daemonic and may not start children: asked for decoding workers
    there, the loader decodes in-process instead of failing every shard."""
    dataset = ImageDataset(bucket, model.config, ScoringConfig(patches=PatchSettings(2, "grid"), batch_size=4))
    context = multiprocessing.get_context("spawn")  # fork after torch ran threads can hang
    results = context.Queue()
    daemon = context.Process(target=_decode_all_in_a_daemon, args=(dataset, results), daemon=True)
    daemon.start()
    outcome = results.get(timeout=120)
    daemon.join(timeout=60)
    assert outcome == len(dataset), outcome
    assert decoding.image_loader(dataset, 4, num_workers=2).num_workers == 2  # elsewhere: as asked


def test_a_worker_leaves_at_once_without_losing_its_output(tmp_path):
    """The worker's exit hook (skip the interpreter's teardown) still flushes what was printed and logged."""
    log = tmp_path / "worker.log"
    script = ("import logging, logging.handlers, sys\n"
              "from tasks.scoring.decoding import init_decoding_worker\n"
              f"target = logging.FileHandler({str(log)!r})\n"
              "logging.getLogger().addHandler(logging.handlers.MemoryHandler(1000, target=target))\n"
              "init_decoding_worker(0)\n"
              "logging.getLogger('mpemd').warning('logged before exit')\n"
              "print('printed before exit')\n"
              "sys.stderr.write('to stderr')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered, as a worker's are
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1], env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "printed before exit" and done.stderr.endswith("to stderr")
    assert "logged before exit" in log.read_text()


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_normalisation_is_bitwise_the_reference_formula(model, channels_last, dtype):
    """``normalize`` (in place on its own copy, as the Scorer and training use it) gives the bits of
    the out-of-place formula, leaves its input alone, and the Scorer's batches take the model's layout."""
    from model.networks import normalize

    config = model.config
    mean, std = torch.tensor(config.mean).view(3, 1, 1), torch.tensor(config.std).view(3, 1, 1)
    views = torch.randint(0, 256, (5, 3, 17, 23), dtype=torch.uint8).to(dtype)
    for source in (views, views.contiguous(memory_format=torch.channels_last)):
        before = source.clone()
        x = source.float() / 255.0 if dtype == torch.uint8 else source.float()
        assert torch.equal(normalize(source, config), (x - mean) / std)
        assert torch.equal(source, before)
    seen = []
    scorer = Scorer(model, ScoringConfig(channels_last=channels_last))
    scorer.forward = lambda x: seen.append(x) or torch.zeros(x.shape[0], 10)
    scorer.probabilities(views.to(torch.uint8))
    layout = torch.channels_last if channels_last else torch.contiguous_format
    assert seen[0].is_contiguous(memory_format=layout)
    assert torch.equal(seen[0], normalize(views.to(torch.uint8), config))


def test_config_from_checkpoint_metadata_and_overrides():
    info = {"metadata": {"stage": "mpemd", "patch_settings": {"n_patches": 4, "mode": "grid", "seed": 7}}}
    cfg = config_from_checkpoint(info)
    assert (cfg.method, cfg.patches) == ("mpemd", PatchSettings(4, "grid", 7))
    cfg = config_from_checkpoint(info, method="nima", n_patches=2, batch_size=3)
    assert cfg.method == "nima" and cfg.patches.n_patches == 2 and cfg.batch_size == 3
    assert cfg.settings.patch_mode == "warp" and cfg.settings.n_patches == 1
    nested = config_from_checkpoint({"metadata": {"stage": "nima", "patch_settings": {"n_patches": 3, "mode": "random"}}})
    assert nested.method == "nima" and nested.patches.n_patches == 3
    assert config_from_checkpoint({}).method == "mpemd"
    with pytest.raises(ValueError):
        ScoringConfig(method="bogus")


def _overwrite_checkpoint_and_reload(url: str, write) -> None:
    from model.checkpoint import make_checkpoint, serialize_checkpoint

    def content(seed: int) -> tuple[bytes, str]:
        checkpoint = make_checkpoint(make_model(seed), metadata={"method": "nima"})
        return serialize_checkpoint(checkpoint), checkpoint["model_version"]

    first, first_version = content(1)
    second, second_version = content(2)
    assert first_version != second_version
    write(url, first)
    model_a, info_a = scoring.load_scoring_model(url, "cpu")
    assert info_a["model_version"] == first_version
    assert scoring.read_checkpoint_info(url)["model_version"] == first_version
    assert scoring.load_scoring_model(url, "cpu")[0] is model_a  # unchanged content: the cached model
    write(url, second)  # a long-lived worker sees checkpoint-best.pt replaced
    model_b, info_b = scoring.load_scoring_model(url, "cpu")
    assert info_b["model_version"] == second_version and model_b is not model_a
    assert scoring.read_checkpoint_info(url)["model_version"] == second_version
    weights = dict(model_b.state_dict())
    assert any(not torch.equal(weights[k], v) for k, v in model_a.state_dict().items())


def test_model_cache_follows_the_checkpoint_content_not_its_url(tmp_path):
    from tasks.core import storage

    _overwrite_checkpoint_and_reload(str(tmp_path / "checkpoint-best.pt"), storage.write_bytes_atomic)


@pytest.mark.s3
def test_model_cache_follows_the_etag_on_s3(s3_bucket):
    from tasks.core import storage

    url = f"{s3_bucket}/runs/checkpoint-best.pt"
    _overwrite_checkpoint_and_reload(url, storage.write_bytes_atomic)
    assert scoring.checkpoint_fingerprint(url).startswith("etag:")


def _device_path_rows(objects, model, config, monkeypatch):
    """Rows through the device-decode path, its decoder running on the CPU (no CUDA in CI)."""
    monkeypatch.setattr(scoring, "device_decodes", lambda cfg, device: True)
    return list(score_images(objects, model, config))


@pytest.mark.parametrize("method", ["nima", "mpemd"])
def test_device_decode_path_gives_the_same_rows_as_the_workers(model, bucket, method, monkeypatch):
    config = ScoringConfig(method=method, patches=PatchSettings(3, "random", seed=2), batch_size=3, progress=False,
                           decode="gpu")
    cpu_rows = list(score_images(bucket, model, config.model_copy(update={"decode": "cpu"})))
    device_rows = _device_path_rows(bucket, model, config, monkeypatch)
    for a, b in zip(cpu_rows, device_rows, strict=True):
        assert (a["uri"], a["status"], a["width"], a["height"]) == (b["uri"], b["status"], b["width"], b["height"])
        np.testing.assert_allclose(a["dist"], b["dist"], atol=1e-4)


def test_device_decode_falls_back_to_the_cpu_per_image(model, bucket, tmp_path, monkeypatch):
    import torchvision.io

    from tests.corpus.make_corpus import make_image_corpus

    make_image_corpus(tmp_path / "corpus")  # truncated, CMYK, bad tables...: the same verdicts
    objects = [*bucket, *list_source(str(tmp_path / "corpus")).objects]
    config = ScoringConfig(method="nima", batch_size=4, progress=False, decode="gpu")
    cpu_rows = list(score_images(objects, model, config.model_copy(update={"decode": "cpu"})))
    real = torchvision.io.decode_jpeg
    refused = bucket[1].uri
    refused_bytes = Path(refused).read_bytes()
    calls = {"batched": 0, "fallback": 0}

    def flaky(data, **kwargs):  # the device refuses one file: its batch fails, then that file alone
        items = data if isinstance(data, list) else [data]
        calls["batched" if isinstance(data, list) else "fallback"] += 1
        if any(bytes(t.numpy()) == refused_bytes for t in items):
            raise RuntimeError("nvjpeg: unsupported")
        return real(data, **kwargs)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", flaky)
    device_rows = _device_path_rows(objects, model, config, monkeypatch)
    assert calls["fallback"] > 0
    for a, b in zip(cpu_rows, device_rows, strict=True):
        assert (a["uri"], a["status"], a["error"]) == (b["uri"], b["status"], b["error"])
        if a["status"] == "ok":
            np.testing.assert_allclose(a["dist"], b["dist"], atol=1e-4)


def test_decode_gpu_without_cuda_warns_and_decodes_on_the_cpu(model, bucket, caplog):
    config = ScoringConfig(method="nima", batch_size=4, progress=False)
    with caplog.at_level("WARNING", logger="mpemd"):
        gpu_rows = list(score_images(bucket, model, config.model_copy(update={"decode": "gpu"})))
    assert "decoding on the CPU instead" in caplog.text
    for a, b in zip(score_images(bucket, model, config), gpu_rows, strict=True):
        assert a["dist"] == b["dist"] and a["status"] == b["status"]
    with pytest.raises(ValueError, match="decode"):
        ScoringConfig(decode="tpu")
