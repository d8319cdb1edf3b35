"""``make bench``: every ``benchmarks/bench_*.py`` in turn with its default sizes, then the GPU check
(``gpu_check.py`` on CUDA; without a GPU its ``--dry-run``, which only proves the script still runs).
The SQL benchmark's default is 5 million prediction rows and the load benchmark's 50,000 images;
``bench_scale`` runs its quick sizes (its ``--full`` curves are docs/scale/): allow an hour on 2 cores. docs/performance.md says which figure each prints and its goal.

Each benchmark prints its own figures; this runner sequences them, times them (wall, user and
system CPU of the child) and reports failures. Pass names to run a subset:
``python -m benchmarks.run_all sql scoring``. ``bench_dask`` (a Dask cluster and a Prefect server,
minutes at its quick size) runs only when named: ``python -m benchmarks.run_all dask``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
# Run only when named: bench_dask starts a cluster and a Prefect server, minutes even at its quick size.
ON_REQUEST = {"bench_dask"}


def _run(cmd: list[str], name: str) -> int:
    print(f"\n=== {name} ===", flush=True)
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=HERE.parent)
    _, status, usage = os.wait4(proc.pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    print(f"--- {name}: exit {rc} in {time.perf_counter() - start:.0f}s wall, user {usage.ru_utime:.0f}s, "
          f"sys {usage.ru_stime:.0f}s", flush=True)
    return rc


def main(argv: list[str]) -> int:
    scripts = [s.stem for s in sorted(HERE.glob("bench_*.py"))] + ["gpu_check"]
    if argv:
        scripts = [s for s in scripts if any(name in s for name in argv)]
    else:
        scripts = [s for s in scripts if s not in ON_REQUEST]
    failed = []
    for name in scripts:
        if name == "gpu_check":
            import torch

            extra = [] if torch.cuda.is_available() else ["--dry-run"]
            cmd = [sys.executable, str(HERE / "gpu_check.py"), *extra]
        else:
            cmd = [sys.executable, "-m", f"benchmarks.{name}"]
        if _run(cmd, name):
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
