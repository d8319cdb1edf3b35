"""One-call check of the CUDA training paths, with throughput figures, for a lent GPU machine.

The GPU machine has torch, torchvision, pandas, pyarrow, pillow and fsspec but no Prefect, DuckDB,
s3fs (maybe no matplotlib or tqdm): this script imports ``model/`` and ``tasks/`` only. It

1. synthesises a few hundred AVA-sized JPEGs and manifests (``tasks.toy_data``);
2. for inception_v3 and mobilenet_v3_small (weights none), NIMA and MPEMD, AMP bf16 and fp16 (with
   a GradScaler): checks training steps (finite loss, weights move, channels_last, the scaler),
   and measures training images/s end to end (fsspec -> decode -> augment -> step, DataLoader
   workers, pinned memory) and on in-memory tensors already on the GPU, and scoring images/s with
   each stage's prediction protocol;
3. optionally ``torch.compile`` (mobilenet, bf16): compile time and steady rate;
4. runs ``fit`` end to end on CUDA (stage 1 then stage 2 from it): checkpoints, metrics, resume state.

Under 5 minutes on an H200. ``--quick`` is the reduced CPU mode used to verify the script here:

    python benchmarks/gpu_check.py                 # on the GPU machine
    python benchmarks/gpu_check.py --quick         # anywhere, CPU, under a minute (compile off)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a plain script from anywhere

from model.losses import mpemd_loss, nima_loss
from model.networks import build_model
from tasks.datasets import Batch, ManifestDataset, ReplayLoader, input_config, make_loader, read_manifest
from tasks.presets import resolve_config
from tasks.toy_data import write_toy_dataset
from tasks.training import autocast_dtype, evaluate, fit, train_one_epoch

BAD_IMPORTS = ("prefect", "duckdb", "s3fs")


class Report:
    def __init__(self) -> None:
        self.checks: list[dict[str, Any]] = []
        self.figures: list[dict[str, Any]] = []

    def check(self, name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        try:
            out = fn()
            self.checks.append({"check": name, "ok": True, "seconds": round(time.perf_counter() - start, 2)})
            print(f"[ ok ] {name} ({time.perf_counter() - start:.1f}s)", flush=True)
            return out
        except Exception as exc:
            self.checks.append({"check": name, "ok": False, "error": f"{type(exc).__name__}: {exc}"})
            print(f"[FAIL] {name}: {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc(limit=4)
            return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loss_for(method: str) -> Callable:
    return nima_loss if method == "nima" else (lambda p, t: mpemd_loss(p, t))


def train_check(report: Report, device: torch.device, backbone: str, method: str, amp: str, geometry: Any,
                loader: Any, gpu_batches: list[Batch], seconds: float, compile_model: bool = False) -> None:
    name = f"train {backbone} {method} amp={amp}{' compile' if compile_model else ''}"

    def run() -> None:
        torch.manual_seed(0)
        net = build_model(backbone, "none")
        net.config = geometry
        net.to(device)
        channels_last = device.type == "cuda"
        if channels_last:
            net.to(memory_format=torch.channels_last)
            conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
            assert conv.weight.is_contiguous(memory_format=torch.channels_last), "weights not channels_last"
        dtype = autocast_dtype(amp, device)
        scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
        model: torch.nn.Module = torch.compile(net) if compile_model else net
        optimizer = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
        before = net.head[1].weight.detach().clone()
        kwargs = {"scaler": scaler, "amp_dtype": dtype, "channels_last": channels_last}
        start = time.perf_counter()
        warm = train_one_epoch(model, loss_for(method), optimizer, ReplayLoader(gpu_batches[:2]), device, 0,
                               desc="warm-up", **kwargs)
        sync(device)
        first_s = time.perf_counter() - start
        assert warm["loss"] == warm["loss"] and warm["loss"] < 10, f"bad loss {warm['loss']}"
        assert not torch.equal(before, net.head[1].weight.detach()), "weights did not move"
        if dtype == torch.float16:
            assert scaler.is_enabled() and scaler.get_scale() > 0, "fp16 without a working GradScaler"
        # in-memory: batches already on the device, repeated for about `seconds`
        per_pass = max(warm["seconds"] / 2, 1e-3) * len(gpu_batches)
        repeats = max(1, min(50, int(seconds / per_pass)))
        start = time.perf_counter()
        mem = train_one_epoch(model, loss_for(method), optimizer, ReplayLoader(gpu_batches, repeats), device, 1,
                              desc="in-memory", **kwargs)
        sync(device)
        mem_rate = mem["n"] / (time.perf_counter() - start)
        e2e = train_one_epoch(model, loss_for(method), optimizer, loader, device, 2, desc="end-to-end", **kwargs)
        sync(device)
        # scoring uses the eager model: inference mode would make a compiled one recompile
        val = evaluate(net, loss_for(method), ReplayLoader(gpu_batches, 1), device, amp_dtype=dtype,
                       channels_last=channels_last, desc="score")
        views = 1 if method == "nima" else gpu_batches[0].images.shape[1]
        report.figures.append({
            "backbone": backbone, "method": method, "amp": amp, "compile": compile_model,
            "input": geometry.input_size, "views_per_img": views,
            "train_img_s_in_memory": round(mem_rate, 1), "train_img_s_end_to_end": round(e2e["samples_per_s"], 1),
            "ratio": round(e2e["samples_per_s"] / mem_rate, 2), "score_img_s": round(val["samples_per_s"], 1),
            "first_steps_s": round(first_s, 1),
            "max_mem_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 1) if device.type == "cuda" else 0,
        })

    report.check(name, run)


def inference_rate(report: Report, device: torch.device, backbone: str, size: int, batch: int, amp: str) -> None:
    def run() -> None:
        net = build_model(backbone, "none").to(device).eval()
        channels_last = device.type == "cuda"
        if channels_last:
            net.to(memory_format=torch.channels_last)
        x = torch.randn(batch, 3, size, size, device=device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        dtype = autocast_dtype(amp, device)
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32,
                                                    enabled=dtype is not None):
            for _ in range(2):
                net(x)
            sync(device)
            start, n = time.perf_counter(), 0
            while time.perf_counter() - start < 2.0:
                out = net(x)
                n += batch
            sync(device)
        assert torch.allclose(out.float().sum(-1), torch.ones(batch, device=device), atol=1e-3)
        report.figures.append({"backbone": backbone, "method": "forward only", "amp": amp, "input": size,
                               "views_per_img": 1, "forward_img_s": round(n / (time.perf_counter() - start), 1)})

    report.check(f"inference {backbone} {size}px batch {batch} amp={amp}", run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="CUDA training checks and throughput (or --quick on CPU)")
    parser.add_argument("--quick", action="store_true", help="reduced CPU mode: small images, mobilenet only")
    parser.add_argument("--images", type=int, default=0, help="synthetic training images (default 320, quick 24)")
    parser.add_argument("--compile", dest="compile", action="store_true", default=None)
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    leaked = [m for m in BAD_IMPORTS if sys.modules.get(m) is not None]

    cuda = torch.cuda.is_available() and not args.quick
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda and not args.quick:
        print("no CUDA device: run with --quick for the CPU mode", file=sys.stderr)
        return 2
    if cuda:
        torch.backends.cudnn.benchmark = True
        print(f"device: {torch.cuda.get_device_name(0)}, capability {torch.cuda.get_device_capability(0)}, "
              f"bf16 {torch.cuda.is_bf16_supported()}, torch {torch.__version__}, CPUs {os.cpu_count()}")
    else:
        torch.set_num_threads(1)  # the CPU box is shared; more threads only spin
        print(f"quick CPU mode, torch {torch.__version__}, {torch.get_num_threads()} threads")
    report = Report()
    def no_leaks() -> None:
        assert not leaked, f"imported: {leaked}"

    report.check("no prefect/duckdb/s3fs imported", no_leaks)

    n_images = args.images or (320 if cuda else 24)
    workers = min(12, (os.cpu_count() or 2) - 2) if cuda else 0
    backbones = [("mobilenet_v3_small", None), ("inception_v3", None)] if cuda else [("mobilenet_v3_small", 64)]
    amps = ["bf16", "fp16"] if cuda else ["none", "bf16"]
    batch_images = {"nima": 64, "mpemd": 16} if cuda else {"nima": 8, "mpemd": 4}
    n_patches = 8 if cuda else 2
    seconds = 3.0 if cuda else 0.5
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        short_side = (320, 480) if cuda else (72, 100)
        report.check(f"synthesise {n_images} JPEGs", lambda: write_toy_dataset(
            root, n_train=n_images, n_val=max(8, n_images // 4), short_side=short_side, corrupt_ids=(1,)))
        records = read_manifest(str(root / "manifests" / "train.parquet"))
        for backbone, image_size in backbones:
            geometry = input_config(backbone, image_size)
            for method in ("nima", "mpemd"):
                dataset = ManifestDataset(records, geometry, method, train=True, n_patches=n_patches)
                loader = make_loader(dataset, batch_size=batch_images[method], shuffle=True, seed=0,
                                     num_workers=workers, pin_memory=cuda, drop_last=True)
                start = time.perf_counter()
                loader.sampler.set_epoch(0)
                host_batches = list(loader)[:16]
                data_rate = sum(len(b) + len(b.skipped) for b in host_batches) / (time.perf_counter() - start)
                report.figures.append({"backbone": backbone, "method": f"{method} data only", "input":
                                       geometry.input_size, "loader_img_s": round(data_rate, 1), "workers": workers})
                gpu_batches = [Batch(b.images.to(device), b.targets.to(device), b.indices) for b in host_batches]
                for amp in amps:
                    train_check(report, device, backbone, method, amp, geometry, loader, gpu_batches, seconds)
                del gpu_batches
                if cuda:
                    torch.cuda.empty_cache()
            inference_rate(report, device, backbone, geometry.input_size, 256 if cuda else 8, amps[0])
        if args.compile if args.compile is not None else cuda:
            geometry = input_config("mobilenet_v3_small", None if cuda else 64)
            dataset = ManifestDataset(records, geometry, "nima", train=True)
            loader = make_loader(dataset, batch_size=batch_images["nima"], shuffle=True, seed=0,
                                 num_workers=workers, pin_memory=cuda, drop_last=True)
            loader.sampler.set_epoch(0)
            gpu_batches = [Batch(b.images.to(device), b.targets.to(device), b.indices) for b in list(loader)[:8]]
            train_check(report, device, "mobilenet_v3_small", "nima", amps[-1], geometry, loader, gpu_batches,
                        seconds, compile_model=True)

        def stages() -> dict:
            common = {"epochs": 2, "batch_size": batch_images["mpemd"], "num_workers": workers,
                      "n_patches": n_patches, "device": "cuda" if cuda else "cpu", "amp": "auto" if cuda else "none"}
            if not cuda:
                common["image_size"] = 64
            cfg = resolve_config("cpu-smoke", {**common, "lr": 1e-3})
            nima = fit(cfg, root=str(root), method="nima", run_id="gpu-nima", command="gpu_check")
            mpemd = fit(resolve_config("cpu-smoke", {**common, "epochs": 1}), root=str(root), method="mpemd",
                        run_id="gpu-mpemd", init="gpu-nima", command="gpu_check")
            again = fit(cfg, root=str(root), method="nima", run_id="gpu-nima", command="gpu_check")  # resumes: done
            assert again["epochs_run"] == 2 and again["model_version"] == nima["model_version"]
            assert mpemd["init"]["model_version"] == nima["model_version"]
            assert nima["final_train"]["skipped"] == 1, "the corrupt JPEG was not skipped and counted"
            for name in ("checkpoint-best.pt", "checkpoint-last.pt", "metrics.parquet", "config.json"):
                assert (root / "runs" / "gpu-mpemd" / name).is_file(), name
            return {"nima_val": nima["final_val"], "mpemd_val": mpemd["final_val"]}

        stage_result = report.check("fit: stage 1 -> stage 2 -> resume (mobilenet_v3_small, amp auto)", stages)

    total = time.perf_counter() - t0
    print("\n| backbone | what | amp | input | views/img | train img/s in-memory | train img/s end-to-end "
          "| ratio | score img/s | forward img/s | loader img/s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for f in report.figures:
        what = f["method"] + (" compile" if f.get("compile") else "")
        print(f"| {f['backbone']} | {what} | {f.get('amp', '')} | {f.get('input', '')} | {f.get('views_per_img', '')} "
              f"| {f.get('train_img_s_in_memory', '')} | {f.get('train_img_s_end_to_end', '')} | {f.get('ratio', '')} "
              f"| {f.get('score_img_s', '')} | {f.get('forward_img_s', '')} | {f.get('loader_img_s', '')} |")
    failed = [c for c in report.checks if not c["ok"]]
    print(f"\n{len(report.checks) - len(failed)}/{len(report.checks)} checks passed in {total:.0f}s")
    result = {"device": str(device), "torch": torch.__version__, "seconds": round(total, 1),
              "checks": report.checks, "figures": report.figures, "fit": stage_result}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
