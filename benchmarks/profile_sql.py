"""One ``sql/`` query under DuckDB's profiler: CPU, peak memory, spill and the operators that cost most.

    MPEMD_DUCKDB_MEMORY=4GB .venv/bin/python -m benchmarks.profile_sql ROOT errors_by_aspect_bin \
        model_version=bench [--out profile.json] [--min-seconds 1]

ROOT is a data root (e.g. the SQL stage's history: ``benchmarks.scale_stages.write_history``). Prints
the process's CPU (user, sys) and peak RSS over connect + query, DuckDB's peak buffer memory and bytes
spilled, and the operator tree (operator time is summed over threads: read shares, not seconds).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def operator_lines(node: dict[str, Any], min_seconds: float, depth: int = 0) -> list[str]:
    """The profile tree as lines, operators under ``min_seconds`` left out (their children kept)."""
    lines = []
    if node.get("timing", 0.0) >= min_seconds or depth < 2:
        extra = {k: v for k, v in node.get("extra_info", {}).items()
                 if k in ("Aggregates", "Groups", "Join Type", "Conditions", "CTE Name")}
        lines.append(f"{node.get('timing', 0.0):8.2f}s {'  ' * depth}{node.get('name')} "
                     f"rows={node.get('intermediate_rows')} {json.dumps(extra)[:160]}")
    for child in node.get("children", []):
        lines.extend(operator_lines(child, min_seconds, depth + 1))
    return lines


def profile(root: str, name: str, params: dict[str, str], out: Path) -> dict[str, Any]:
    """Run query ``name`` over ``root`` with the JSON profiler on; the figures and the profile."""
    from tasks.analysis import sql

    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    con = sql.connect(root)
    con.execute("PRAGMA enable_profiling = 'json'")
    con.execute(f"PRAGMA profiling_output = '{out}'")
    sql.run_query_rows(con, name, params)
    wall = time.perf_counter() - start
    con.execute("PRAGMA disable_profiling")
    after = resource.getrusage(resource.RUSAGE_SELF)
    report = json.loads(out.read_text())
    system = report.get("system", {})
    return {"wall": wall, "user": after.ru_utime - before.ru_utime, "sys": after.ru_stime - before.ru_stime,
            "peak_rss_mb": after.ru_maxrss / 1024, "duckdb_peak_mb": system.get("peak_buffer_memory", 0) / 2**20,
            "spilled_mb": system.get("total_bytes_spilled", 0) / 2**20, "profile": report}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root")
    parser.add_argument("query")
    parser.add_argument("params", nargs="*", help="name=value")
    parser.add_argument("--out", type=Path, default=Path("sql-profile.json"))
    parser.add_argument("--min-seconds", type=float, default=1.0, help="operators below this are not printed")
    args = parser.parse_args(argv)
    got = profile(args.root, args.query, dict(p.split("=", 1) for p in args.params), args.out)
    print(f"wall {got['wall']:.1f} s, user {got['user']:.1f} s, sys {got['sys']:.1f} s, peak RSS "
          f"{got['peak_rss_mb']:.0f} MB, DuckDB peak buffers {got['duckdb_peak_mb']:.0f} MB, "
          f"spilled {got['spilled_mb']:.0f} MB")
    for node in got["profile"].get("operator", []):
        print("\n".join(operator_lines(node, args.min_seconds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
