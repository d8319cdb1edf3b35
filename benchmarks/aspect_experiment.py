"""The experiment behind ``docs/results.md``: the fair protocol (``reproduce``, the ``make demo`` code
path) at one demo size for several seeds, each seed's summary, and the seeds pooled.

Each seed is a separate synthetic dataset, split and training (``--fresh``). Pooled: the test images
of every seed together (ids prefixed by seed), one paired bootstrap over them, so the unusual-vs-
typical statistic is a ratio of pooled decreases, never a mean of per-seed ratios.

    python -m benchmarks.aspect_experiment --size small --seeds 0 1 2 --out docs/results-small.md
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from model.metrics import aspect_bin_labels
from tasks import comparison, sql


def run_seed(size: str, seed: int, work: str) -> dict[str, Any]:
    from flows.reproduce import demo_params, reproduce
    from flows.runtime import run_flow

    params = demo_params(size, root=f"{work}/{size}-seed{seed}", seed=seed, fresh=True)
    start = time.perf_counter()
    result = run_flow(reproduce, params)
    return {"seed": seed, "root": params.root, "n_patches": params.n_patches, "patch_modes": params.patch_modes,
            "versions": {k: r.model_version for k, r in result["runs"].items()},
            "by_bin": result["by_bin"], "overall": result["overall"], "bootstrap": result["bootstrap"],
            "markdown": result["markdown"], "seconds": result["seconds"],
            "score_seconds": {k: s.get("seconds") for k, s in result["scored"].items()},
            "wall_s": round(time.perf_counter() - start, 1)}


def pooled(runs: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """Every seed's test images in one frame, one bootstrap per protocol pair."""
    frames = []
    for run in runs:
        sets = comparison.protocol_sets(run["versions"], run["patch_modes"], run["n_patches"])
        con = sql.connect(run["root"])
        try:
            frame = comparison.scores_frame(con, sets)
        finally:
            con.close()
        frame["image_id"] = [f"{run['seed']}:{i}" for i in frame["image_id"]]
        frames.append(frame)
    frame = pd.concat(frames, ignore_index=True)
    modes = runs[0]["patch_modes"]
    names = comparison.row_names(modes)
    bins = aspect_bin_labels()
    results = comparison.bootstrap_pairs(frame, comparison.protocol_pairs(modes), bins)
    return comparison.protocol_markdown(frame, names, bins, results), comparison.bootstrap_records(results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work", default="./data/experiment", help="one data root per seed under here")
    parser.add_argument("--out", default="docs/results-small.md")
    args = parser.parse_args(argv)
    command = "python -m benchmarks.aspect_experiment " + " ".join(argv if argv is not None else sys.argv[1:])
    start = time.perf_counter()
    runs = [run_seed(args.size, seed, args.work) for seed in args.seeds]
    text, records = pooled(runs) if len(runs) > 1 else (runs[0]["markdown"], runs[0]["bootstrap"])
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    parts = [f"Command: `{command}` ({machine}; {time.perf_counter() - start:.0f} s in all)", ""]
    if len(runs) > 1:
        parts += [f"# Seeds {args.seeds} pooled ({args.size})", "", text.split("\n", 1)[1]]
    for run in runs:
        parts += [f"# Seed {run['seed']} ({args.size})", "", run["markdown"].split("\n", 1)[1],
                  "Wall time (s): " + ", ".join(f"{k} {v}" for k, v in {**run["seconds"], **{
                      f"score {k}": v for k, v in run["score_seconds"].items()}}.items())
                  + f"; whole run {run['wall_s']}", ""]
    Path(args.out).write_text("\n".join(parts))
    Path(args.out).with_suffix(".json").write_text(json.dumps(
        {"command": command, "runs": [{k: v for k, v in r.items() if k != "markdown"} for r in runs],
         "pooled_bootstrap": records}, indent=1, default=str))
    print("\n".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
