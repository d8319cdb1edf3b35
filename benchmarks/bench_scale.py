"""Cost curves: how each stage's wall, CPU, peak memory and disk grow with its work (issue 22).

    .venv/bin/python -m benchmarks.bench_scale                 # quick sizes (make bench), a few minutes
    .venv/bin/python -m benchmarks.bench_scale --full          # the sizes of docs/performance.md
    .venv/bin/python -m benchmarks.bench_scale --stages sql --sizes 1e6 3e6 1e7 [--workdir /tmp/scale-bench]
    .venv/bin/python -m benchmarks.bench_scale --stages sql --series bootstrap --sizes 1e6 3e6 1e7   # one query

Every point runs in a fresh process (the real ``mpemd`` command where there is one), measured by GNU
``/usr/bin/time``: wall, user and sys CPU, peak RSS of that process tree's largest member, and the bytes
it added under its output folder. The inputs of a point are made beforehand (not measured) in
``--workdir`` and deleted after the point (big generated data never outlives its measurement).

Stages (``benchmarks/scale_stages.py``): ``ingest`` (label lines + a mirror of hard-linked 160 px JPEGs,
``mpemd ingest --mode reference``, first run and rerun), ``noop`` (the nightly rerun of ``mpemd score``
over an already-scored bucket: a listing plus a lookup of what is scored), ``scoring`` (``mpemd score``
of tiny images with a tiny checkpoint, first run), ``ingest-s3`` and ``noop-s3`` (the same two over a
bucket of a loopback moto server, with the requests each run made: ``benchmarks/scale_s3.py``),
``compact-s3`` (``mpemd compact`` of one night's shard files in a bucket), ``state-s3`` (the plan's
lookup of what is scored, ``read_state``, over those parts; ``--s3`` runs the four S3 stages only),
``sql`` (``mpemd sql`` of four queries over a nightly history, DuckDB limited to 4 GB) and ``training`` (a ManifestDataset epoch through the DataLoader).

Writes ``--docs`` (default docs/scale/ with ``--full``; the quick run of ``make bench`` leaves the
committed figures alone and writes ``<workdir>/docs``): ``results.json``, ``results.md`` (one table per stage) and
one log-log PNG per stage (cost per item and peak RSS against items), and prints each curve's slope:
the log-log fit of wall (and CPU) against items over the points past the fixed cost (the largest
three), where 1.0 is linear.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import scale_s3, scale_stages

STAGES = {**scale_stages.STAGES, **scale_s3.STAGES}
ROOT = Path(__file__).resolve().parents[1]
POINT_KEYS = {"wall", "user", "sys", "cpu", "peak_rss_mb", "disk_mb", "items", "rss_by"}
TIME = "/usr/bin/time"  # GNU time: the child's own peak RSS (see run_point)


def folder_bytes(path: Path) -> int:
    """Bytes of the regular files under ``path`` (hard links counted once, as the disk holds them)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for dirpath, _, names in os.walk(path):
        for name in names:
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def run_point(cmd: list[str], env: dict[str, str], out: Path | None) -> dict[str, Any]:
    """Run ``cmd`` in a fresh process: wall, user, sys seconds and peak RSS (MB) from ``/usr/bin/time``,
    and the MB it added under ``out``.

    Through ``/usr/bin/time``, not this process's ``wait4``: Linux starts a child's ``ru_maxrss`` at its
    parent's RSS high-water mark when it execs (Python spawns with vfork), so a child of this process,
    which has held a point's inputs, would report at least this process's peak."""
    before = folder_bytes(out) if out and out.exists() else 0
    with tempfile.NamedTemporaryFile("r", suffix=".time") as figures:
        start = time.perf_counter()
        proc = subprocess.Popen([TIME, "-f", "%U %S %M", "-o", figures.name, *cmd], cwd=ROOT, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        stdout, stderr = proc.communicate()
        wall = time.perf_counter() - start
        if proc.returncode:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{stderr.decode()[-3000:]}")
        user, sys_s, max_kb = figures.read().split()[-3:]
    after = folder_bytes(out) if out and out.exists() else 0
    return {"wall": wall, "user": float(user), "sys": float(sys_s), "peak_rss_mb": int(max_kb) / 1024,
            "disk_mb": (after - before) / 2**20, "rss_by": "time", "stdout": stdout.decode(errors="replace")}


def slope(points: list[dict], key: str = "wall", tail: int = 3) -> float | None:
    """Least-squares slope of log(key) against log(items) over the largest ``tail`` points."""
    pts = sorted((p["items"], p[key]) for p in points if p.get(key, 0) > 0)[-tail:]
    if len(pts) < 2:
        return None
    xs, ys = [math.log(x) for x, _ in pts], [math.log(y) for _, y in pts]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else None


def plot(stage: str, series: dict[str, list[dict]], unit: str, path: Path) -> None:
    """One PNG: cost per item (wall and CPU, microseconds) and peak RSS against items, log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # one legend under both plots (a legend inside covered the curves once a stage had 8 series);
    # series named "... before (<commit>)" are drawn faint: the curve a fix replaced
    legend_height = 0.1 + 0.17 * math.ceil(len(series) / 2)  # inches: two names a row
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4 + legend_height), dpi=80)
    for name, points in series.items():
        pts = sorted(points, key=lambda p: p["items"])
        xs = [p["items"] for p in pts]
        style = {"alpha": 0.45, "linewidth": 1} if " before (" in name else {}
        (line,) = left.plot(xs, [1e6 * p["wall"] / p["items"] for p in pts], "o-", label=name, **style)
        left.plot(xs, [1e6 * (p["user"] + p["sys"]) / p["items"] for p in pts], "x--", color=line.get_color(),
                  **style)
        right.plot(xs, [p["peak_rss_mb"] for p in pts], "o-", color=line.get_color(), **style)
    for ax, title in ((left, f"cost per {unit} (us; o- wall, x-- CPU)"), (right, "peak RSS (MB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"{unit}s")
        ax.set_title(f"{stage}: {title}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    fig.legend(*left.get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, legend_height / (3.4 + legend_height), 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def table(stage: str, series: dict[str, list[dict]], unit: str) -> list[str]:
    lines = [f"### {stage}", "", f"| series | {unit}s | wall s | user s | sys s | us/{unit} wall | us/{unit} CPU "
             f"| peak RSS MB | disk MB |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, points in series.items():
        for p in sorted(points, key=lambda p: p["items"]):
            cpu = p["user"] + p["sys"]
            lines.append(f"| {name} | {p['items']:,} | {p['wall']:.2f} | {p['user']:.2f} | {p['sys']:.2f} | "
                         f"{1e6 * p['wall'] / p['items']:.1f} | {1e6 * cpu / p['items']:.1f} | "
                         f"{p['peak_rss_mb']:.0f}{'' if p.get('rss_by') == 'time' else '*'} | {p['disk_mb']:.1f} |")
    if any(p.get("rss_by") != "time" for points in series.values() for p in points):
        lines += ["", "\\* measured by the parent's `wait4` before 364c8ca: an upper bound (it includes the "
                  "benchmark process's own peak RSS, see `run_point`)"]
    lines.append("")
    for name, points in series.items():
        s_wall, s_cpu, s_rss = slope(points), slope(points, "cpu"), slope(points, "peak_rss_mb")
        lines.append(f"- {name}: log-log slope (largest 3 points) wall {_fmt(s_wall)}, CPU {_fmt(s_cpu)}, "
                     f"peak RSS {_fmt(s_rss)}; peak RSS grows {_fmt(bytes_per_item(points), '.0f')} bytes per {unit}")
    return [*lines, ""]


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def bytes_per_item(points: list[dict]) -> float | None:
    """Peak RSS added per item between the smallest and the largest point."""
    pts = sorted(points, key=lambda p: p["items"])
    if len(pts) < 2 or pts[-1]["items"] == pts[0]["items"]:
        return None
    return (pts[-1]["peak_rss_mb"] - pts[0]["peak_rss_mb"]) * 2**20 / (pts[-1]["items"] - pts[0]["items"])


def run_stage(stage: str, sizes: list[int], work: Path, env: dict[str, str],
              save: Callable[[str, dict], None], series: list[str] | None = None) -> None:
    """Every size of ``stage``: make its inputs, run its measured commands (``save`` each point; only
    the series whose name starts with one of ``series`` when given), delete the inputs."""
    for n in sizes:
        point_dir = work / f"{stage}-{n}"
        shutil.rmtree(point_dir, ignore_errors=True)
        point_dir.mkdir(parents=True)
        try:
            t0 = time.perf_counter()
            runs = STAGES[stage].prepare(point_dir, n)
            print(f"[{stage} {n:,}] inputs ready in {time.perf_counter() - t0:.0f} s", flush=True)
            for name, cmd, out, check in runs:
                if series and not name.startswith(tuple(series)):
                    continue
                point = run_point(cmd, env, out)
                point.update(items=n, cpu=point["user"] + point["sys"])
                stdout = point.pop("stdout")  # the answer: checked here, not stored
                extra = check(stdout) if check else {}
                point.update(extra or {})
                save(name, point)
                print(f"[{stage} {n:,}] {name}: wall {point['wall']:.2f} s, user {point['user']:.2f}, "
                      f"sys {point['sys']:.2f}, peak RSS {point['peak_rss_mb']:.0f} MB, "
                      f"disk {point['disk_mb']:.1f} MB {extra or ''}", flush=True)
        finally:
            shutil.rmtree(point_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="the full sizes (hours on 2 cores), not the quick ones")
    parser.add_argument("--stages", nargs="+", choices=sorted(STAGES), default=None)
    parser.add_argument("--s3", action="store_true",
                        help="the S3 stages only (ingest-s3, noop-s3, compact-s3, state-s3: a moto server on 127.0.0.1:5291-5299)")
    parser.add_argument("--sizes", nargs="+", type=float, default=None, help="override the sizes (one stage)")
    parser.add_argument("--series", nargs="+", default=None,
                        help="only the measured commands whose series name starts with one of these (e.g. bootstrap)")
    parser.add_argument("--report", action="store_true", help="only rewrite results.md and the PNGs from results.json")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/scale-bench"))
    parser.add_argument("--docs", type=Path, default=None,
                        help="where results.json/.md and the PNGs go (points merged into what is there, by "
                             "stage, series and size); default docs/scale/ with --full or --report, else <workdir>/docs")
    args = parser.parse_args(argv)
    args.docs = args.docs or (ROOT / "docs" / "scale" if args.full or args.report else args.workdir / "docs")
    stages = args.stages or sorted(scale_s3.STAGES if args.s3 else STAGES)
    env = dict(os.environ, PREFECT_API_URL="", MPEMD_DUCKDB_MEMORY="4GB", PYTHONPATH=str(ROOT))
    results_file = args.docs / "results.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {}
    args.workdir.mkdir(parents=True, exist_ok=True)
    for stage in [] if args.report else stages:
        spec = STAGES[stage]
        sizes = [int(s) for s in args.sizes] if args.sizes else (spec.full if args.full else spec.quick)
        entry = results.setdefault(stage, {"unit": spec.unit, "series": {}})
        entry.update(commit=_commit(), cpus=os.cpu_count(), full=args.full)

        def save(name: str, point: dict, entry: dict = entry) -> None:
            # each point as soon as measured, replacing an older one of the same size
            kept = [p for p in entry["series"].get(name, []) if p["items"] != point["items"]]
            entry["series"][name] = [*kept, point]
            args.docs.mkdir(parents=True, exist_ok=True)
            results_file.write_text(json.dumps(results, indent=1))

        try:
            run_stage(stage, sizes, args.workdir, env, save, args.series)
        finally:
            scale_s3.stop_server()  # the S3 stages' moto server, if one started
        for line in table(stage, entry["series"], spec.unit)[-len(entry["series"]) - 1:]:
            print(line, flush=True)
    lines = ["# Cost curves (benchmarks/bench_scale.py)", ""]
    for stage, result in sorted(results.items()):
        rows = table(stage, result["series"], result["unit"])
        lines += [*rows[:2], f"Last point at {result['commit']}, {result['cpus']} CPUs (shared), `python -m "
                  f"benchmarks.bench_scale{' --full' if result['full'] else ''}` (or its --sizes). "
                  f"![{stage}]({stage}.png)", "", *rows[2:]]
        extra = sorted({k for points in result["series"].values() for p in points for k in p} - POINT_KEYS)
        if extra:  # the figures a stage's own check returned (e.g. the training start-up)
            lines += [f"- {name} at {p['items']:,}: " + ", ".join(f"{k} {p[k]}" for k in extra if k in p)
                      for name, points in result["series"].items() for p in sorted(points, key=lambda p: p["items"])
                      if any(k in p for k in extra)]
            lines.append("")
        plot(stage, result["series"], result["unit"], args.docs / f"{stage}.png")
    (args.docs / "results.md").write_text("\n".join(lines))
    print(f"wrote {args.docs}/results.md, results.json and {len(results)} PNGs")
    return 0


def _commit() -> str:
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
