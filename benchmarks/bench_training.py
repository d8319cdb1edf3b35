"""Training throughput on this machine (CPU by default) and what the data path costs.

For NIMA and MPEMD with a preset (default ``cpu-smoke``) over synthetic JPEGs of AVA-like sizes:

- end to end: manifest -> fsspec read -> JPEG decode (draft mode) -> augment -> train step;
- pre-decoded: the same train steps over the very same input tensors held in memory;
- data only: the loader alone, no model.

The ratio end-to-end / pre-decoded says how much of the model's speed the data path keeps (1.0 =
free). ``--full-run`` also times a whole ``fit`` of the preset (the "about a minute" claim).
Last, the MPEMD / NIMA cost of an epoch per image (wall and CPU, end to end and in memory) beside the
forward work ratio |P|, and each epoch's sys CPU as a share of its user CPU (goal < 10%).

    python -m benchmarks.bench_training                       # cpu-smoke, 200 images, 1 thread
    python -m benchmarks.bench_training --workers 2 --full-run
"""

from __future__ import annotations

import argparse
import logging
import resource
import tempfile
import time
from pathlib import Path

import torch

from model.networks import build_model
from tasks import markdown
from tasks.datasets import ManifestDataset, ReplayLoader, input_config, make_loader, read_manifest
from tasks.presets import resolve_config
from tasks.toy_data import write_toy_dataset
from tasks.training import fit, make_loss_fn, train_one_epoch


def measure(method: str, root: Path, preset: str, workers: int, overrides: dict) -> dict[str, float]:
    cfg = resolve_config(preset, {**overrides, "num_workers": workers})
    geometry = input_config(cfg.backbone, cfg.image_size)
    records = read_manifest(str(root / "manifests" / "train.parquet"))
    dataset = ManifestDataset(records, geometry, method, train=True, n_patches=cfg.n_patches, seed=cfg.seed)
    loader = make_loader(dataset, batch_size=cfg.batch_size, shuffle=True, seed=0, num_workers=workers,
                         pin_memory=False, mp_context=cfg.mp_context)
    torch.manual_seed(0)
    model = build_model(cfg.backbone, cfg.weights, input_size=cfg.image_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
    loss_fn = make_loss_fn(cfg, method)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    cpu = torch.device("cpu")

    # data only (also warms the page cache and the workers)
    start = time.perf_counter()
    batches = []
    loader.sampler.set_epoch(0)
    batches = list(loader)
    data_only = sum(len(b) for b in batches) / (time.perf_counter() - start)
    # warm-up step so one-time costs (allocator, oneDNN kernels) are not timed
    train_one_epoch(model, loss_fn, optimizer, ReplayLoader(batches[:1]), cpu, 0, scaler=scaler, desc="warm-up")
    before = cpu_seconds()
    in_memory = train_one_epoch(model, loss_fn, optimizer, ReplayLoader(batches), cpu, 0, scaler=scaler,
                                desc=f"{method} in-memory")
    middle = cpu_seconds()
    end_to_end = train_one_epoch(model, loss_fn, optimizer, loader, cpu, 1, scaler=scaler,
                                 desc=f"{method} end-to-end")
    after = cpu_seconds()  # loader workers persist: their CPU is not in RUSAGE_CHILDREN until they exit
    return {
        "method": method,
        "images": end_to_end["n"],
        "patches_per_image": cfg.n_patches if method == "mpemd" else 1,
        "end_to_end_img_s": end_to_end["samples_per_s"],
        "in_memory_img_s": in_memory["samples_per_s"],
        "data_only_img_s": data_only,
        "ratio": end_to_end["samples_per_s"] / in_memory["samples_per_s"],
        "in_memory_cpu_s": sum(middle) - sum(before),
        "end_to_end_cpu_s": sum(after) - sum(middle),
        "sys_share": (after[1] - before[1]) / max(after[0] - before[0], 1e-9),
    }


def cpu_seconds() -> tuple[float, float]:
    """(user, sys) CPU seconds of this process and its reaped children."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + kids.ru_utime, me.ru_stime + kids.ru_stime


def print_ratio(rows: list[dict]) -> None:
    """MPEMD / NIMA cost of an epoch per image: wall and CPU, end to end and in memory."""
    nima, mpemd = rows
    images = {r["method"]: r["images"] for r in rows}
    wall_e2e = nima["end_to_end_img_s"] / mpemd["end_to_end_img_s"]
    wall_mem = nima["in_memory_img_s"] / mpemd["in_memory_img_s"]
    cpu_e2e = (mpemd["end_to_end_cpu_s"] / images["mpemd"]) / (nima["end_to_end_cpu_s"] / images["nima"])
    cpu_mem = (mpemd["in_memory_cpu_s"] / images["mpemd"]) / (nima["in_memory_cpu_s"] / images["nima"])
    print(f"\nMPEMD / NIMA epoch cost per image (forward work {mpemd['patches_per_image']}x): end to end "
          f"{wall_e2e:.2f}x wall, {cpu_e2e:.2f}x CPU; in memory {wall_mem:.2f}x wall, {cpu_mem:.2f}x CPU")
    for r in rows:
        share = r["sys_share"]
        print(f"{r['method']}: sys CPU = {share:.1%} of user ({'met' if share < 0.1 else 'NOT met'}: goal < 10%)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="cpu-smoke")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--short-side", type=int, nargs=2, default=(320, 480),
                        help="range of the synthetic JPEGs' shorter side (AVA is mostly 500-800 on the long side)")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (2 threads on a busy 2-core box spin and run ~10x slower)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--full-run", action="store_true", help="also time a whole fit() of the preset (nima)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    overrides = dict(item.split("=", 1) for item in args.overrides)
    cfg = resolve_config(args.preset, overrides)
    print(f"preset {args.preset}: {cfg.backbone} weights={cfg.weights} input {input_config(cfg.backbone, cfg.image_size).input_size}, "
          f"batch {cfg.batch_size}, |P|={cfg.n_patches}; {args.images} JPEGs, short side {args.short_side}, "
          f"{args.threads} threads, {args.workers} loader workers, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        write_toy_dataset(root, n_train=args.images, n_val=max(8, args.images // 10),
                          short_side=tuple(args.short_side))
        print(f"synthesised in {time.perf_counter() - start:.1f}s")
        rows = [measure(method, root, args.preset, args.workers, overrides) for method in ("nima", "mpemd")]
        print("\n" + markdown.table(
            ["method", "images", "patches/img", "end-to-end img/s", "in-memory img/s", "data-only img/s", "ratio"],
            [[r["method"], r["images"], r["patches_per_image"], f"{r['end_to_end_img_s']:.1f}",
              f"{r['in_memory_img_s']:.1f}", f"{r['data_only_img_s']:.1f}", f"{r['ratio']:.2f}"] for r in rows]))
        print_ratio(rows)
        if args.full_run:
            full_cfg = resolve_config(args.preset, {**overrides, "num_workers": args.workers})
            start = time.perf_counter()
            result = fit(full_cfg, root=str(root), method="nima", run_id="bench-nima")
            nima_s = time.perf_counter() - start
            start = time.perf_counter()
            fit(full_cfg, root=str(root), method="mpemd", run_id="bench-mpemd", init="bench-nima")
            mpemd_s = time.perf_counter() - start
            print(f"\nfull {args.preset} fit, {full_cfg.epochs} + {full_cfg.mpemd_epochs} epochs: nima {nima_s:.1f}s "
                  f"(val emd2 {result.final_val['emd2']:.4f}), mpemd {mpemd_s:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
