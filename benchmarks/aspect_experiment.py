"""The aspect-ratio experiment behind ``docs/results.md``: the demo at several seeds, then ablations.

1. ``reproduce`` (the ``make demo`` code path) at ``--size`` for each seed: NIMA vs MPEMD per
   aspect-ratio bin and overall; mean and spread over seeds.
2. On the first seed's trained models: MPEMD prediction with ``random`` vs ``grid`` patches and
   |P| in {1, 4, 8, 16}; and stage 2 trained with MPEMD_avg instead of MPEMD_ada.

The "typical" bin is 0.6-0.8 (3:2 and 4:3 landscape photos); "unusual" pools every other bin,
"extreme" the bins below 0.6 and from 1.6 up (panoramas and tall images); ``tasks/comparison.py``. Writes Markdown to ``--out`` and prints it.

    python -m benchmarks.aspect_experiment --size small --seeds 0 1 2 --out docs/results-experiment.md
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from tasks.comparison import headline_stats


def summary_of(comparison: list[dict[str, Any]], overall: list[dict[str, Any]]) -> dict[str, Any]:
    by_model = {row["model"]: row for row in overall}
    out = headline_stats(comparison)
    for label in ("NIMA", "MPEMD"):
        for metric in ("mse", "mae", "lcc", "srcc", "accuracy"):
            out[f"{label.lower()}_{metric}"] = float(by_model[label][metric])
    return out


def mean_sd(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def run_seeds(size: str, seeds: list[int], base: Path) -> list[dict[str, Any]]:
    from flows.reproduce import demo_params, reproduce

    runs = []
    for seed in seeds:
        start = time.perf_counter()
        result = reproduce(**demo_params(size, root=str(base / f"seed{seed}"), seed=seed).model_dump())
        runs.append({"seed": seed, "seconds": time.perf_counter() - start, "comparison": result["comparison"],
                     "overall": result["overall"], "nima": result["nima"], "mpemd": result["mpemd"],
                     "summary": summary_of(result["comparison"], result["overall"])})
    return runs


def compare_sets(root: str, nima_version: str, mpemd_version: str, mode: str, n_patches: int
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    from tasks import sql
    from tasks.comparison import overall_rows

    con = sql.connect(root)
    params = {"nima_version": nima_version, "nima_model": "nima", "mpemd_version": mpemd_version,
              "mpemd_model": "mpemd", "mpemd_patch_mode": mode, "mpemd_n_patches": n_patches}
    comparison = sql.run_query(con, "compare_models", params).to_pylist()
    errors = {}
    for label, version, model, pmode, count in (("NIMA", nima_version, "nima", None, None),
                                                ("MPEMD", mpemd_version, "mpemd", mode, n_patches)):
        errors[label] = sql.run_query(con, "errors_by_aspect_bin", {
            "model_version": version, "model": model, "patch_mode": pmode, "n_patches": count}).to_pylist()
    return comparison, overall_rows(errors)


def run_ablations(first: dict[str, Any], root: str, size: str) -> dict[str, Any]:
    from flows.reproduce import demo_params
    from flows.score_bucket import score_bucket
    from flows.train_mpemd import train_mpemd
    from tasks import storage

    test = storage.join(root, "manifests", "test.parquet")
    out = storage.join(root, "predictions")
    nima_v, mpemd = first["nima"]["model_version"], first["mpemd"]
    patches = []
    for mode in ("random", "grid"):
        for count in (1, 4, 8, 16):
            score_bucket(source=test, checkpoint=mpemd["best_checkpoint"], out=out,
                         method="mpemd", patch_mode=mode, n_patches=count)
            comparison, overall = compare_sets(root, nima_v, mpemd["model_version"], mode, count)
            patches.append({"mode": mode, "n_patches": count, **summary_of(comparison, overall)})

    params = demo_params(size, root=root, seed=first["seed"])
    losses = []
    for loss in ("ada", "avg"):
        if loss == "ada":
            run = mpemd
        else:
            overrides = {**params.overrides, **params.mpemd_overrides, "loss": "avg"}
            run = train_mpemd(root=root, preset=params.preset, overrides=overrides,
                              run_id=f"{mpemd['run_id']}-avg", init=first["nima"]["run_id"])
            score_bucket(source=test, checkpoint=run["best_checkpoint"], out=out,
                         method="mpemd", patch_mode="random", n_patches=params.n_patches)
        comparison, overall = compare_sets(root, nima_v, run["model_version"], "random", params.n_patches)
        losses.append({"loss": loss, **summary_of(comparison, overall)})
    return {"patches": patches, "losses": losses}


def render(size: str, runs: list[dict[str, Any]], ablations: dict[str, Any] | None, command: str) -> str:
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, CPU"
    lines = [f"Command: `{command}`", "", f"Machine: {machine}.", ""]
    lines += ["### Per seed", "",
              "| seed | wall s | NIMA MSE | MPEMD MSE | NIMA LCC | MPEMD LCC | NIMA SRCC | MPEMD SRCC | "
              "NIMA acc | MPEMD acc | decrease typical | decrease unusual | unusual / typical | "
              "decrease extreme | extreme / typical | largest bin ratio |",
              "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
              "| ---: |"]
    for run in runs:
        s = run["summary"]
        lines.append(f"| {run['seed']} | {run['seconds']:.0f} | {s['nima_mse']:.3f} | {s['mpemd_mse']:.3f} | "
                     f"{s['nima_lcc']:.3f} | {s['mpemd_lcc']:.3f} | {s['nima_srcc']:.3f} | {s['mpemd_srcc']:.3f} | "
                     f"{s['nima_accuracy']:.3f} | {s['mpemd_accuracy']:.3f} | {s['typical_decrease']:+.3f} | "
                     f"{s['unusual_decrease']:+.3f} | {s['unusual_ratio']:.2f} | {s['extreme_decrease']:+.3f} | "
                     f"{s['extreme_ratio']:.2f} | {s['max_ratio']:.2f} ({s['max_ratio_bin']}) |")
    keys = ("nima_mse", "mpemd_mse", "nima_lcc", "mpemd_lcc", "nima_srcc", "mpemd_srcc", "typical_decrease",
            "unusual_decrease", "unusual_ratio", "extreme_decrease", "extreme_ratio", "max_ratio")
    lines += ["", "Mean ± sd over seeds: " + ", ".join(
        f"{k} {mean_sd([r['summary'][k] for r in runs])}" for k in keys) + ".", ""]
    lines += ["### MAE per bin, mean ± sd over seeds", "",
              "| bin | n (mean) | NIMA MAE | MPEMD MAE | decrease |", "| --- | ---: | ---: | ---: | ---: |"]
    for i, row in enumerate(runs[0]["comparison"]):
        per = [r["comparison"][i] for r in runs]
        if not all(p.get("n") for p in per):
            continue
        lines.append(f"| {row['bin']} | {statistics.mean(p['n'] for p in per):.0f} | "
                     f"{mean_sd([p['nima_mae'] for p in per])} | {mean_sd([p['mpemd_mae'] for p in per])} | "
                     f"{mean_sd([p['mae_decrease'] for p in per])} |")
    if ablations:
        lines += ["", f"### Patch mode and |P| at prediction (seed {runs[0]['seed']}, same trained MPEMD)", "",
                  "| mode | P | MSE | LCC | SRCC | decrease typical | decrease unusual | decrease extreme |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for row in ablations["patches"]:
            lines.append(f"| {row['mode']} | {row['n_patches']} | {row['mpemd_mse']:.3f} | {row['mpemd_lcc']:.3f} | "
                         f"{row['mpemd_srcc']:.3f} | {row['typical_decrease']:+.3f} | {row['unusual_decrease']:+.3f} | "
                         f"{row['extreme_decrease']:+.3f} |")
        lines += ["", f"NIMA on the same images: MSE {ablations['patches'][0]['nima_mse']:.3f}, "
                  f"LCC {ablations['patches'][0]['nima_lcc']:.3f}, SRCC {ablations['patches'][0]['nima_srcc']:.3f}.",
                  "", f"### Stage-2 loss: MPEMD_ada vs MPEMD_avg (seed {runs[0]['seed']}, random patches)", "",
                  "| loss | MSE | LCC | SRCC | decrease typical | decrease unusual | decrease extreme |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for row in ablations["losses"]:
            lines.append(f"| MPEMD_{row['loss']} | {row['mpemd_mse']:.3f} | {row['mpemd_lcc']:.3f} | "
                         f"{row['mpemd_srcc']:.3f} | {row['typical_decrease']:+.3f} | {row['unusual_decrease']:+.3f} | "
                         f"{row['extreme_decrease']:+.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="small")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--base", default="./data/experiment", help="one data root per seed below this")
    parser.add_argument("--no-ablations", action="store_true")
    parser.add_argument("--out", default="docs/results-experiment.md")
    args = parser.parse_args(argv)
    base = Path(args.base) / args.size
    runs = run_seeds(args.size, args.seeds, base)
    ablations = None if args.no_ablations else run_ablations(runs[0], str(base / f"seed{runs[0]['seed']}"),
                                                             args.size)
    command = "python -m benchmarks.aspect_experiment " + " ".join(argv if argv is not None else sys.argv[1:])
    text = render(args.size, runs, ablations, command.strip())
    Path(args.out).write_text(text)
    Path(args.out).with_suffix(".json").write_text(json.dumps({"runs": runs, "ablations": ablations},
                                                              indent=1, default=str))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
