"""Batch tensors that a DataLoader worker builds go straight into shared memory, as torch's
``default_collate`` does: the queue then sends a handle, not a copy, and the main process maps the
pages the worker wrote. In the main process (``num_workers=0``) they are ordinary tensors.
Training (``tasks/training/datasets.py``) and scoring (``tasks/scoring/decoding.py``) collate with these."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import get_worker_info


def cat(tensors: Sequence[Tensor]) -> Tensor:
    """``torch.cat`` along dim 0; in a loader worker, into one shared-memory tensor."""
    parts = list(tensors)
    first = parts[0]
    if get_worker_info() is None or any(p.shape[1:] != first.shape[1:] or p.dtype != first.dtype for p in parts):
        return torch.cat(parts)  # in this process, or parts torch refuses (or promotes) with its own rules
    shape = (sum(int(p.shape[0]) for p in parts), *first.shape[1:])
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * first.element_size())
    return torch.cat(parts, out=torch.empty(0, dtype=first.dtype).set_(storage, 0, shape))


def stack(tensors: Sequence[Tensor]) -> Tensor:
    """``torch.stack``; in a loader worker, into one shared-memory tensor."""
    return cat([t.unsqueeze(0) for t in tensors])
