"""The reduced demo: ``reproduce`` end to end at the ``tiny`` size, through the same code path as
``make demo``, then every stage's outputs checked against the Parquet they wrote."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from model.metrics import aspect_bin
from tasks import storage
from tasks.manifests import read_manifest
from tasks.predictions import read_predictions

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory, prefect_harness):
    from flows.reproduce import demo_params, reproduce

    root = str(tmp_path_factory.mktemp("demo"))
    result = reproduce(**demo_params("tiny", root=root).model_dump())
    return root, result


def _table_rows(markdown: str) -> dict[str, list[str]]:
    """bin -> cells of the printed per-bin table."""
    section = markdown.split("## Overall")[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 7 and re.fullmatch(r"[0-9.]+-[0-9.inf]+|all", cells[0]):
            rows[cells[0]] = cells
    return rows


def test_every_stage_wrote_its_outputs_with_matching_counts(demo):
    root, result = demo
    labels = storage.read_bytes(storage.join(root, "synth", "AVA.txt")).decode().splitlines()
    splits = {s: read_manifest(root, s).num_rows for s in ("train", "val", "test")}
    rejected = read_manifest(root, "rejected").num_rows
    assert sum(splits.values()) + rejected == len(labels)  # count in == count out
    assert result["ingest"]["splits"] == splits
    for stage in ("nima", "mpemd"):
        run_dir = result[stage]["run_dir"]
        assert storage.exists(storage.join(run_dir, "checkpoint-best.pt"))
        metrics = storage.read_parquet(storage.join(run_dir, "metrics.parquet")).to_pandas()
        assert set(metrics["split"]) == {"train", "val"}
    assert result["mpemd"]["init"]  # stage 2 started from stage 1
    for name, summary in result["scored"].items():
        assert summary["listed"] == splits["test"], name
        assert summary["ok"] + summary["errors"] + summary["skipped_unchanged"] == splits["test"]
    assert storage.exists(result["report"])


def test_printed_table_matches_the_prediction_parquet(demo):
    root, result = demo
    test = read_manifest(root, "test").to_pandas()[["image_id", "score_mean", "aspect_ratio"]]
    out = storage.join(root, "predictions")

    def scores(version: str, model: str, mode: str | None) -> pd.DataFrame:
        rows = read_predictions(out, version).to_pandas()
        rows = rows[(rows["model"] == model) & (rows["status"] == "ok")]
        if mode is not None:
            rows = rows[rows["patch_mode"] == mode]
        return rows[["image_id", "score"]]

    nima = scores(result["nima"]["model_version"], "nima", None)
    mpemd = scores(result["mpemd"]["model_version"], "mpemd", "random")
    joined = test.merge(nima, on="image_id").merge(mpemd, on="image_id", suffixes=("_nima", "_mpemd"))
    joined["bin"] = [aspect_bin(a) for a in joined["aspect_ratio"]]
    printed = _table_rows(result["markdown"])
    assert "all" in printed
    for bin_label, cells in printed.items():
        group = joined if bin_label == "all" else joined[joined["bin"] == bin_label]
        assert int(cells[1]) == len(group), bin_label
        if len(group) == 0:
            continue
        nima_mae = float(np.mean(np.abs(group["score_nima"] - group["score_mean"])))
        mpemd_mae = float(np.mean(np.abs(group["score_mpemd"] - group["score_mean"])))
        assert float(cells[2]) == pytest.approx(nima_mae, abs=6e-4), bin_label
        assert float(cells[3]) == pytest.approx(mpemd_mae, abs=6e-4), bin_label
        assert float(cells[4]) == pytest.approx(nima_mae - mpemd_mae, abs=1.1e-3), bin_label


def test_rerun_reuses_finished_steps(demo, tmp_path):
    from flows.reproduce import demo_params, reproduce

    root, first = demo
    again = reproduce(**demo_params("tiny", root=root).model_dump())
    assert again["nima"]["run_id"] == first["nima"]["run_id"]
    assert again["nima"]["model_version"] == first["nima"]["model_version"]
    assert again["mpemd"]["model_version"] == first["mpemd"]["model_version"]
    assert all(s["scored"] == 0 for s in again["scored"].values())  # nothing rescored
    assert again["comparison"] == first["comparison"]
