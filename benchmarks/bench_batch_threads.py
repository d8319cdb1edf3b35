"""CPU cost per scored image of the model alone by batch size and torch threads: the figures behind
the scoring defaults (batch 32; torch threads left at the core count).

    .venv/bin/python -m benchmarks.bench_batch_threads            # this process's settings
    MPEMD_MALLOC=system .venv/bin/python -m benchmarks.bench_batch_threads   # glibc defaults, spinning

mobilenet_v3_small, |P| = 8 views of 224 px, uint8 views normalised per batch as the Scorer does
(``model.networks.normalize``, in place on its copy, then the model's channels_last layout).
Interleaved, best of 3 by CPU time (``getrusage``: user + sys of this process), which a busy machine
inflates far less than wall time; sys / user and minor page faults per image beside it.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from model.networks import build_model, normalize


def _usage() -> tuple[float, float, int]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime, r.ru_minflt


def measure(net: torch.nn.Module, batch: int, images: int) -> tuple[float, float, float, float]:
    """(CPU s per image, sys / user, minor faults per image, images/s wall) of ``images`` images."""
    x = torch.randint(0, 255, (batch * 8, 3, 224, 224), dtype=torch.uint8)
    with torch.inference_mode():
        net(normalize(x, net.config).contiguous(memory_format=torch.channels_last))  # warm-up
        done, (u0, s0, f0), start = 0, _usage(), time.perf_counter()
        while done < images:
            net(normalize(x, net.config).contiguous(memory_format=torch.channels_last))
            done += batch
        u1, s1, f1 = _usage()
    return (u1 - u0 + s1 - s0) / done, (s1 - s0) / max(u1 - u0, 1e-9), (f1 - f0) / done, done / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 8, 16, 32])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    import os

    print(f"MPEMD_MALLOC={os.environ.get('MPEMD_MALLOC', '(unset: keep freed memory)')}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset: spin)')}")
    net = build_model("mobilenet_v3_small", weights="none").eval().to(memory_format=torch.channels_last)
    best: dict[tuple[int, int], tuple[float, float, float, float]] = {}
    for _ in range(args.repeat):
        for threads in args.threads:
            torch.set_num_threads(threads)
            for batch in args.batches:
                got = measure(net, batch, args.images)
                key = (threads, batch)
                best[key] = min(best.get(key, got), got)
    print("\n| torch threads | batch (images) | CPU ms / image | sys / user | faults / image | images/s (wall) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (threads, batch), (cpu, share, faults, rate) in sorted(best.items()):
        print(f"| {threads} | {batch} | {cpu * 1000:.1f} | {share:.0%} | {faults:.0f} | {rate:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
