"""Checkpoints: round trip, a content-based model_version, clear errors, and no code execution on load."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from model.checkpoint import (
    FORMAT,
    CheckpointError,
    checkpoint_bytes,
    load_checkpoint,
    load_model,
    make_checkpoint,
    model_from_checkpoint,
    package_version,
    save_checkpoint,
    state_hash,
)
from model.networks import build_model

BACKBONE = "mobilenet_v3_small"  # the smallest registered network keeps these tests quick


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # the suite shares 2 cores
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return build_model(BACKBONE, weights="none").eval()


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory) -> tuple[str, str]:
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint-1.pt"
    version = save_checkpoint(path, model, metadata={"stage": "nima", "patches": {"n": 8, "mode": "grid"}})
    return str(path), version


def _probe() -> torch.Tensor:
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


def test_round_trip_gives_the_same_model(model, saved):
    path, version = saved
    restored, checkpoint = load_model(path)
    assert not restored.training
    assert checkpoint["format"] == FORMAT and checkpoint["backbone"] == BACKBONE
    assert checkpoint["model_version"] == version and checkpoint["num_bins"] == 10
    assert checkpoint["metadata"] == {"package_version": package_version(), "stage": "nima",
                                      "patches": {"n": 8, "mode": "grid"}}
    with torch.inference_mode():
        torch.testing.assert_close(restored(_probe()), model(_probe()), rtol=0, atol=0)
    for key, value in model.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key


def test_round_trip_through_bytes_and_file_objects(model):
    blob = checkpoint_bytes(model, metadata={"command": "mpemd train --stage nima"})
    restored, checkpoint = load_model(blob, backbone=BACKBONE)
    assert checkpoint["metadata"]["command"] == "mpemd train --stage nima"
    buffer = io.BytesIO()
    version = save_checkpoint(buffer, model)
    buffer.seek(0)
    assert load_checkpoint(buffer)["model_version"] == version == checkpoint["model_version"]
    with torch.inference_mode():
        torch.testing.assert_close(restored(_probe()), model(_probe()))


def test_resume_state_survives_weights_only_loading(tmp_path):
    model = build_model(BACKBONE, "none")  # its own model: this test takes an optimiser step
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.train()
    loss = model(_probe()).sum()
    loss.backward()
    optimizer.step()  # momentum buffers now exist
    optimizer.zero_grad()
    model.eval()
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=10, gamma=0.95)
    path = tmp_path / "resume.pt"
    save_checkpoint(path, model, metadata={"config": {"lr": 1e-3, "epochs": 100, "k": 1.2, "note": None}},
                    optimizer=optimizer.state_dict(), lr_scheduler=scheduler.state_dict(), epoch=7,
                    rng_state=torch.get_rng_state())
    checkpoint = load_checkpoint(path)
    assert checkpoint["epoch"] == 7
    assert torch.equal(checkpoint["rng_state"], torch.get_rng_state())
    assert checkpoint["metadata"]["config"] == {"lr": 1e-3, "epochs": 100, "k": 1.2, "note": None}
    fresh = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    fresh.load_state_dict(checkpoint["optimizer"])
    first_param = next(iter(fresh.state.values()))
    assert "momentum_buffer" in first_param


# ---- model_version ---------------------------------------------------------------------------------

def test_model_version_is_content_based(model, tmp_path):
    a = save_checkpoint(tmp_path / "a.pt", model, metadata={"stage": "nima"})
    (tmp_path / "elsewhere").mkdir()
    b = save_checkpoint(tmp_path / "elsewhere" / "b.pt", model, metadata={"stage": "something else"}, epoch=3)
    assert a == b  # where, when and with what metadata it was saved do not matter
    assert len(a) == 16 and all(c in "0123456789abcdef" for c in a)
    clone = build_model(BACKBONE, "none")
    clone.load_state_dict(model.state_dict())
    assert make_checkpoint(clone)["model_version"] == a
    with torch.no_grad():
        clone.head[1].bias[3] += 1e-6  # one weight, barely changed
    assert make_checkpoint(clone)["model_version"] != a


def test_model_version_is_an_independent_sha256(model):
    """Pinned definition: sha256 over backbone name, then sorted (key, dtype, shape, raw bytes)."""
    import hashlib

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    digest = hashlib.sha256(BACKBONE.encode())
    for key in sorted(state):
        t = state[key]
        digest.update(key.encode() + str(t.dtype).encode() + str(tuple(t.shape)).encode())
        digest.update(t.numpy().tobytes() if t.numel() else b"")
    assert make_checkpoint(model)["model_version"] == digest.hexdigest()[:16]
    assert state_hash("resnet18", state) != state_hash(BACKBONE, state)


def test_model_version_same_through_wrappers(model):
    class Wrapper(nn.Module):  # the shape of DDP (``.module``) and torch.compile (``._orig_mod``)
        def __init__(self, inner: nn.Module, attr: str) -> None:
            super().__init__()
            setattr(self, attr, inner)

    version = make_checkpoint(model)["model_version"]
    assert make_checkpoint(Wrapper(model, "module"))["model_version"] == version
    assert make_checkpoint(Wrapper(Wrapper(model, "_orig_mod"), "module"))["model_version"] == version
    with pytest.raises(TypeError):
        make_checkpoint(nn.Linear(2, 2))


# ---- bad files ----------------------------------------------------------------------------------------

def test_corrupt_files_are_checkpoint_errors(saved, tmp_path):
    path, _ = saved
    data = Path(path).read_bytes()
    cases = {
        "truncated.pt": data[: len(data) // 2],
        "empty.pt": b"",
        "garbage.pt": os.urandom(4096),
        "flipped.pt": data[:100] + bytes(b ^ 0xFF for b in data[100:400]) + data[400:],
    }
    for name, blob in cases.items():
        target = tmp_path / name
        target.write_bytes(blob)
        with pytest.raises(CheckpointError):
            load_model(target)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")


def test_non_mpemd_files_are_checkpoint_errors(model, tmp_path):
    plain_state = tmp_path / "state_dict.pt"
    torch.save(model.state_dict(), plain_state)
    with pytest.raises(CheckpointError, match="not an mpemd checkpoint"):
        load_checkpoint(plain_state)
    a_list = tmp_path / "list.pt"
    torch.save([1, 2, 3], a_list)
    with pytest.raises(CheckpointError, match="not an mpemd checkpoint"):
        load_checkpoint(a_list)
    newer = make_checkpoint(model)
    newer["format_version"] = 99
    with pytest.raises(CheckpointError, match="newer"):
        load_checkpoint(_bytes(newer))
    incomplete = make_checkpoint(model)
    del incomplete["model_version"]
    with pytest.raises(CheckpointError, match="model_version"):
        load_checkpoint(_bytes(incomplete))


def _bytes(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_wrong_backbone_is_a_checkpoint_error(saved, model):
    path, _ = saved
    with pytest.raises(CheckpointError, match="not 'resnet18'"):
        load_model(path, backbone="resnet18")
    relabelled = make_checkpoint(model)
    relabelled["backbone"] = "mobilenet_v3_large"  # the weights do not fit the label
    with pytest.raises(CheckpointError, match="do not fit"):
        model_from_checkpoint(load_checkpoint(_bytes(relabelled)))
    unknown = make_checkpoint(model)
    unknown["backbone"] = "vgg16"
    with pytest.raises(CheckpointError, match="unknown backbone"):
        load_model(_bytes(unknown))


# ---- no code execution -------------------------------------------------------------------------------

class _Plant:
    """Unpickling this calls ``open(marker, "w")``: the file appearing means code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_does_not_execute(model, tmp_path):
    # The payload is real: an unsafe load would create the marker.
    proof = tmp_path / "proof-marker"
    proof_file = tmp_path / "proof.pt"
    torch.save({"x": _Plant(str(proof))}, proof_file)
    torch.load(proof_file, weights_only=False).get("x").close()
    assert proof.exists()

    marker = tmp_path / "marker"
    hidden = make_checkpoint(model)  # a genuine-looking checkpoint with the payload in its metadata
    hidden["metadata"]["note"] = _Plant(str(marker))
    hidden_file = tmp_path / "hidden.pt"
    torch.save(hidden, hidden_file)
    legacy_file = tmp_path / "legacy.pt"  # a bare pickle, not torch's zip format
    legacy_file.write_bytes(pickle.dumps({"format": FORMAT, "payload": _Plant(str(marker))}, protocol=2))
    for source in (hidden_file, legacy_file, hidden_file.read_bytes()):
        with pytest.raises(CheckpointError):
            load_model(source)
        assert not marker.exists()


def test_input_size_override_survives_the_round_trip():
    from model.checkpoint import checkpoint_bytes, load_model
    from model.networks import build_model

    model = build_model("mobilenet_v3_small", "none", input_size=96)
    restored, checkpoint = load_model(checkpoint_bytes(model))
    assert checkpoint["input_size"] == 96
    assert restored.config.input_size == 96
