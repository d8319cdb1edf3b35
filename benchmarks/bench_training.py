"""Training throughput on this machine (CPU by default) and what the data path costs.

For NIMA and MPEMD with a preset (default ``cpu-smoke``) over synthetic JPEGs of AVA-like sizes, for
each loader worker count asked for:

- end to end: manifest -> fsspec read -> JPEG decode (draft mode) -> augment -> train step;
- pre-decoded: the same train steps over the very same input tensors held in memory;
- data only: the loader alone, no model.

The ratio end-to-end / pre-decoded says how much of the model's speed the data path keeps (1.0 =
free). ``--full-run`` also times a whole ``fit`` of the preset (the "about a minute" claim).
Then the MPEMD / NIMA cost of an epoch per image (wall and CPU, end to end and in memory) beside the
forward work ratio |P|, and each end-to-end epoch's sys CPU as a share of its user CPU (goal < 10%),
from ``getrusage`` of this process and its reaped loader workers (shut down before reading it).

    python -m benchmarks.bench_training                       # cpu-smoke, 200 images, 1 thread
    python -m benchmarks.bench_training --preset cpu --workers 0 1 2 --threads 0   # the loader's cost
    python -m benchmarks.bench_training --workers 2 --full-run
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import resource
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from benchmarks.replay import ReplayLoader
from benchmarks.toy_data import write_toy_dataset
from model.networks import backbone_config
from tasks.core import markdown
from tasks.training.datasets import (
    ManifestDataset,
    make_loader,
    read_manifest,
    start_workers,
)
from tasks.training.loop import fit, make_loss_fn, train_one_epoch
from tasks.training.presets import resolve_config
from tasks.training.setup import build_network, make_optimizer


def measure(method: str, root: Path, preset: str, workers: int, overrides: dict) -> dict[str, float]:
    cfg = resolve_config(preset, {**overrides, "num_workers": workers})
    geometry = backbone_config(cfg.backbone, cfg.image_size)
    records = read_manifest(str(root / "manifests" / "train.parquet"))
    dataset = ManifestDataset(records, geometry, method, train=True, n_patches=cfg.n_patches, seed=cfg.seed)

    def loader() -> DataLoader:
        return make_loader(dataset, batch_size=cfg.batch_size, shuffle=True, seed=0, num_workers=workers,
                           pin_memory=False, mp_context=cfg.mp_context)

    # data only (also warms the page cache); these workers are reaped before anything is counted
    data_loader = loader()
    data_loader.sampler.set_epoch(0)
    start = time.perf_counter()
    batches = list(data_loader)
    data_only = sum(len(b) for b in batches) / (time.perf_counter() - start)
    del data_loader
    gc.collect()
    # as fit() does: the training loader's workers start before the network exists
    train_loader = loader()
    start_workers(train_loader)
    torch.manual_seed(0)
    # the preset's network and trainable part (cpu: last 4 trunk blocks), the same start for both methods
    model, _ = build_network(cfg, "nima", str(root), None, None)
    optimizer, _ = make_optimizer(model, cfg, cfg.schedule(method))
    loss_fn = make_loss_fn(cfg, method)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    cpu = torch.device("cpu")
    # warm-up step so one-time costs (allocator, oneDNN kernels) are not timed
    train_one_epoch(model, loss_fn, optimizer, ReplayLoader(batches[:1]), cpu, 0, scaler=scaler, desc="warm-up")
    before = cpu_seconds()
    in_memory = train_one_epoch(model, loss_fn, optimizer, ReplayLoader(batches), cpu, 0, scaler=scaler,
                                desc=f"{method} in-memory")
    middle = cpu_seconds()
    end_to_end = train_one_epoch(model, loss_fn, optimizer, train_loader, cpu, 1, scaler=scaler,
                                 desc=f"{method} end-to-end")
    del train_loader  # shuts the persistent workers down: reaped, their CPU enters RUSAGE_CHILDREN
    gc.collect()
    after = cpu_seconds()
    return {
        "method": method, "workers": workers,
        "images": end_to_end["n"],
        "patches_per_image": cfg.n_patches if method == "mpemd" else 1,
        "end_to_end_img_s": end_to_end["samples_per_s"],
        "in_memory_img_s": in_memory["samples_per_s"],
        "data_only_img_s": data_only,
        "ratio": end_to_end["samples_per_s"] / in_memory["samples_per_s"],
        "in_memory_cpu_s": sum(middle) - sum(before),
        "end_to_end_cpu_s": sum(after) - sum(middle),
        "end_to_end_user_s": after[0] - middle[0],
        "end_to_end_sys_s": after[1] - middle[1],
        "sys_share": (after[1] - middle[1]) / max(after[0] - middle[0], 1e-9),
        "in_memory_sys_share": (middle[1] - before[1]) / max(middle[0] - before[0], 1e-9),
    }


def cpu_seconds() -> tuple[float, float]:
    """(user, sys) CPU seconds of this process and its reaped children (loader workers once shut down)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + kids.ru_utime, me.ru_stime + kids.ru_stime


def print_ratio(rows: list[dict]) -> None:
    """MPEMD / NIMA cost of an epoch per image: wall and CPU, end to end and in memory (one worker count)."""
    nima, mpemd = rows
    images = {r["method"]: r["images"] for r in rows}
    wall_e2e = nima["end_to_end_img_s"] / mpemd["end_to_end_img_s"]
    wall_mem = nima["in_memory_img_s"] / mpemd["in_memory_img_s"]
    cpu_e2e = (mpemd["end_to_end_cpu_s"] / images["mpemd"]) / (nima["end_to_end_cpu_s"] / images["nima"])
    cpu_mem = (mpemd["in_memory_cpu_s"] / images["mpemd"]) / (nima["in_memory_cpu_s"] / images["nima"])
    print(f"\nMPEMD / NIMA epoch cost per image, {nima['workers']} loader workers (forward work "
          f"{mpemd['patches_per_image']}x): end to end {wall_e2e:.2f}x wall, {cpu_e2e:.2f}x CPU; "
          f"in memory {wall_mem:.2f}x wall, {cpu_mem:.2f}x CPU")


def print_sys_shares(rows: list[dict]) -> None:
    """Each end-to-end epoch's sys CPU as a share of its user CPU, workers included (goal < 10%)."""
    print()
    for r in rows:
        share = r["sys_share"]
        print(f"{r['method']}, {r['workers']} workers: end-to-end sys {r['end_to_end_sys_s']:.2f} s = {share:.1%} of "
              f"user {r['end_to_end_user_s']:.2f} s (loader workers included; "
              f"{'met' if share < 0.1 else 'NOT met'}: goal < 10%); in memory {r['in_memory_sys_share']:.1%}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu-smoke")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--short-side", type=int, nargs=2, default=(320, 480),
                        help="range of the synthetic JPEGs' shorter side (AVA is mostly 500-800 on the long side)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0], help="loader worker counts to measure")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 0 = torch's default (one per core, as training runs)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--full-run", action="store_true", help="also time a whole fit() of the preset (nima)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    overrides = dict(item.split("=", 1) for item in args.overrides)
    cfg = resolve_config(args.preset, overrides)
    print(f"preset {args.preset}: {cfg.backbone} weights={cfg.weights} input "
          f"{backbone_config(cfg.backbone, cfg.image_size).input_size}, batch {cfg.batch_size}, |P|={cfg.n_patches}; "
          f"{args.images} JPEGs, short side {args.short_side}, {torch.get_num_threads()} threads, loader workers "
          f"{args.workers}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        write_toy_dataset(root, n_train=args.images, n_val=max(8, args.images // 10),
                          short_side=tuple(args.short_side))
        print(f"synthesised in {time.perf_counter() - start:.1f}s")
        rows = [measure(method, root, args.preset, workers, overrides)
                for workers in args.workers for method in ("nima", "mpemd")]
        print("\n" + markdown.table(
            ["method", "workers", "images", "patches/img", "end-to-end img/s", "in-memory img/s", "data-only img/s",
             "ratio", "e2e user s", "e2e sys s", "sys/user"],
            [[r["method"], r["workers"], r["images"], r["patches_per_image"], f"{r['end_to_end_img_s']:.1f}",
              f"{r['in_memory_img_s']:.1f}", f"{r['data_only_img_s']:.1f}", f"{r['ratio']:.2f}",
              f"{r['end_to_end_user_s']:.2f}", f"{r['end_to_end_sys_s']:.2f}", f"{r['sys_share']:.1%}"]
             for r in rows]))
        for i in range(0, len(rows), 2):
            print_ratio(rows[i:i + 2])
        print_sys_shares(rows)
        if args.full_run:
            full_run(args.preset, overrides, args.workers[0], root)
    return 0


def full_run(preset: str, overrides: dict, workers: int, root: Path) -> None:
    cfg = resolve_config(preset, {**overrides, "num_workers": workers})
    start = time.perf_counter()
    result = fit(cfg, root=str(root), method="nima", run_id="bench-nima")
    nima_s = time.perf_counter() - start
    start = time.perf_counter()
    fit(cfg, root=str(root), method="mpemd", run_id="bench-mpemd", init="bench-nima")
    mpemd_s = time.perf_counter() - start
    print(f"\nfull {preset} fit, {cfg.epochs} + {cfg.mpemd_epochs} epochs, {workers} workers: nima {nima_s:.1f}s "
          f"(val emd2 {result.final_val['emd2']:.4f}), mpemd {mpemd_s:.1f}s")


if __name__ == "__main__":
    raise SystemExit(main())
