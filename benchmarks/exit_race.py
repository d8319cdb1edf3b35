"""How often a process that reads Parquet from an object store as its last act aborts at exit.

    python -m benchmarks.exit_race --runs 200        # counts exit statuses; -6 (SIGABRT) is the abort

Each run is a fresh ``python`` that reads one Parquet file (20 row groups) through
``storage.read_parquet_file`` from a non-local fsspec filesystem (``memory://``, the same code path as
``s3://``) and exits at once. pyarrow's workers let go of the input after the read returns; where the
input is Python memory that takes the GIL, and a worker asking for it once the interpreter has begun to
end is stopped inside a C++ destructor: "terminate called without an active exception", SIGABRT
(exit 134 in a shell; docs/performance.md, "terminate called"). The rate depends on the machine's load
(a descheduled worker is a late one): with the fetched bytes handed to pyarrow, 8 of 200 runs
aborted at load 4-10 on 2 shared cores; 0 of 200 with them copied into Arrow memory (d9cd543).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import sys
import fsspec
from tasks.core import storage
fs = fsspec.filesystem("memory")
fs.pipe_file("/exit_race.parquet", open(sys.argv[1], "rb").read())
assert storage.read_parquet_file(fs, "/exit_race.parquet").num_rows > 0
"""


def write_input(path: Path, rows: int = 200_000, row_group_rows: int = 10_000) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"a": range(rows), "b": [str(i) for i in range(rows)], "c": [1.0] * rows})
    pq.write_table(table, path, compression="zstd", row_group_size=row_group_rows)


def count_exits(runs: int, code_root: Path = ROOT) -> Counter[int]:
    """Exit statuses of ``runs`` processes (the code under ``code_root``), each reading and exiting."""
    statuses: Counter[int] = Counter()
    with tempfile.TemporaryDirectory(prefix="exit-race-") as folder:
        data = Path(folder) / "input.parquet"
        write_input(data)
        env = dict(os.environ, PYTHONPATH=str(code_root))
        for _ in range(runs):
            done = subprocess.run([sys.executable, "-c", CHILD, str(data)], env=env, cwd=code_root,
                                  capture_output=True, text=True)
            statuses[done.returncode] += 1
    return statuses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--code", type=Path, default=ROOT, help="the checkout whose tasks/ the children run")
    args = parser.parse_args(argv)
    start = time.strftime("%H:%M:%S", time.gmtime())
    statuses = count_exits(args.runs, args.code)
    print(f"{args.code}: exit statuses {dict(sorted(statuses.items()))} of {args.runs} runs, "
          f"{start}-{time.strftime('%H:%M:%S', time.gmtime())} UTC, load {os.getloadavg()[0]:.1f}")
    return 0 if set(statuses) == {0} else 1


if __name__ == "__main__":
    sys.exit(main())
