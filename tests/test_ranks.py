"""One device resolver for training and scoring (tasks.core.devices.resolve_device)."""

from __future__ import annotations

import pytest
import torch

from tasks.core.devices import resolve_device


def test_auto_is_the_cpu_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device() == torch.device("cpu")
    assert resolve_device("cpu", local_rank=2) == torch.device("cpu")


@pytest.mark.parametrize("setting", ["cuda", "cuda:1"])
def test_cuda_without_cuda_fails_at_once(monkeypatch: pytest.MonkeyPatch, setting: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        resolve_device(setting)


def test_training_takes_its_rank_gpu_and_scoring_the_current_one(monkeypatch: pytest.MonkeyPatch) -> None:
    made_current: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    assert resolve_device("auto", local_rank=3) == torch.device("cuda", 3)  # training under torchrun
    assert resolve_device("cuda:1", local_rank=3) == torch.device("cuda", 1)  # an explicit index wins
    assert made_current == [torch.device("cuda", 3), torch.device("cuda", 1)]
    assert resolve_device("cuda") == torch.device("cuda")  # scoring: the current device, not changed
    assert len(made_current) == 2
