"""Per-bin error table over millions of prediction rows: ``mpemd sql errors_by_aspect_bin`` vs pandas.

    .venv/bin/python -m benchmarks.bench_sql [--rows 5000000] [--history 0.1] [--workdir /tmp/bench-sql]
        [--threads N] [--repeat 3] [--sql-dir DIR] [--part-rows 1000 [--full-schema]] [--compact] [--s3]

Data (made once in ``--workdir``, reused while the sizes match): ``manifests/test.parquet`` (90% test,
10% val), an empty ``manifests/rejected.parquet`` (ingest always writes one) and ``predictions/model_version=bench/date=*/part-*.parquet`` in the DESIGN.md layout, where a
``--history`` share of the rows are older rows of images scored again later (the latest must win), and
0.1% of the images have a second URI scored in the same batch (same scored_at and date: an exact tie
that only the uri settles, so an engine deduplicating by another key gives another answer); the list
columns ``dist``/``rating_counts`` are left out (neither side reads them). Every measurement is its own
process, so its peak RSS and CPU time are its own (GNU ``/usr/bin/time``):

- cli: the command a user types, ``mpemd sql errors_by_aspect_bin --format csv`` (start-up included).
- duckdb: ``tasks.analysis.sql.connect`` + ``errors_by_aspect_bin`` in one process, with DuckDB's own peak
  buffer memory (its profiler's ``peak_buffer_memory``).
- pandas: ``read_parquet`` of the columns it needs, the latest row per image by the documented key of
  ``prediction_set`` (sql/views.sql: scored_at, date, model, patch_mode, n_patches, uri) as a plain
  script does it (one sort by the whole key, ``drop_duplicates``), merge, ``pd.cut``, groupby aggregates,
  groupby average ranks for SRCC.
- pandas-tuned: the same, with the dedupe the SQL does (the latest scored_at per image; the whole key
  only where two rows share it), so the ratio against it is the one with both sides doing the same work.

Best of ``--repeat`` (interleaved, so a noisy neighbour hits every engine alike); the answers are
compared (1e-9); peak RSS comes from GNU ``/usr/bin/time`` (a child's ``wait4`` figure would include
this process's own peak, see bench_scale.run_point); the ratio pandas / cli is the figure of issue 12 (goal >= 5x), printed next to
pandas-tuned / cli. ``--part-rows 1000`` re-cuts the predictions into files of that many rows, the
layout ``mpemd score`` writes for each shard of ``shard_size`` = 1,000 images, in a sibling folder;
``--full-schema`` writes those files as ``mpemd score --no-compact`` leaves them: every column it writes
and its schema record in the version folder (bench_sql's own files leave out the columns no query here
reads, so a reader checks their footers for one schema). ``--compact`` adds what ``mpemd score`` does at the end of a run (and ``mpemd compact`` for older
outputs): each ``date=`` partition merged into one file (tasks/scoring/compaction.py), in a hard-linked copy.
``--layout independent`` lays the same rows out as a user's own writer might (every column, snappy,
~1 M-row files, history in the same ``date=`` partition: ``independent``). ``--s3`` uploads the chosen layout's data root to a loopback moto server (its own process,
``benchmarks/s3_moto.py``) and runs the same comparison over ``s3://bench-sql/data``: ``mpemd sql --root
s3://...`` (DuckDB through s3fs) against pandas ``read_parquet`` with ``storage_options``; each run's
requests to the server are counted by kind. ``--sql-dir`` runs the query files of another folder (e.g. an older ``sql/`` for a before/after figure).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.aspect_bins import ASPECT_BIN_EDGES, aspect_bin_labels
from tasks.core.progress import Progress
from tasks.scoring.layout import SCHEMA_RECORD

ROOT = Path(__file__).resolve().parents[1]
VERSION = "bench"
PART_ROWS = 1_000_000
TIE_SHARE = 0.001  # images with a second URI in the same batch (an exact tie of scored_at and date)
DATA_VERSION = "ties-2"  # bump when generate() changes: the cached data is made again
ENGINES = ("duckdb", "pandas", "pandas-tuned")  # each measured in its own process (the cli too)
LAYOUTS = ("bench", "independent")
COLUMNS = ["bin", "n", "mae", "mse", "rmse", "lcc", "srcc", "accuracy"]


def generate(workdir: Path, rows: int, history: float = 0.1, seed: int = 0) -> None:
    """Write the manifest and the predictions in parts of ``PART_ROWS`` (bounded memory).

    ``rows`` prediction rows in all, of which a ``history`` share are older rows (an earlier date, a
    different score) of images scored again later: the latest row must win. Predictions are model
    outputs (float, nearly no ties); ground truth is a vote mean (many ties). A tenth of the images
    are in the ``val`` split, so the split filter matters.
    """
    marker = workdir / "rows.txt"
    tag = f"{rows} {history} {seed} {DATA_VERSION}"
    if marker.exists() and marker.read_text().strip() == tag:
        return
    rng = np.random.default_rng(seed)
    n_images = rows - int(rows * history)
    manifest_dir = workdir / "manifests"
    version_dir = workdir / "predictions" / f"model_version={VERSION}"
    for d in (manifest_dir, version_dir / "date=2024-01-01", version_dir / "date=2023-12-01"):
        d.mkdir(parents=True, exist_ok=True)
    writers: dict[str, pq.ParquetWriter] = {}
    with Progress(rows, "bench-sql data", unit="row", disable=False) as progress:
        for part, start in enumerate(range(0, n_images, PART_ROWS)):
            n = min(PART_ROWS, n_images - start)
            ids = pa.array(np.arange(start, start + n, dtype=np.int64))
            uri = pc.binary_join_element_wise("s3://bench/images/", pc.cast(ids, pa.string()), ".jpg", "")
            # AVA-like ratios: peaks at 2:3 and 3:4, a tail of panoramas and portraits.
            ratio = np.where(rng.random(n) < 0.8, rng.choice([0.6667, 0.75, 1.0, 1.5], n),
                             rng.lognormal(-0.2, 0.4, n))
            true = np.clip(rng.normal(5.4, 0.75, n), 1, 10).round(3)
            split = np.where(rng.random(n) < 0.9, "test", "val")
            manifest = pa.table({
                "image_id": ids, "uri": uri, "split": pa.array(split),
                "score_mean": true, "score_std": np.full(n, 1.4), "aspect_ratio": ratio,
                "width": np.full(n, 1000, np.int32), "height": (1000 * ratio).astype(np.int32),
            })
            if "manifest" not in writers:
                writers["manifest"] = pq.ParquetWriter(manifest_dir / "test.parquet", manifest.schema,
                                                       compression="zstd")
            writers["manifest"].write_table(manifest)
            latest = _prediction_part(rng, ids, uri, true, ratio, "2024-01-01T02:00:00")
            pq.write_table(latest, version_dir / "date=2024-01-01" / f"part-{part:04d}.parquet", compression="zstd")
            # The older rows of a random share of these images (their score is worse: a stale model).
            older = np.flatnonzero(rng.random(n) < history / (1 - history))
            if older.size:
                stale = _prediction_part(rng, ids.take(older), uri.take(older), true[older] + 1.0, ratio[older],
                                         "2023-12-01T02:00:00")
                pq.write_table(stale, version_dir / "date=2023-12-01" / f"part-{part:04d}.parquet",
                               compression="zstd")
            # A second URI of some images in the same batch: "<id>.jpeg" < "<id>.jpg", so the original wins.
            copies = np.flatnonzero(rng.random(n) < TIE_SHARE)
            if copies.size:
                copy_uri = pc.binary_join_element_wise("s3://bench/images/", pc.cast(ids.take(copies), pa.string()),
                                                       ".jpeg", "")
                twin = _prediction_part(rng, ids.take(copies), copy_uri, true[copies] - 1.0, ratio[copies],
                                        "2024-01-01T02:00:00")
                pq.write_table(twin, version_dir / "date=2024-01-01" / f"part-{part:04d}-copies.parquet",
                               compression="zstd")
            progress.update(n + older.size + copies.size)
    for writer in writers.values():
        writer.close()
    # What ingest leaves when it rejected nothing (a root without it makes mpemd sql write a stand-in).
    from tasks.core.schemas import REJECTED_SCHEMA

    pq.write_table(pa.Table.from_batches([], schema=REJECTED_SCHEMA), manifest_dir / "rejected.parquet")
    marker.write_text(tag)


def parts_folder(workdir: Path, part_rows: int, full_schema: bool = False) -> Path:
    """Where ``split_parts`` cuts ``workdir``'s predictions (beside it)."""
    return workdir.with_name(f"{workdir.name}-parts-{part_rows}{'-full' if full_schema else ''}")


def split_parts(workdir: Path, part_rows: int, full_schema: bool = False) -> Path:
    """The same data with the predictions in files of ``part_rows`` rows (made once, beside ``workdir``).

    ``full_schema``: as ``mpemd score --no-compact`` leaves them, every column it writes in every file
    (``with_every_column``) and the schema record in the version folder, so a reader knows the files
    share one schema without opening them (tasks.analysis.read_plan.shares_one_schema)."""
    target = parts_folder(workdir, part_rows, full_schema)
    marker = target / "rows.txt"
    tag = (workdir / "rows.txt").read_text() + " shard-names"  # the part names changed once: cut again
    if marker.exists() and marker.read_text() == tag:
        return target
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(workdir / "manifests", target / "manifests")
    from tasks.scoring.predictions import schema_record_text

    rng = np.random.default_rng(1)
    shards: dict[Path, int] = {}
    for path in sorted((workdir / "predictions").rglob("*.parquet")):
        table = pq.read_table(path, partitioning=None)
        folder = target / path.parent.relative_to(workdir)
        folder.mkdir(parents=True, exist_ok=True)
        if full_schema:
            record = folder.parent / SCHEMA_RECORD  # its model_version= folder's, written once
            if not record.exists():
                record.write_text(schema_record_text())
            table = with_every_column(table, rng)
        for k in range(0, table.num_rows, part_rows):
            # mpemd score's part names (part-<shard>-<16-hex key>), so compaction treats them as shards
            shard = shards[folder] = shards.get(folder, -1) + 1
            pq.write_table(table.slice(k, part_rows), folder / f"part-{shard:05d}-{shard:016x}.parquet",
                           compression="zstd")
    marker.write_text(tag)
    return target


def with_every_column(table: pa.Table, rng: np.random.Generator) -> pa.Table:
    """``table`` (bench_sql's prediction columns) with every column ``mpemd score`` writes, in its schema:
    the ones bench_sql leaves out filled as a scoring run would (a ``dist`` of 10 floats, the source
    file's etag, size and modification time, its width and height)."""
    from tasks.core.schemas import PREDICTION_SCHEMA

    n = table.num_rows
    extra = {"dist": pa.FixedSizeListArray.from_arrays(pa.array(rng.random(10 * n, dtype=np.float32)), 10),
             "width": np.full(n, 1000, np.int32), "height": np.full(n, 750, np.int32),
             "source_etag": pa.array([f"{v:032x}" for v in rng.integers(0, 2**62, n)]),
             "source_size": rng.integers(10**4, 10**6, n), "source_mtime": rng.random(n) * 1e9}
    columns = [table.column(f.name) if f.name in table.column_names else extra[f.name] for f in PREDICTION_SCHEMA]
    return pa.table(dict(zip(PREDICTION_SCHEMA.names, columns, strict=True))).cast(PREDICTION_SCHEMA)


def compacted(workdir: Path) -> Path:
    """A copy of ``workdir`` (hard links) whose ``date=`` partitions ``mpemd compact`` merged (made once)."""
    from tasks.scoring.compaction import compact_output

    target = workdir.with_name(f"{workdir.name}-compacted")
    marker = target / "rows.txt"
    if marker.exists() and marker.read_text() == (workdir / "rows.txt").read_text():
        return target
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(workdir, target, copy_function=os.link)
    start = time.perf_counter()
    summary = compact_output(str(target / "predictions"))
    print(f"compacted {summary['files_before']:,} files into {summary['files_after']:,} "
          f"({summary['rows']:,} rows) in {time.perf_counter() - start:.1f} s", flush=True)
    marker.write_text((workdir / "rows.txt").read_text())
    return target


def independent(workdir: Path, file_rows: int = 1_000_000) -> Path:
    """The same rows laid out as a user's own writer might (issue 22): every column ``mpemd score``
    writes (the ``dist`` list, the listing facts), snappy, files of ~``file_rows`` rows in one row
    group each, and the older history rows shuffled into the same ``date=`` partition and files as the
    latest ones (made once, beside ``workdir``)."""
    target = workdir.with_name(f"{workdir.name}-independent")
    marker = target / "rows.txt"
    tag = (workdir / "rows.txt").read_text() + f" independent-{file_rows}"
    if marker.exists() and marker.read_text() == tag:
        return target
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(workdir / "manifests", target / "manifests")
    folder = target / "predictions" / f"model_version={VERSION}" / "date=2024-01-01"
    folder.mkdir(parents=True)
    files = sorted((workdir / "predictions").rglob("*.parquet"))
    table = pa.concat_tables(pq.read_table(f, partitioning=None) for f in files)
    rng = np.random.default_rng(1)
    table = table.take(rng.permutation(table.num_rows))
    for index, start in enumerate(range(0, table.num_rows, file_rows)):
        full = with_every_column(table.slice(start, file_rows), rng)
        pq.write_table(full, folder / f"part-{index:05d}-{index:016x}.parquet", compression="snappy",
                       row_group_size=file_rows)
    marker.write_text(tag)
    return target


def _prediction_part(rng: np.random.Generator, ids: pa.Array, uri: pa.Array, true: np.ndarray,
                     ratio: np.ndarray, scored_at: str) -> pa.Table:
    n = len(ids)
    pred = true + rng.normal(0, 0.5, n) + 0.3 * np.abs(ratio - 0.67)
    return pa.table({
        "uri": uri, "image_id": ids, "model": pa.array(["mpemd"] * n), "patch_mode": pa.array(["grid"] * n),
        "n_patches": np.full(n, 8, np.int32), "score": pred.astype(np.float32).astype(np.float64),
        "score_std": np.full(n, 1.3), "aspect_ratio": ratio,
        "scored_at": pa.array(np.full(n, np.datetime64(scored_at, "us")), pa.timestamp("us", "UTC")),
        "status": pa.array(["ok"] * n), "error": pa.nulls(n, pa.string()),
    })


def run_duckdb(workdir: Path | str, threads: int | None) -> dict:
    """``workdir``: the data root, a folder or an ``s3://`` URL (the profile goes to a local temp folder)."""
    import tempfile

    from tasks.analysis import sql

    start = time.perf_counter()
    con = sql.connect(str(workdir), threads=threads)
    profile = Path(tempfile.gettempdir()) / f"bench-sql-profile-{os.getpid()}.json"
    con.execute("PRAGMA enable_profiling = 'json'")
    con.execute(f"PRAGMA profiling_output = '{profile}'")
    table = sql.run_query(con, "errors_by_aspect_bin", {"model_version": VERSION, "split": "test"})
    seconds = time.perf_counter() - start
    con.execute("PRAGMA disable_profiling")
    peak = json.loads(profile.read_text())["system"]["peak_buffer_memory"]
    profile.unlink()
    return {"seconds": seconds, "duckdb_peak_mb": peak / 2**20, "rows": table.to_pandas()[COLUMNS]}


KEY = ["scored_at", "date", "model", "patch_mode", "n_patches", "uri"]  # prediction_set's order, latest last


def _latest_plain(preds: Any) -> Any:
    """The latest row per image as a plain script writes it: one sort by the whole key."""
    return preds.sort_values(KEY).drop_duplicates("image_id", keep="last")


def _latest_tuned(preds: Any) -> Any:
    """The same rows as ``_latest_plain``, the way the SQL finds them: the row of the latest scored_at,
    and the whole key only for the images where two rows share that time."""
    at_latest = preds[preds["scored_at"] == preds.groupby("image_id")["scored_at"].transform("max")]
    tied = at_latest["image_id"].duplicated(keep=False)
    import pandas as pd

    return pd.concat([at_latest[~tied], _latest_plain(at_latest[tied])])


def run_pandas(workdir: Path | str, tuned: bool = False) -> dict:
    """``workdir``: the data root, a folder or an ``s3://`` URL (read through s3fs, as a plain script
    does with ``storage_options``)."""
    import pandas as pd

    start = time.perf_counter()
    root = str(workdir).rstrip("/")
    options = _storage_options(root)
    truth = pd.read_parquet(f"{root}/manifests/test.parquet", columns=["image_id", "split", "score_mean",
                                                                      "aspect_ratio"], storage_options=options)
    # Only the columns it uses: the key of the latest row, the score, the status.
    preds = pd.read_parquet(f"{root}/predictions", columns=[*KEY, "image_id", "score", "status"],
                            filters=[("model_version", "=", VERSION)], storage_options=options)
    # The Hive date comes as a category in discovery order: order it by value (ISO dates sort as text).
    preds["date"] = preds["date"].cat.reorder_categories(sorted(preds["date"].cat.categories), ordered=True)
    preds = preds[(preds["status"] == "ok") & preds["image_id"].notna()]
    preds = _latest_tuned(preds) if tuned else _latest_plain(preds)
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


def _storage_options(root: str) -> dict[str, str] | None:
    """What a plain script passes to reach an S3 endpoint of its own (None for a local root)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL")
    return {"endpoint_url": endpoint} if root.startswith("s3://") and endpoint else None


def upload(workdir: Path, s3: Any, url: str) -> str:
    """Copy the data root ``workdir`` (manifests and predictions, Hive folders kept) under ``url``."""
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=s3.endpoint)
    bucket = url.removeprefix("s3://").split("/", 1)[0]
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    # the Parquet files and the versions' schema records (--full-schema: as mpemd score leaves them on S3)
    files = sorted(p for p in workdir.rglob("*") if p.relative_to(workdir).parts[0] in ("manifests", "predictions")
                   and (p.suffix == ".parquet" or p.name == SCHEMA_RECORD))
    start = time.perf_counter()
    fs.put([str(f) for f in files], [f"{url.removeprefix('s3://')}/{f.relative_to(workdir).as_posix()}" for f in files])
    print(f"uploaded {len(files):,} files ({sum(f.stat().st_size for f in files) / 2**20:.0f} MB) to {url} in "
          f"{time.perf_counter() - start:.1f} s", flush=True)
    return url


def _child(engine: str, workdir: Path | str, threads: int | None, out: Path) -> None:
    result = run_duckdb(workdir, threads) if engine == "duckdb" else run_pandas(workdir, engine == "pandas-tuned")
    result["rows"] = result["rows"].to_dict("list")
    out.write_text(json.dumps(result, default=float))


def _measure(cmd: list[str], env: dict[str, str], stdout: int | None = None) -> tuple[dict, bytes]:
    """Run ``cmd``; its wall seconds, user/sys CPU seconds and peak RSS (MB), and its stdout."""
    # Through GNU time: a child of this process (which made the data) would start its ru_maxrss at this
    # process's RSS high-water mark when it execs (see benchmarks/bench_scale.py run_point).
    import tempfile

    with tempfile.NamedTemporaryFile("r", suffix=".time") as figures:
        start = time.perf_counter()
        proc = subprocess.Popen(["/usr/bin/time", "-f", "%U %S %M", "-o", figures.name, *cmd], cwd=ROOT, env=env,
                                stdout=stdout)
        output = proc.stdout.read() if proc.stdout else b""
        if proc.wait():
            raise RuntimeError(f"{cmd} exited {proc.returncode}")
        wall = time.perf_counter() - start
        user, sys_s, max_kb = figures.read().split()[-3:]
    return {"wall": wall, "user": float(user), "sys": float(sys_s), "peak_rss_mb": int(max_kb) / 1024}, output


def run_all(args: argparse.Namespace, workdir: Path, root: str | None = None, s3: Any = None) -> dict[str, dict]:
    """Each engine ``args.repeat`` times over ``root`` (default ``workdir``; an ``s3://`` URL with
    ``--s3``, whose server ``s3`` then counts each run's requests)."""
    root = root or str(workdir)
    env = dict(os.environ, **({"MPEMD_SQL_DIR": str(args.sql_dir)} if args.sql_dir else {}))
    if args.threads:
        env["MPEMD_DUCKDB_THREADS"] = str(args.threads)
    # The console script a user types (flows.launch); python -m flows.launch where it is not installed.
    script = shutil.which("mpemd", path=str(Path(sys.executable).parent))
    cli = [*([script] if script else [sys.executable, "-m", "flows.launch"]), "sql", "errors_by_aspect_bin",
           "--root", root, "--param", f"model_version={VERSION}", "--format", "csv"]
    runs: dict[str, list[dict]] = {"cli": [], "duckdb": [], "pandas": [], "pandas-tuned": []}
    answers: dict[str, Any] = {}
    for _ in range(args.repeat):
        if s3:
            s3.requests(reset=True)
        figures, output = _measure(cli, env, stdout=subprocess.PIPE)
        runs["cli"].append({**figures, **_requests(s3)})
        answers["cli"] = output
        for engine in ENGINES:
            out = workdir / f"result-{engine}.json"
            cmd = [sys.executable, "-m", "benchmarks.bench_sql", "--rows", str(args.rows), "--history",
                   str(args.history), "--workdir", str(args.workdir), "--engine", engine, "--out", str(out),
                   *(["--part-rows", str(args.part_rows)] if args.part_rows else []),
                   *(["--full-schema"] if args.full_schema else []),
                   *(["--compact"] if args.compact else []), "--layout", args.layout,
                   *(["--root", root] if s3 else [])]
            figures, _ = _measure(cmd, env)
            result = json.loads(out.read_text())
            runs[engine].append({**figures, **_requests(s3), **{k: v for k, v in result.items() if k != "rows"}})
            answers[engine] = result["rows"]
    best = {engine: min(r, key=lambda f: f["wall"]) for engine, r in runs.items()}
    best["answers"] = answers
    return best


def _requests(s3: Any) -> dict[str, Any]:
    """The requests the run just measured made to the S3 server, by kind (and zero the count)."""
    if not s3:
        return {}
    kinds = s3.requests(reset=True)
    return {"requests": sum(kinds.values()), "requests_by_kind": kinds}


def compare_answers(answers: dict[str, Any]) -> Any:
    import pandas as pd

    cli = pd.read_csv(io.BytesIO(answers["cli"]))
    duck, pand, tuned = (pd.DataFrame(answers[e]) for e in ENGINES)
    for other in (cli, duck, tuned):
        for column in COLUMNS[1:]:
            np.testing.assert_allclose(other[column].astype(float), pand[column].astype(float), rtol=1e-9,
                                       atol=1e-9, equal_nan=True, err_msg=column)
    return duck


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=5_000_000, help="prediction rows, history included")
    parser.add_argument("--history", type=float, default=0.1, help="share of older rows of rescored images")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-sql"))
    parser.add_argument("--threads", type=int, default=None, help="DuckDB threads (default: tasks.analysis.sql's)")
    parser.add_argument("--repeat", type=int, default=3, help="best of N, interleaved")
    parser.add_argument("--sql-dir", type=Path, default=None, help="query files to run (default: sql/)")
    parser.add_argument("--part-rows", type=int, default=None,
                        help="predictions in files of this many rows (mpemd score: one file per 1,000-image shard)")
    parser.add_argument("--full-schema", action="store_true",
                        help="with --part-rows: every column mpemd score writes in each file, and its schema "
                             "record (as mpemd score --no-compact leaves them)")
    parser.add_argument("--compact", action="store_true",
                        help="query the predictions after mpemd compact merged each date= partition into one file")
    parser.add_argument("--layout", choices=LAYOUTS, default="bench",
                        help="bench: this generator's own files; independent: every column, snappy, ~1 M-row "
                             "files, history rows in the same date= partition (see independent())")
    parser.add_argument("--s3", action="store_true",
                        help="query the layout on the S3 API: a moto server on 127.0.0.1:5291-5299 "
                             "(benchmarks/s3_moto.py), the data root uploaded to s3://bench-sql/data, mpemd sql "
                             "and pandas reading it through s3fs")
    parser.add_argument("--root", help=argparse.SUPPRESS)  # a child's data root (the S3 URL)
    parser.add_argument("--engine", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    workdir = args.workdir / f"rows-{args.rows}-history-{args.history}"
    if args.engine:  # one measurement, in its own process (the parent made the data)
        split = parts_folder(workdir, args.part_rows, args.full_schema) if args.part_rows else workdir
        split = split.with_name(f"{split.name}-compacted") if args.compact else split
        split = split.with_name(f"{split.name}-independent") if args.layout == "independent" else split
        _child(args.engine, args.root or split, args.threads, args.out)
        return 0

    t0 = time.perf_counter()
    generate(workdir, args.rows, args.history)
    if args.full_schema and not args.part_rows:
        parser.error("--full-schema goes with --part-rows")
    if args.part_rows:
        workdir = split_parts(workdir, args.part_rows, args.full_schema)
    if args.compact:
        workdir = compacted(workdir)
    if args.layout == "independent":
        workdir = independent(workdir)
    files = sorted((workdir / "predictions").rglob("*.parquet"))
    stored = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    print(f"data: {stored:,} prediction rows ({args.history:.0%} older history rows, {TIE_SHARE:.1%} same-batch "
          f"second URIs) in {workdir} ({sum(f.stat().st_size for f in workdir.rglob('*.parquet')) / 2**20:.0f} MB "
          f"Parquet, ready in {time.perf_counter() - t0:.0f}s); {len(os.sched_getaffinity(0))} CPUs; "
          f"best of {args.repeat}; {len(files):,} prediction files")
    if args.s3:
        from benchmarks.s3_moto import MotoServer

        with MotoServer() as s3, s3.in_environment():  # the children (cli, pandas, duckdb) inherit the endpoint
            best = run_all(args, workdir, upload(workdir, s3, "s3://bench-sql/data"), s3)
    else:
        best = run_all(args, workdir)
    duck = compare_answers(best.pop("answers"))
    print("\nper-bin table (DuckDB; the CLI and both pandas scripts agree to 1e-9):")
    print(duck.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"\n{'engine':<12} {'wall s':>7} {'user s':>7} {'sys s':>6} {'sys/user':>8} {'peak RSS MB':>11} "
          f"{'DuckDB buffers MB':>17}")
    for engine, r in best.items():
        buffer = f"{r['duckdb_peak_mb']:.0f}" if "duckdb_peak_mb" in r else "-"
        requests = f"  S3 requests {r['requests']}: {r['requests_by_kind']}" if "requests" in r else ""
        print(f"{engine:<12} {r['wall']:>7.2f} {r['user']:>7.2f} {r['sys']:>6.2f} {r['sys'] / r['user']:>8.0%} "
              f"{r['peak_rss_mb']:>11.0f} {buffer:>17}{requests}")
    cpu = {engine: r["user"] + r["sys"] for engine, r in best.items()}
    for baseline in ("pandas", "pandas-tuned"):
        ratio = best[baseline]["wall"] / best["cli"]["wall"]
        verdict = f"  (goal >= 5x: {'met' if ratio >= 5 else 'NOT met'})" if baseline == "pandas" else ""
        print(f"{baseline} / mpemd sql, wall: {ratio:.1f}x{verdict}; in-process query alone: "
              f"{best[baseline]['wall'] / best['duckdb']['wall']:.1f}x. CPU seconds (user + sys): "
              f"{cpu[baseline]:.2f} / {cpu['cli']:.2f} = {cpu[baseline] / cpu['cli']:.1f}x; in-process query: "
              f"{cpu[baseline] / cpu['duckdb']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
