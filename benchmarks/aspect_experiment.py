"""The experiment behind ``docs/results.md``: the fair protocol (``reproduce``, the ``make demo`` code
path) at one demo size for several seeds, each seed's summary, and the seeds pooled.

Each seed is a separate synthetic dataset, split and training (``--fresh``). Pooled: the test images
of every seed together (ids prefixed by seed), one two-level paired bootstrap over them (the seeds
drawn with replacement, then each drawn seed's images), so the intervals carry the variation between
training seeds, and the unusual-vs-typical statistic is a ratio of pooled decreases, never a mean of
per-seed ratios. Beside it, the headline pair per seed. ``--collect`` recomputes every seed's summary
and the pooled one from the stored predictions with the current analysis code (no training).

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

from model.aspect_bins import aspect_bin_labels
from tasks.analysis import comparison, sql
from tasks.core import markdown


def run_seed(size: str, seed: int, work: str) -> dict[str, Any]:
    from flows.reproduce import demo_params, reproduce
    from flows.runtime import run_flow

    params = demo_params(size, root=f"{work}/{size}-seed{seed}", seed=seed, fresh=True)
    start = time.perf_counter()
    result = run_flow(reproduce, params)
    record = {"seed": seed, "root": params.root, "params": params.model_dump(), "n_patches": params.n_patches,
              "patch_modes": params.patch_modes,
              "versions": {k: r.model_version for k, r in result["runs"].items()},
              "by_bin": result["by_bin"], "overall": result["overall"], "bootstrap": result["bootstrap"],
              "markdown": result["markdown"], "seconds": result["seconds"],
              "score_seconds": {k: s.get("seconds") for k, s in result["scored"].items()},
              "wall_s": round(time.perf_counter() - start, 1)}
    Path(params.root, "experiment-seed.json").write_text(json.dumps(record, default=str))
    return record


def _logged_times(log: str, report: str) -> dict[str, float]:
    """The wall-time table ``reproduce`` printed after the summary whose report is ``report``."""
    text = Path(log).read_text() if log and Path(log).exists() else ""
    marker = f"Report: {report}"
    if marker not in text:
        return {}
    table = text.split(marker, 1)[1].split("## Wall time", 1)[1].split("\n\n", 2)[1]
    cells = [line.strip("|").split("|") for line in table.splitlines() if line.startswith("| ")]
    return {c[0].strip(): float(c[1]) for c in cells[1:] if len(c) == 2 and c[1].strip() != "---"}


PREFIXES = {"nima-equal-": "nima_equal_budget", "mpemd-ada-": "mpemd_ada", "mpemd-avg-": "mpemd_avg",
            "nima-": "nima"}


def _runs_in(root: str) -> dict[str, str]:
    """Protocol arm -> run id under ``{root}/runs`` (other runs, e.g. sweeps, are left out)."""
    found = {}
    for run_dir in sorted(Path(root, "runs").iterdir()):
        arm = next((a for prefix, a in PREFIXES.items() if run_dir.name.startswith(prefix)), None)
        if arm is not None and "-lr" not in run_dir.name:
            found[arm] = run_dir.name
    return found


def _learning_rates(root: str, run_ids: dict[str, str]) -> list[dict[str, Any]]:
    """Each arm's lr from its run's saved config (as ``flows/reproduce.arm_learning_rates`` states it)."""
    from tasks.training.presets import config_from_dict

    rows = []
    for arm, run_id in run_ids.items():
        cfg = config_from_dict(json.loads(Path(root, "runs", run_id, "config.json").read_text()))
        lr = cfg.lr if arm == "nima" else cfg.arm_lr("nima" if arm == "nima_equal_budget" else arm[-3:])
        epochs = cfg.epochs if arm == "nima" else cfg.mpemd_epochs
        rows.append({"arm": arm, "run": run_id, "lr": lr, "epochs": epochs, "chosen_by": "preset and overrides"})
    return rows


def collect_seed(size: str, seed: int, work: str, log: str = "") -> dict[str, Any] | None:
    """A finished seed's record, its summary recomputed from the stored predictions (wall times from
    its own record, or from ``log`` for a run stopped before writing one)."""
    from flows.reproduce import demo_params
    from model.checkpoint import load_checkpoint
    from tasks.core import storage
    from tasks.training.runs import run_paths

    params = demo_params(size, root=f"{work}/{size}-seed{seed}", seed=seed)
    saved_path = Path(params.root, "experiment-seed.json")
    saved = json.loads(saved_path.read_text()) if saved_path.exists() else {}
    report = f"{params.root}/reports/{params.report_name}/protocol.md"
    if not saved and not Path(report).exists():
        return None
    run_ids = _runs_in(params.root)
    versions = saved.get("versions") or {
        arm: load_checkpoint(storage.read_bytes(run_paths(params.root, run_id).best))["model_version"]
        for arm, run_id in run_ids.items()}
    sets = comparison.protocol_sets(versions, params.patch_modes, params.n_patches)
    result = comparison.run_protocol(params.root, sets, comparison.protocol_pairs(params.patch_modes),
                                     report_name=params.report_name,
                                     learning_rates=_learning_rates(params.root, run_ids))
    times = _logged_times(log, report)
    return {"seed": seed, "root": params.root, "params": params.model_dump(), "n_patches": params.n_patches,
            "patch_modes": params.patch_modes, "versions": versions, "by_bin": result.by_bin,
            "overall": result.overall, "bootstrap": result.bootstrap, "markdown": result.markdown,
            "seconds": saved.get("seconds") or {k: v for k, v in times.items()
                                                if not k.startswith("score ") and k != "total"},
            "score_seconds": saved.get("score_seconds") or {k[6:]: v for k, v in times.items()
                                                            if k.startswith("score ")},
            "wall_s": saved.get("wall_s") or times.get("total")}


def pooled(runs: list[dict[str, Any]]) -> tuple[str, list[dict[str, Any]]]:
    """Every seed's test images in one frame, one two-level bootstrap per protocol pair (seeds, then
    images), and the headline pair per seed beside it."""
    frames = []
    for run in runs:
        sets = comparison.protocol_sets(run["versions"], run["patch_modes"], run["n_patches"])
        con = sql.connect(run["root"])
        try:
            frame = comparison.scores_frame(con, sets)
        finally:
            con.close()
        frame["seed"] = run["seed"]
        frame["image_id"] = [f"{run['seed']}:{i}" for i in frame["image_id"]]
        frames.append(frame)
    frame = pd.concat(frames, ignore_index=True)
    modes = runs[0]["patch_modes"]
    names = comparison.row_names(modes)
    bins = aspect_bin_labels()
    pairs = comparison.protocol_pairs(modes)
    results = comparison.bootstrap_pairs(frame, pairs, bins, groups=frame["seed"].tolist())
    text = comparison.protocol_markdown(frame, names, bins, results)
    return text + "\n" + per_seed_table(runs, pairs[0]), comparison.bootstrap_records(results)


def per_seed_table(runs: list[dict[str, Any]], pair: comparison.Pair) -> str:
    """The headline pair in each seed alone (each seed's own images-only bootstrap)."""
    def cell(record: dict[str, Any] | None) -> str:
        if record is None:
            return "-"
        text = comparison.interval_text(comparison.Interval(record["estimate"], record["lo"], record["hi"]))
        return text + ("" if record["significant"] else " n.s.")

    rows = []
    for run in runs:
        mine = [r for r in run["bootstrap"] if (r["baseline"], r["candidate"]) == (pair.baseline, pair.candidate)]
        find = {(r["statistic"], r["bin"]): r for r in mine}
        n = find.get(("mae_decrease", "all"), {}).get("n")
        rows.append([str(run["seed"]), str(n), cell(find.get(("mae_decrease", "all"))),
                     cell(find.get(("lcc_gain", "all"))), cell(find.get(("typical", None))),
                     cell(find.get(("unusual", None))), cell(find.get(("unusual_minus_typical", None)))])
    return "\n".join([f"## Per seed: {pair.candidate} vs {pair.baseline}", "",
                      "Each seed's own paired bootstrap over its test images; \"n.s.\": not significant "
                      "(the interval includes zero).", "",
                      markdown.table(["seed", "test images", "MAE decrease", "LCC gain", "decrease, typical bin",
                                      "decrease, other bins pooled", "unusual - typical"], rows), ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work", default="./data/experiment", help="one data root per seed under here")
    parser.add_argument("--out", default="docs/results-small.md")
    parser.add_argument("--collect", action="store_true",
                        help="train nothing: gather the seeds whose runs finished under --work")
    parser.add_argument("--log", default="", help="with --collect: the log holding their wall-time tables")
    args = parser.parse_args(argv)
    command = "python -m benchmarks.aspect_experiment " + " ".join(argv if argv is not None else sys.argv[1:])
    start = time.perf_counter()
    if args.collect:
        runs = [r for r in (collect_seed(args.size, s, args.work, args.log) for s in args.seeds) if r is not None]
        if not runs:
            print(f"no finished seed under {args.work}", file=sys.stderr)
            return 1
    else:
        runs = [run_seed(args.size, seed, args.work) for seed in args.seeds]
    text, records = pooled(runs) if len(runs) > 1 else (runs[0]["markdown"], runs[0]["bootstrap"])
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    settings = {k: runs[0]["params"][k] for k in ("synth_n", "preset", "overrides", "mpemd_overrides", "n_patches")}
    parts = [f"Command: `{command}` ({machine}; {time.perf_counter() - start:.0f} s in all)", "",
             f"Settings (seed 0's; each seed changes only `seed`): `{json.dumps(settings)}`", ""]
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
