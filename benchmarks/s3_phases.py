"""Where ``errors_by_aspect_bin`` over S3 spends its time: ``sql.connect``'s steps one by one, each with
its wall, CPU and the requests the server counted.

    PYTHONPATH=. .venv/bin/python -m benchmarks.s3_phases DATA_ROOT [--repeat 2]

DATA_ROOT is a local data root (e.g. one ``bench_sql`` made: ``/tmp/bench-sql/rows-1000000-history-0.1``).
It is uploaded to a loopback moto server (``benchmarks/s3_moto.py``; ``MPEMD_BENCH_S3_PORTS`` picks the
ports), and each repeat is a fresh process that imports, lists, connects, binds and runs the query,
printing one line per phase; ``python -c pass`` is timed first (the interpreter's own start). Then a
process that only lists the prediction files and fetches every byte of them (s3fs ``cat`` of the whole
list, its GETs concurrent): the floor that any reader of these files pays on this server, whatever its
query costs (``--floor`` to print it alone).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _requests() -> dict[str, int]:
    """The server's counts by kind since the last call (and zero them)."""
    with urllib.request.urlopen(f"{os.environ['AWS_ENDPOINT_URL']}/_bench/requests?reset=1") as reply:
        return json.loads(reply.read())


Phase = tuple[str, float, float, dict[str, int]]  # (phase, wall s, CPU s, requests)


def _marker(rows: list[Phase]) -> Callable[[str], None]:
    """``mark(name)`` appends to ``rows`` the phase since the last mark (or since now): its wall, CPU and
    the requests the server counted."""
    last = [time.perf_counter(), _cpu()]
    _requests()

    def mark(name: str) -> None:
        rows.append((name, time.perf_counter() - last[0], _cpu() - last[1], _requests()))
        last[:] = [time.perf_counter(), _cpu()]

    return mark


def phases(root: str) -> list[Phase]:
    """``sql.connect(root)`` step by step, then the query: (phase, wall s, CPU s, requests)."""
    rows: list[Phase] = []
    mark = _marker(rows)

    import duckdb
    import s3fs  # noqa: F401  (what fsspec imports at the first s3:// URL)

    from model.aspect_bins import ASPECT_BIN_EDGES
    from tasks.analysis import bin_lookup, duckdb_storage, sql

    mark("imports (duckdb, tasks.analysis.sql, s3fs)")
    # the views' own listing (list_root_entries: with the files' entries; list_root at older commits)
    lister = "list_root_entries" if hasattr(sql, "list_root_entries") else "list_root"
    listed = getattr(sql, lister)(root)
    files = listed[0]
    mark(f"listing (list_root: {len(files['predictions'])} prediction files)")
    con = duckdb.connect(":memory:", config={
        "autoinstall_known_extensions": False, "autoload_known_extensions": False,
        "threads": sql.default_threads(), "memory_limit": sql.default_memory_limit(),
        "temp_directory": sql._spill_directory()})
    con.execute("SET parquet_metadata_cache = true")
    view = duckdb_storage.register_storage(con, root)
    sql.set_aspect_bins(con, ASPECT_BIN_EDGES)
    mark("connection, filesystem, bins table")
    setattr(sql, lister, lambda _root: listed)  # the views reuse the listing above (connect lists once)
    try:
        sql.create_views(con, root, view)
    except TypeError:  # an older create_views, without the filesystem's groups
        sql.create_views(con, root)
    bin_lookup.use_fast_bin_position(con, ASPECT_BIN_EDGES)
    mark("views (DuckDB binds every file: the GETs)")
    relation = sql._relation(con, "errors_by_aspect_bin", {"model_version": "bench", "split": "test"})
    mark("query bound")
    relation.fetchall()
    mark("query run")
    return rows


def floor(root: str) -> list[Phase]:
    """What reading every prediction file of ``root`` costs at least: its listing, then all its bytes
    (one ``cat`` of the list: concurrent GETs on s3fs's event loop), no query."""
    rows: list[Phase] = []
    mark = _marker(rows)

    import fsspec

    fs, path = fsspec.core.url_to_fs(root)
    mark("imports (fsspec, s3fs)")
    files = [f for f in fs.find(f"{path}/predictions") if f.endswith(".parquet")]
    mark(f"floor: listing ({len(files)} prediction files)")
    fetched = sum(len(data) for data in fs.cat(files).values())
    mark(f"floor: every byte fetched ({fetched / 1e6:.1f} MB)")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="a local data root (uploaded), or with --child the s3:// URL")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--floor", action="store_true",
                        help="only the floor: list and fetch every prediction file, no query")
    parser.add_argument("--child", choices=["phases", "floor"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        for name, wall, cpu, requests in (phases if args.child == "phases" else floor)(args.root):
            print(f"{name:<48} wall {wall:6.2f} s  CPU {cpu:6.2f} s  {requests}")
        return 0
    from benchmarks.bench_sql import upload
    from benchmarks.s3_moto import MotoServer

    with MotoServer() as s3, s3.in_environment():
        url = upload(Path(args.root), s3, "s3://bench-sql/data")
        for _ in range(args.repeat):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-c", "pass"], check=True)
            print(f"{'python -c pass':<48} wall {time.perf_counter() - start:6.2f} s")
            for child in ["floor"] if args.floor else ["phases", "floor"]:
                start = time.perf_counter()
                subprocess.run([sys.executable, "-m", "benchmarks.s3_phases", url, "--child", child], check=True,
                               env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
                print(f"{'the process':<48} wall {time.perf_counter() - start:6.2f} s\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
