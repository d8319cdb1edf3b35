"""``make bench``: run every ``benchmarks/bench_*.py`` in turn with its default sizes (the load and
SQL benchmarks default to their full 50,000-image / 10-million-row sizes: allow an hour).

Each benchmark prints its own figures; this runner only sequences them and reports failures.
Pass names to run a subset: ``python -m benchmarks.run_all ingest scoring``.
GPU checks (``benchmarks/gpu_check.py``) are not run here: they need a CUDA machine.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent


def main(argv: list[str]) -> int:
    scripts = sorted(HERE.glob("bench_*.py"))
    if argv:
        scripts = [s for s in scripts if any(name in s.stem for name in argv)]
    failed = []
    for script in scripts:
        print(f"\n=== {script.stem} ===", flush=True)
        start = time.perf_counter()
        rc = subprocess.call([sys.executable, "-m", f"benchmarks.{script.stem}"], cwd=HERE.parent)
        print(f"--- {script.stem}: exit {rc} in {time.perf_counter() - start:.0f}s", flush=True)
        if rc:
            failed.append(script.stem)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
