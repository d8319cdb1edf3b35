"""Load: score N small synthetic images in ONE score-bucket run; print images/s, peak memory and whether
rows written == images listed. Measures the pipeline (listing, decode, batching, Parquet commits,
incremental state), not the model: mobilenet_v3_small at a small input size, few patches.

    .venv/bin/python -m benchmarks.bench_load                       # 50,000 images, through the flow
    .venv/bin/python -m benchmarks.bench_load --images 2000 --plain # quick, without Prefect
"""

from __future__ import annotations

import argparse
import io
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from model.checkpoint import save_checkpoint
from model.networks import build_model
from tasks.scoring.listing import list_source
from tasks.scoring.predictions import list_parts, plan_scoring, read_predictions, run_date
from tasks.scoring.scorer import config_from_checkpoint, read_checkpoint_info, score_shards


def write_images(folder: Path, n: int, size: tuple[int, int], variants: int = 256) -> float:
    """``n`` JPEGs (``variants`` distinct pictures reused), spread over folders of 1000; returns seconds."""
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    w, h = size
    blobs = []
    for _ in range(variants):
        buffer = io.BytesIO()
        base = rng.integers(0, 255, size=(h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
        Image.fromarray(base).resize((w, h)).save(buffer, "JPEG", quality=85)
        blobs.append(buffer.getvalue())
    for i in range(n):
        sub = folder / f"{i // 1000:04d}"
        if i % 1000 == 0:
            sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{i}.jpg").write_bytes(blobs[i % variants])
    return time.perf_counter() - start


def peak_rss_mib() -> float:
    # ru_maxrss is KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=50_000)
    p.add_argument("--size", default="48x32", help="image width x height")
    p.add_argument("--input-size", type=int, default=64, help="model input size")
    p.add_argument("--n-patches", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=2000)
    p.add_argument("--num-workers", type=int, default=1, help="decoding processes")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--plain", action="store_true", help="plain functions instead of the Prefect flow")
    p.add_argument("--workdir", help="keep files here (default: a temporary folder)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    w, h = (int(v) for v in args.size.split("x"))

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        src, out, ckpt = work / "bucket", str(work / "predictions"), str(work / "model.pt")
        gen_s = write_images(src, args.images, (w, h))
        torch.manual_seed(0)
        save_checkpoint(ckpt, build_model("mobilenet_v3_small", "none", input_size=args.input_size),
                        metadata={"method": "mpemd", "patch_mode": "grid", "n_patches": args.n_patches})
        print(f"generated {args.images} {w}x{h} JPEGs in {gen_s:.1f} s")

        start = time.perf_counter()
        if args.plain:
            info = read_checkpoint_info(ckpt)
            config = config_from_checkpoint(info, batch_size=args.batch_size, num_workers=args.num_workers,
                                            progress=False)
            listing = list_source(str(src))
            plan = plan_scoring(listing.objects, out, info["model_version"], config.settings, args.shard_size)
            results = list(score_shards(plan.shards, checkpoint=ckpt, out=out, date=run_date(), config=config))
            version, listed = info["model_version"], len(listing.objects)
            scored = sum(r.images for r in results)
        else:
            from flows.score_bucket import score_bucket

            summary = score_bucket(source=str(src), checkpoint=ckpt, out=out,
                                   batch_size=args.batch_size, shard_size=args.shard_size,
                                   num_workers=args.num_workers)
            version, listed, scored = summary["model_version"], summary["listed"], summary["scored"]
        seconds = time.perf_counter() - start

        table = read_predictions(out, version, latest=False)
        uris = table.column("uri").to_pylist()
        ok = sum(s == "ok" for s in table.column("status").to_pylist())
        print(f"scored {scored} of {listed} listed images in {seconds:.1f} s: {listed / seconds:.0f} images/s "
              f"({'plain functions' if args.plain else 'score-bucket flow'}, {args.num_workers} decode workers, "
              f"{args.threads} torch threads, input {args.input_size}, |P|={args.n_patches})")
        print(f"rows written {len(uris)} (distinct URIs {len(set(uris))}, ok {ok}) in "
              f"{len(list_parts(out, version))} parts; rows == listed: {len(uris) == len(set(uris)) == listed}")
        print(f"peak memory: this process {peak_rss_mib():.0f} MiB, decode workers "
              f"{resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024:.0f} MiB (largest)")
        return 0 if len(uris) == len(set(uris)) == listed else 1


if __name__ == "__main__":
    raise SystemExit(main())
