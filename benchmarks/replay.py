"""A loader replaying precomputed batches: benchmarks and GPU checks time the model without the data path."""

from __future__ import annotations

from collections.abc import Iterator

from tasks.training.datasets import Batch


class ReplayLoader:
    """Precomputed batches replayed with the loader interface ``train_one_epoch`` / ``evaluate`` use
    (``sampler`` with ``set_epoch`` and a length, ``drop_last``, ``batch_size``): benchmarks use it
    to time the model without the data path."""

    class _Sampler:
        def __init__(self, n: int) -> None:
            self.n = n

        def set_epoch(self, epoch: int) -> None:
            pass

        def __len__(self) -> int:
            return self.n

    def __init__(self, batches: list[Batch], repeats: int = 1) -> None:
        self.batches, self.repeats = batches, repeats
        self.sampler = self._Sampler(sum(len(b) for b in batches) * repeats)
        self.drop_last, self.batch_size = False, max(len(b) for b in batches)

    def __len__(self) -> int:
        return len(self.batches) * self.repeats

    def __iter__(self) -> Iterator[Batch]:
        for _ in range(self.repeats):
            yield from self.batches
