"""How long a scoring call waits for its spawned decoding worker to exit after the last batch: with
the worker's exit hook (``tasks.scoring.decoding.init_decoding_worker``: flush, then ``os._exit``)
and without it (the same start, the interpreter's full teardown). The figure that keeps the hook.

    .venv/bin/python -m benchmarks.bench_worker_exit --repeat 3
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader

from model.networks import backbone_config
from model.preprocess import PatchSettings
from tasks.scoring import decoding
from tasks.scoring.listing import list_source
from tasks.scoring.scorer import ScoringConfig


def plain_init(_: int) -> None:
    """``init_decoding_worker`` without its exit hook."""
    torch.set_num_threads(1)


def exit_wait(dataset: decoding.ImageDataset, init: object) -> float:
    """Seconds from the last batch to the worker's exit (the loader's shutdown joins it)."""
    loader = DataLoader(dataset, batch_size=4, num_workers=1, collate_fn=decoding.collate_images,
                        multiprocessing_context="spawn", worker_init_fn=init, persistent_workers=False)
    batches = iter(loader)
    last = time.perf_counter()
    for _ in batches:
        last = time.perf_counter()
    del batches  # shuts the worker down and joins it
    return time.perf_counter() - last


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        for i in range(args.images):
            Image.new("RGB", (160 + 8 * i, 120), (i * 9 % 256, 80, 160)).save(Path(folder) / f"{i + 1}.jpg")
        dataset = decoding.ImageDataset(list_source(folder).objects, backbone_config("mobilenet_v3_small"),
                                        ScoringConfig(patches=PatchSettings(2, "random")))
        waits: dict[str, list[float]] = {"exit hook": [], "full teardown": []}
        for _ in range(args.repeat):  # interleaved: a busy machine slows both alike
            waits["exit hook"].append(exit_wait(dataset, decoding.init_decoding_worker))
            waits["full teardown"].append(exit_wait(dataset, plain_init))
    for name, values in waits.items():
        print(f"{name}: worker exit wait {min(values):.3f} s best, {max(values):.3f} s worst "
              f"({args.repeat} runs, {args.images} images)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
