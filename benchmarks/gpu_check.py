"""One call on a lent GPU: is the CUDA path right, how fast is it, what would the paper cost.

    python benchmarks/gpu_check.py [--out gpu.json]     # on the GPU machine: under 8 minutes on one H200
    python benchmarks/gpu_check.py --dry-run            # anywhere: CPU, tiny sizes, every step (CI runs it)

It imports ``model/`` and ``tasks/`` only (the GPU machine has no Prefect, DuckDB or s3fs) and prints
ONE table, a row per figure, in this order:

1. parity: one batch's forward and loss on the CPU (fp32) vs the device (fp32, bf16 autocast),
   NIMA and MPEMD (|P| views per image);
2. peak: the fp32 and bf16 matmul rate measured here (the unit of the share-of-peak column);
3. forward: Inception-V3 images/s of NIMA and MPEMD |P| = 8 at batch 64..512 images (bf16,
   channels_last), then bf16 and channels_last on/off and torch.compile on/off at one batch;
4. scoring: the real scoring path (``tasks.scoring.scorer.score_images``) over synthetic AVA-sized JPEGs,
   decoded by CPU workers vs ``decode="gpu"`` (batched nvJPEG), against the model-only rate;
5. training: steps/s and images/s of NIMA and MPEMD on in-memory batches and through the loader;
6. projection: GPU-hours of the paper schedule (``tasks.training.presets`` "paper") on AVA's 255,530 images;
7. fit: stage 1 -> stage 2 -> resume on the device (checkpoints, metrics, resume state).

A failing step is a FAIL row (the rest still runs); the exit status is 1 if any step failed.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a plain script from anywhere

from benchmarks.replay import ReplayLoader
from benchmarks.toy_data import write_toy_dataset
from model.losses import mpemd_loss, nima_loss
from model.networks import backbone_config, build_model
from model.preprocess import PatchSettings
from tasks.core import markdown
from tasks.ingest.settings import DEFAULT_FRACTIONS
from tasks.scoring.listing import list_source
from tasks.scoring.scorer import ScoringConfig, score_images
from tasks.training.datasets import (
    Batch,
    ManifestDataset,
    make_loader,
    read_manifest,
)
from tasks.training.loop import autocast_dtype, fit, train_one_epoch
from tasks.training.presets import resolve_config

BAD_IMPORTS = ("prefect", "duckdb", "s3fs")
AVA_IMAGES = 255_530


@dataclass(frozen=True)
class Sizes:
    """Everything that differs between the GPU run and the CPU dry run."""

    backbone: str
    image_size: int | None  # None: the backbone's own (299 for Inception-V3)
    patches: int
    batches: tuple[int, ...]  # images per forward for the batch sweep
    grid_batch: int  # images per forward for the on/off rows
    jpegs: int
    short_side: tuple[int, int]
    train_batch: dict[str, int]
    seconds: float  # per timed loop
    workers: int
    compile: bool


GPU = Sizes("inception_v3", None, 8, (64, 128, 256, 512), 128, 512, (333, 500),
            {"nima": 64, "mpemd": 16}, 2.0, max(1, min(12, (os.cpu_count() or 4) - 2)), True)
DRY = Sizes("mobilenet_v3_small", 64, 2, (2, 4), 2, 8, (70, 90), {"nima": 4, "mpemd": 2}, 0.2, 0, False)


class Table:
    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.failed: list[str] = []

    def add(self, section: str, what: str, value: Any, unit: str = "", note: str = "") -> None:
        self.rows.append({"section": section, "what": what, "value": value, "unit": unit, "note": note})
        print(f"  {section:<10} {what:<52} {value!s:>10} {unit:<10} {note}", flush=True)

    def step(self, name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        try:
            out = fn()
            print(f"[ ok ] {name} ({time.perf_counter() - start:.1f}s)", flush=True)
            return out
        except Exception as exc:
            self.failed.append(name)
            self.add("FAIL", name, "-", note=f"{type(exc).__name__}: {exc}"[:200])
            traceback.print_exc(limit=4)
            return None

    def markdown(self) -> str:
        columns = ["section", "what", "value", "unit", "note"]
        return markdown.table(columns, [[str(r[c]) for c in columns] for r in self.rows])


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, seconds: float) -> float:
    """Calls per second of ``fn`` over about ``seconds`` (after two warm-up calls)."""
    fn(), fn()
    sync(device)
    start, n = time.perf_counter(), 0
    while n < 2 or time.perf_counter() - start < seconds:
        fn()
        n += 1
    sync(device)
    return n / (time.perf_counter() - start)


def loss_for(method: str) -> Callable:
    if method == "nima":
        return nima_loss
    return lambda p, t, reduction="mean": mpemd_loss(p, t, reduction=reduction)


def forward_flops(net: torch.nn.Module, size: int) -> float:
    """FLOPs of one view's forward pass (2 per multiply-add), counted on the CPU."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        net.to("cpu").eval()(torch.zeros(1, 3, size, size))
    return float(counter.get_total_flops())


def matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float, n: int) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return timed(lambda: a @ b, device, seconds) * 2 * n**3


def parity(table: Table, device: torch.device, sizes: Sizes, size: int) -> None:
    """One batch on the CPU (fp32) and on the device: the same probabilities and loss, to tolerance."""
    torch.manual_seed(0)
    net = build_model(sizes.backbone, "none").eval()
    views = torch.rand(2 * sizes.patches, 3, size, size)
    target = torch.softmax(torch.randn(2, 10), -1)
    with torch.inference_mode():
        ref = net(views)
        for method, probs_of in (("nima", lambda p: p[:2]), ("mpemd", lambda p: p.view(2, sizes.patches, 10))):
            ref_loss = loss_for(method)(probs_of(ref), target)
            for amp in ("none", "bf16"):
                dtype = autocast_dtype(amp, device) if device.type == "cuda" else None
                dev = net.to(device)
                with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    out = dev(views.to(device)).float().cpu()
                loss = loss_for(method)(probs_of(out), target)
                net.to("cpu")
                table.add("parity", f"{method} max |prob cpu - {device.type}| ({amp})",
                          f"{(out - ref).abs().max().item():.1e}", "", f"|loss diff| {abs(loss - ref_loss).item():.1e}")


def forward_rows(table: Table, device: torch.device, sizes: Sizes, size: int, peak: dict[str, float]) -> dict:
    net = build_model(sizes.backbone, "none")
    gflop = forward_flops(net, size) / 1e9
    table.add("forward", f"{sizes.backbone} {size}px, one view", f"{gflop:.2f}", "GFLOP")
    net = net.to(device).eval()
    rates: dict[tuple, float] = {}

    def rate(images: int, views_per_image: int, amp: str, channels_last: bool, model: Any = None) -> float:
        n = images * views_per_image
        x = torch.randint(0, 255, (n, 3, size, size), dtype=torch.uint8, device=device).float().div_(255)
        net.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        dtype = autocast_dtype(amp, device) if amp != "none" else None
        forward = model or net

        def call() -> None:
            with torch.inference_mode(), torch.autocast(device.type, dtype=dtype or torch.float32,
                                                        enabled=dtype is not None):
                forward(x)

        images_s = timed(call, device, sizes.seconds) * images
        share = images_s * views_per_image * gflop * 1e9 / peak["bf16" if dtype else "fp32"]
        method = "nima" if views_per_image == 1 else f"mpemd |P|={views_per_image}"
        table.add("forward", f"{method}, batch {images} images, {amp}, channels_last {'on' if channels_last else 'off'}",
                  f"{images_s:.0f}", "images/s", f"{share:.0%} of {'bf16' if dtype else 'fp32'} peak")
        return images_s

    amp = "bf16" if device.type == "cuda" else "none"
    for views in (1, sizes.patches):
        for images in sizes.batches:
            rates[(views, images)] = table.step(f"forward {views} views x {images}",
                                                lambda v=views, i=images: rate(i, v, amp, device.type == "cuda"))
    for a, cl in (("none", False), ("none", True), ("bf16", False), ("bf16", True)):
        if device.type == "cuda" or a == "none":
            table.step(f"forward on/off {a} {cl}", lambda a=a, cl=cl: rate(sizes.grid_batch, 1, a, cl))
    if sizes.compile:
        def compiled() -> None:
            start = time.perf_counter()
            model = torch.compile(net, dynamic=False)
            rate(sizes.grid_batch, 1, amp, device.type == "cuda", model)  # includes the compile
            table.add("forward", "torch.compile: first call + timing", f"{time.perf_counter() - start:.0f}", "s")
            rate(sizes.grid_batch, 1, amp, device.type == "cuda", model)
        table.step("torch.compile on", compiled)
    return rates


def scoring_rows(table: Table, device: torch.device, sizes: Sizes, root: Path, size: int) -> None:
    """The real scoring path over JPEG files: CPU workers decode vs the device decodes."""
    objects = list_source(str(root / "images")).objects
    torch.manual_seed(0)
    net = build_model(sizes.backbone, "none", input_size=sizes.image_size)
    net = net.to(device).eval()
    for method, views in (("nima", 1), ("mpemd", sizes.patches)):
        batch = max(sizes.batches[0], 1)
        rows = {}
        for decode in ("cpu", "gpu"):
            config = ScoringConfig(method=method, patches=PatchSettings(views, "grid"), batch_size=batch,
                                   num_workers=sizes.workers, device=str(device), decode=decode, progress=False,
                                   channels_last=device.type == "cuda")

            def run(config: ScoringConfig = config) -> list[dict]:
                start = time.perf_counter()
                out = list(score_images(objects, net, config))
                return [out, len(objects) / (time.perf_counter() - start)]

            got = table.step(f"score {method} decode={decode}", run)
            if got:
                rows[decode] = got[0]
                ok = sum(r["status"] == "ok" for r in got[0])
                table.add("scoring", f"{method} from {len(objects)} JPEGs, batch {batch}, decode={decode}",
                          f"{got[1]:.0f}", "images/s", f"{ok} ok rows, {sizes.workers} workers")
        if len(rows) == 2:
            diff = max((abs(a["score"] - b["score"]) for a, b in zip(rows["cpu"], rows["gpu"], strict=True)
                        if a["status"] == b["status"] == "ok"), default=0.0)
            same = [a["status"] for a in rows["cpu"]] == [b["status"] for b in rows["gpu"]]
            table.add("scoring", f"{method} decode cpu vs gpu: same rows, max |score diff|", f"{diff:.1e}", "",
                      "same statuses" if same else "STATUSES DIFFER")


def training_rows(table: Table, device: torch.device, sizes: Sizes, root: Path, size: int) -> dict[str, float]:
    geometry = backbone_config(sizes.backbone, sizes.image_size)
    records = read_manifest(str(root / "manifests" / "train.parquet"))
    rates = {}
    for method in ("nima", "mpemd"):
        dataset = ManifestDataset(records, geometry, method, train=True, n_patches=sizes.patches)
        loader = make_loader(dataset, batch_size=sizes.train_batch[method], shuffle=True, seed=0,
                             num_workers=sizes.workers, pin_memory=device.type == "cuda", drop_last=True)
        loader.sampler.set_epoch(0)
        host = list(loader)[:8]
        batches = [Batch(b.images.to(device), b.targets.to(device), b.indices, config=b.config) for b in host]

        def run(method: str = method, loader: Any = loader, batches: list[Batch] = batches) -> None:
            torch.manual_seed(0)
            net = build_model(sizes.backbone, "none", input_size=sizes.image_size)
            net = net.to(device)
            channels_last = device.type == "cuda"
            if channels_last:
                net.to(memory_format=torch.channels_last)
            dtype = autocast_dtype("auto", device)
            optimizer = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
            kwargs = {"scaler": torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
                      "amp_dtype": dtype, "channels_last": channels_last}
            before = net.head[1].weight.detach().clone()
            train_one_epoch(net, loss_for(method), optimizer, ReplayLoader(batches[:2]), device, 0, desc="warm-up",
                            **kwargs)
            assert not torch.equal(before, net.head[1].weight.detach()), "weights did not move"
            sync(device)
            repeats = max(1, int(sizes.seconds * 2))
            start = time.perf_counter()
            mem = train_one_epoch(net, loss_for(method), optimizer, ReplayLoader(batches, repeats), device, 1,
                                  desc="in-memory", **kwargs)
            sync(device)
            seconds = time.perf_counter() - start
            assert mem["loss"] == mem["loss"], "loss is NaN"
            steps = len(batches) * repeats / seconds
            rates[method] = mem["n"] / seconds
            table.add("training", f"{method} in memory, batch {sizes.train_batch[method]} images",
                      f"{steps:.2f}", "steps/s", f"{rates[method]:.0f} images/s")
            e2e = train_one_epoch(net, loss_for(method), optimizer, loader, device, 2, desc="end-to-end", **kwargs)
            table.add("training", f"{method} through the loader ({sizes.workers} workers)",
                      f"{e2e['samples_per_s']:.0f}", "images/s", f"{e2e['samples_per_s'] / rates[method]:.2f} of in-memory")

        table.step(f"train {method}", run)
    return rates


def projection(table: Table, train_rates: dict[str, float], score_rates: dict) -> None:
    """GPU-hours of the paper's schedule at the measured rates (one device)."""
    cfg = resolve_config("paper", {})
    if not {"nima", "mpemd"} <= set(train_rates):
        table.add("projection", "paper schedule", "-", "", "needs both training rates")
        return
    n_train, n_val, n_test = (int(AVA_IMAGES * f) for f in DEFAULT_FRACTIONS)
    nima_eval = score_rates.get("nima") or train_rates["nima"] * 3
    mpemd_eval = score_rates.get("mpemd") or train_rates["mpemd"] * 3
    seconds = (cfg.epochs * (n_train / train_rates["nima"] + n_val / nima_eval)
               + cfg.mpemd_epochs * (n_train / train_rates["mpemd"] + n_val / mpemd_eval)
               + n_test / nima_eval + n_test / mpemd_eval)
    table.add("projection", f"paper: {cfg.epochs} NIMA + {cfg.mpemd_epochs} MPEMD epochs on {n_train:,} images",
              f"{seconds / 3600:.2f}", "GPU-hours", f"val each epoch, test scored; goal < 6 h: "
              f"{'met' if seconds < 6 * 3600 else 'NOT met'}")


def fit_check(device: torch.device, sizes: Sizes, root: Path) -> None:
    common = {"epochs": 2, "batch_size": sizes.train_batch["mpemd"], "num_workers": sizes.workers,
              "n_patches": sizes.patches, "device": device.type, "amp": "auto" if device.type == "cuda" else "none",
              "image_size": 64}
    cfg = resolve_config("cpu-smoke", {**common, "lr": 1e-3})
    nima = fit(cfg, root=str(root), method="nima", run_id="gpu-nima", command="gpu_check")
    mpemd = fit(resolve_config("cpu-smoke", {**common, "mpemd_epochs": 1}), root=str(root), method="mpemd",
                run_id="gpu-mpemd", init="gpu-nima", command="gpu_check")
    again = fit(cfg, root=str(root), method="nima", run_id="gpu-nima", command="gpu_check")  # resumes: done
    assert again.epochs_run == 2 and again.model_version == nima.model_version
    assert mpemd.init["model_version"] == nima.model_version
    assert nima.final_train["skipped"] == 1, "the corrupt JPEG was not skipped and counted"
    for name in ("checkpoint-best.pt", "checkpoint-last.pt", "metrics.parquet", "config.json"):
        assert (root / "runs" / "gpu-mpemd" / name).is_file(), name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", "--quick", dest="dry_run", action="store_true",
                        help="tiny sizes on the CPU: every step runs, figures mean nothing (CI)")
    parser.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile row")
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    leaked = [m for m in BAD_IMPORTS if sys.modules.get(m) is not None]
    device = torch.device(args.device or ("cpu" if args.dry_run or not torch.cuda.is_available() else "cuda"))
    if device.type != "cuda" and not args.dry_run:
        print("no CUDA device: run with --dry-run for the CPU mode", file=sys.stderr)
        return 2
    sizes = DRY if args.dry_run else GPU
    if args.no_compile:
        sizes = Sizes(**{**sizes.__dict__, "compile": False})
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, CPUs {os.cpu_count()}")
    else:
        torch.set_num_threads(min(2, torch.get_num_threads()))
        print(f"CPU dry run, torch {torch.__version__}")
    table = Table()
    table.add("imports", "prefect / duckdb / s3fs imported", "no" if not leaked else ",".join(leaked))
    if leaked:
        table.failed.append("imports")
    t0 = time.perf_counter()
    size = sizes.image_size or backbone_config(sizes.backbone).input_size
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        table.step(f"synthesise {sizes.jpegs} JPEGs", lambda: write_toy_dataset(
            root, n_train=sizes.jpegs, n_val=max(8, sizes.jpegs // 16), short_side=sizes.short_side,
            corrupt_ids=(1,)))
        table.step("parity cpu vs device", lambda: parity(table, device, sizes, size))
        peak = {"fp32": matmul_peak(device, torch.float32, sizes.seconds, 4096 if device.type == "cuda" else 256)}
        peak["bf16"] = (matmul_peak(device, torch.bfloat16, sizes.seconds, 8192) if device.type == "cuda"
                        else peak["fp32"])
        for name, value in peak.items():
            table.add("peak", f"matmul {name}", f"{value / 1e9:.0f}", "GFLOP/s")
        forward = table.step("forward sweep", lambda: forward_rows(table, device, sizes, size, peak)) or {}
        table.step("scoring path", lambda: scoring_rows(table, device, sizes, root, size))
        train = table.step("training", lambda: training_rows(table, device, sizes, root, size)) or {}
        score = {"nima": forward.get((1, sizes.batches[-1])), "mpemd": forward.get((sizes.patches, sizes.batches[-1]))}
        projection(table, train, score)
        table.step("fit: stage 1 -> stage 2 -> resume", lambda: fit_check(device, sizes, root))
    total = time.perf_counter() - t0
    table.add("total", "wall time of this check", f"{total:.0f}", "s", "goal < 480 s on the GPU")
    print("\n" + table.markdown())
    print(f"\n{'FAILED: ' + ', '.join(table.failed) if table.failed else 'all steps passed'} in {total:.0f}s")
    if args.out:
        Path(args.out).write_text(json.dumps({"device": str(device), "rows": table.rows, "failed": table.failed},
                                             indent=2, default=str))
    return 1 if table.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
