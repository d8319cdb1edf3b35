"""benchmarks/gpu_check.py must not rot between GPU loans: its CPU dry run executes every step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_runs_every_step_on_the_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    result = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--no-compile", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["failed"] == []
    sections = {row["section"] for row in report["rows"]}
    assert {"imports", "parity", "peak", "forward", "scoring", "training", "projection", "total"} <= sections
    rows = {row["what"]: row for row in report["rows"]}
    assert rows["prefect / duckdb / s3fs imported"]["value"] == "no"
    assert any(r["what"].startswith("mpemd |P|=2") for r in report["rows"])  # the MPEMD sweep ran
    assert all("same statuses" in r["note"] for r in report["rows"] if "decode cpu vs gpu" in r["what"])
    assert "| section | what | value |" in result.stdout  # the one table
