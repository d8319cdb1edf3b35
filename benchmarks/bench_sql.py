"""Per-bin error table over 10 million prediction rows: DuckDB (sql/errors_by_aspect_bin.sql) vs pandas.

    .venv/bin/python -m benchmarks.bench_sql [--rows 10000000] [--workdir /tmp/bench-sql] [--threads N]

Data (made once in ``--workdir``, reused while the row count matches): ``manifests/test.parquet`` with
one row per image and ``predictions/model_version=bench/date=2024-01-01/part-*.parquet`` with one
prediction per image, in the DESIGN.md layout (the list columns ``dist``/``rating_counts`` are left
out: neither side reads them). Each engine runs in its own process, so its peak RSS is its own:

- duckdb: ``tasks.sql.connect`` + ``errors_by_aspect_bin`` (views, latest row per image, join,
  bins, n/MAE/MSE/RMSE/LCC/SRCC/accuracy per bin and overall). Peak memory: the process's max RSS and
  DuckDB's own buffer memory (``duckdb_memory()``), polled every 10 ms.
- pandas: ``read_parquet`` of the same columns, the same latest-row dedupe, merge, ``pd.cut``,
  groupby aggregates, groupby average ranks for SRCC.

The two answers are compared (1e-9); the figures are printed as a table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.metrics import ASPECT_BIN_EDGES, aspect_bin_labels
from tasks.progress import Progress

VERSION = "bench"
PART_ROWS = 1_000_000
COLUMNS = ["bin", "n", "mae", "mse", "rmse", "lcc", "srcc", "accuracy"]


def generate(workdir: Path, rows: int, seed: int = 0) -> None:
    """Write the manifest and the predictions in parts of ``PART_ROWS`` (bounded memory)."""
    marker = workdir / "rows.txt"
    if marker.exists() and marker.read_text().strip() == str(rows):
        return
    rng = np.random.default_rng(seed)
    manifest_dir = workdir / "manifests"
    pred_dir = workdir / "predictions" / f"model_version={VERSION}" / "date=2024-01-01"
    manifest_dir.mkdir(parents=True, exist_ok=True)
    pred_dir.mkdir(parents=True, exist_ok=True)
    writer = None
    with Progress(rows, "bench-sql data", unit="row", disable=False) as progress:
        for part, start in enumerate(range(0, rows, PART_ROWS)):
            n = min(PART_ROWS, rows - start)
            ids = pa.array(np.arange(start, start + n, dtype=np.int64))
            uri = pc.binary_join_element_wise("s3://bench/images/", pc.cast(ids, pa.string()), ".jpg", "")
            # AVA-like ratios: peaks at 2:3 and 3:4, a tail of panoramas and portraits.
            ratio = np.where(rng.random(n) < 0.8, rng.choice([0.6667, 0.75, 1.0, 1.5], n),
                             rng.lognormal(-0.2, 0.4, n))
            true = np.clip(rng.normal(5.4, 0.75, n), 1, 10).round(3)
            pred = (true + rng.normal(0, 0.5, n) + 0.3 * np.abs(ratio - 0.67)).round(2)
            manifest = pa.table({
                "image_id": ids, "uri": uri, "split": pa.array(["test"] * n),
                "score_mean": true, "score_std": np.full(n, 1.4), "aspect_ratio": ratio,
                "width": np.full(n, 1000, np.int32), "height": (1000 * ratio).astype(np.int32),
            })
            if writer is None:
                writer = pq.ParquetWriter(manifest_dir / "test.parquet", manifest.schema, compression="zstd")
            writer.write_table(manifest)
            predictions = pa.table({
                "uri": uri, "image_id": ids, "model": pa.array(["mpemd"] * n), "patch_mode": pa.array(["grid"] * n),
                "n_patches": np.full(n, 8, np.int32), "score": pred, "score_std": np.full(n, 1.3),
                "aspect_ratio": ratio,
                "scored_at": pa.array(np.full(n, np.datetime64("2024-01-01T02:00:00", "us")), pa.timestamp("us", "UTC")),
                "status": pa.array(["ok"] * n), "error": pa.nulls(n, pa.string()),
            })
            pq.write_table(predictions, pred_dir / f"part-{part:04d}.parquet", compression="zstd")
            progress.update(n)
    writer.close()
    marker.write_text(str(rows))


def run_duckdb(workdir: Path, threads: int | None) -> dict:
    from tasks import sql

    start = time.perf_counter()
    con = sql.connect(str(workdir), threads=threads)
    monitor = con.cursor()
    peak = [0]
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            used = monitor.execute("SELECT sum(memory_usage_bytes) FROM duckdb_memory()").fetchone()[0] or 0
            peak[0] = max(peak[0], int(used))
            time.sleep(0.01)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    table = sql.run_query(con, "errors_by_aspect_bin", {"model_version": VERSION, "split": "test"})
    seconds = time.perf_counter() - start
    done.set()
    thread.join()
    return {"seconds": seconds, "duckdb_peak_mb": peak[0] / 2**20, "rows": table.to_pandas()[COLUMNS]}


def run_pandas(workdir: Path) -> dict:
    import pandas as pd

    start = time.perf_counter()
    truth = pd.read_parquet(workdir / "manifests" / "test.parquet",
                            columns=["image_id", "split", "score_mean", "aspect_ratio"])
    preds = pd.read_parquet(workdir / "predictions", columns=["image_id", "uri", "score", "status", "scored_at",
                                                              "model_version"],
                            filters=[("model_version", "=", VERSION)])
    preds = preds[preds["status"] == "ok"]
    preds = preds.sort_values("scored_at").drop_duplicates("image_id", keep="last")  # latest row per image
    df = preds.merge(truth[truth["split"] == "test"], on="image_id")[["score", "score_mean", "aspect_ratio"]]
    df["bin"] = pd.cut(df["aspect_ratio"], bins=list(ASPECT_BIN_EDGES), right=False, labels=aspect_bin_labels())
    frames = [df.dropna(subset=["bin"]).assign(bin=lambda d: d["bin"].astype(str)), df.assign(bin="all")]
    rows = []
    for frame in frames:
        frame = frame.assign(abs_err=(frame["score"] - frame["score_mean"]).abs(),
                             sq_err=(frame["score"] - frame["score_mean"]) ** 2,
                             hit=((frame["score"] > 5) == (frame["score_mean"] > 5)).astype(float))
        g = frame.groupby("bin", observed=True)
        frame["pred_rank"] = g["score"].rank(method="average")
        frame["true_rank"] = g["score_mean"].rank(method="average")
        g = frame.groupby("bin", observed=True)
        agg = g.agg(n=("score", "size"), mae=("abs_err", "mean"), mse=("sq_err", "mean"), accuracy=("hit", "mean"))
        agg["lcc"] = g[["score", "score_mean"]].corr().xs("score", level=1)["score_mean"]
        agg["srcc"] = g[["pred_rank", "true_rank"]].corr().xs("pred_rank", level=1)["true_rank"]
        rows.append(agg)
    out = pd.concat(rows).reindex([*aspect_bin_labels(), "all"]).reset_index(names="bin")
    out["n"] = out["n"].fillna(0).astype(int)
    out["rmse"] = np.sqrt(out["mse"])
    return {"seconds": time.perf_counter() - start, "rows": out[COLUMNS]}


def _child(engine: str, workdir: Path, threads: int | None, out: Path) -> None:
    result = run_duckdb(workdir, threads) if engine == "duckdb" else run_pandas(workdir)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["rows"] = result["rows"].to_dict("list")
    out.write_text(json.dumps(result, default=float))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-sql"))
    parser.add_argument("--threads", type=int, default=None, help="DuckDB threads (default: all cores)")
    parser.add_argument("--engine", choices=["duckdb", "pandas"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    workdir = args.workdir / f"rows-{args.rows}"
    if args.engine:  # one measurement, in its own process
        _child(args.engine, workdir, args.threads, args.out)
        return 0

    t0 = time.perf_counter()
    generate(workdir, args.rows)
    print(f"data: {args.rows:,} prediction rows + {args.rows:,} manifest rows in {workdir} "
          f"({sum(f.stat().st_size for f in workdir.rglob('*.parquet')) / 2**20:.0f} MB Parquet, "
          f"ready in {time.perf_counter() - t0:.0f}s); {os.cpu_count()} CPUs")
    results = {}
    for engine in ("duckdb", "pandas"):
        out = workdir / f"result-{engine}.json"
        cmd = [sys.executable, "-m", "benchmarks.bench_sql", "--rows", str(args.rows), "--workdir",
               str(args.workdir), "--engine", engine, "--out", str(out)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parents[1])
        results[engine] = json.loads(out.read_text())

    import pandas as pd

    duck, pand = (pd.DataFrame(results[e]["rows"]) for e in ("duckdb", "pandas"))
    for column in COLUMNS[1:]:
        np.testing.assert_allclose(duck[column].astype(float), pand[column].astype(float), rtol=1e-9, atol=1e-9,
                                   equal_nan=True, err_msg=column)
    print("\nper-bin table (DuckDB; pandas agrees to 1e-9):")
    print(duck.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"\n{'engine':<8} {'seconds':>8} {'peak RSS MB':>12} {'DuckDB buffer peak MB':>22}")
    for engine, r in results.items():
        buffer = f"{r['duckdb_peak_mb']:.0f}" if "duckdb_peak_mb" in r else "-"
        print(f"{engine:<8} {r['seconds']:>8.2f} {r['peak_rss_mb']:>12.0f} {buffer:>22}")
    print(f"speed-up: {results['pandas']['seconds'] / results['duckdb']['seconds']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
