"""Where a process runs: its rank under torchrun, its device (training and scoring) and its AMP precision.

``RankInfo`` is the distributed-training view of one process (``rank``, ``world_size``,
``local_rank``); single-process training is world size 1 and every collective is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class RankInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE_PROCESS = RankInfo()


def setup_distributed(device_kind: str) -> RankInfo:
    """Join the process group when launched by torchrun (``WORLD_SIZE`` > 1); else a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return SINGLE_PROCESS
    info = RankInfo(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return info


def wants_cuda(setting: str) -> bool:
    return setting.startswith("cuda") or (setting == "auto" and torch.cuda.is_available())


def resolve_device(setting: str = "auto", *, local_rank: int | None = None) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` as a device, for training and scoring alike; asking for
    CUDA where there is none raises at once (not at the first tensor moved).

    ``local_rank``: a training process passes its torchrun rank, so plain ``cuda`` is this rank's GPU
    and becomes the current device; scoring passes nothing and plain ``cuda`` stays the current one."""
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(setting)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device={setting} was asked for but CUDA is not available")
        if local_rank is not None:
            if device.index is None:
                device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
    return device


def autocast_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """The AMP dtype: ``auto`` is bf16 on CUDA where supported, else fp16; no AMP on CPU."""
    if setting == "none" or (setting == "auto" and device.type != "cuda"):
        return None
    if setting == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if setting == "bf16" else torch.float16


def gather_arrays(arrays: list[np.ndarray], ranks: RankInfo) -> list[np.ndarray]:
    """Concatenate per-rank arrays on every rank (object all_gather; eval-sized data only)."""
    if not ranks.enabled:
        return arrays
    gathered: list[Any] = [None] * ranks.world_size
    torch_dist.all_gather_object(gathered, arrays)
    return [np.concatenate([g[i] for g in gathered]) for i in range(len(arrays))]


def reduce_sum(values: list[float], ranks: RankInfo, device: torch.device) -> list[float]:
    if not ranks.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch_dist.all_reduce(t)
    return t.tolist()


def barrier(ranks: RankInfo) -> None:
    if ranks.enabled:
        torch_dist.barrier()
