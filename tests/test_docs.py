"""Numbers and names the docs copy from the code stay the code's: the demo's sizes, the deployments."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from flows.params import DEMO_SIZES

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def test_the_demo_size_table_is_demo_sizes():
    text = (REPO / "docs" / "usage.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \| ([\d,]+) \| (\d+) \| (\d+) / (\d+) \| (\d+) \| (\d+) \|$", text, flags=re.M)
    table = {size: [int(v.replace(",", "")) for v in values] for size, *values in rows}
    assert table == {size: [spec["synth_n"], spec["overrides"]["image_size"], spec["overrides"]["epochs"],
                            spec["mpemd_epochs"], spec["overrides"]["n_patches"], spec["n_patches"]]
                     for size, spec in DEMO_SIZES.items()}


def test_every_deployment_the_docs_run_is_declared():
    declared = {f"{d['entrypoint'].split(':')[1].removesuffix('_flow').replace('_', '-')}/{d['name']}"
                for d in yaml.safe_load((REPO / "infra" / "prefect.yaml").read_text())["deployments"]}
    named = {m for path in DOCS for m in re.findall(r"prefect deployment run ([\w-]+/[\w-]+)", path.read_text())}
    assert named and named <= declared, named - declared
