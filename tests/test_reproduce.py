"""The reduced demo: ``reproduce`` end to end at the ``tiny`` size, through the same code path as
``make demo``: every protocol row is trained, scored and reported on the same test images, the printed
table matches the Parquet, a rerun reuses finished steps, and a rerun from ``fresh`` prints the same
summary to the last digit."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest

from model.aspect_bins import aspect_bin
from tasks.analysis import comparison
from tasks.core import storage
from tasks.ingest.manifests import read_manifest_table
from tasks.scoring.predictions import read_predictions

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

ROWS = ["nima", "nima_equal_budget", "nima_patches_random", "nima_patches_grid",
        "nima_equal_budget_patches_random", "nima_equal_budget_patches_grid",
        "mpemd_ada_random", "mpemd_ada_grid", "mpemd_avg_random", "mpemd_avg_grid"]


def _run(root: str, fresh: bool = False) -> dict:
    from flows.reproduce import demo_params, reproduce

    return reproduce(**demo_params("tiny", root=root, fresh=fresh).model_dump())


@pytest.fixture(scope="module")
def demo(tmp_path_factory, prefect_harness):
    import torch

    torch.set_num_threads(1)  # module scope: the fixture of the same name is per test
    root = str(tmp_path_factory.mktemp("demo"))
    return root, _run(root)


def _mae_table(markdown: str) -> dict[str, list[str]]:
    """bin -> cells of the printed all-rows-per-bin table."""
    section = markdown.split("## MAE per aspect-ratio bin, every row")[1].split("## Overall")[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if re.fullmatch(r"[0-9.]+-[0-9.inf]+|all", cells[0]):
            rows[cells[0]] = cells
    return rows


def test_every_row_is_trained_scored_and_reported(demo):
    root, result = demo
    assert comparison.row_names(["random", "grid"]) == ROWS
    assert result["rows"] == ROWS
    splits = {s: read_manifest_table(root, s).num_rows for s in ("train", "val", "test")}
    assert result["ingest"]["splits"] == splits
    for name in ("nima", "nima_equal_budget", "mpemd_ada", "mpemd_avg"):
        run = result["runs"][name]
        assert storage.exists(storage.join(run.run_dir, "checkpoint-best.pt")), name
    # the three stage-2-budget runs start from stage 1
    for name in ("nima_equal_budget", "mpemd_ada", "mpemd_avg"):
        assert result["runs"][name].init, name
    assert set(result["scored"]) == set(ROWS)
    for name, summary in result["scored"].items():
        assert summary["listed"] == splits["test"], name
    header = f"| bin | n | {' | '.join(ROWS)} |"
    assert header in result["markdown"]
    assert [r["row"] for r in result["overall"]] == ROWS
    assert {(r["baseline"], r["candidate"]) for r in result["bootstrap"]} >= {
        ("nima_equal_budget", "mpemd_ada_random"), ("nima_equal_budget_patches_grid", "mpemd_ada_grid"),
        ("nima", "nima_patches_grid"), ("nima_equal_budget", "nima_equal_budget_patches_random"),
        ("nima_equal_budget", "mpemd_avg_random"), ("nima", "nima_equal_budget")}
    assert storage.exists(result["report"]) and storage.exists(result["analysis_report"])
    for record in result["bootstrap"]:
        lo, hi = record["lo"], record["hi"]
        if lo is not None and not np.isnan(lo) and lo <= 0 <= hi:
            assert record["verdict"] == "not significant"


def test_printed_table_matches_the_prediction_parquet(demo):
    root, result = demo
    test = read_manifest_table(root, "test").to_pandas()[["image_id", "score_mean", "aspect_ratio"]]
    out = storage.join(root, "predictions")
    from flows.reproduce import demo_params

    sets = {s.name: s for s in comparison.protocol_sets(
        {k: r.model_version for k, r in result["runs"].items()}, ["random", "grid"], demo_params("tiny").n_patches)}
    joined = test
    for name in ROWS:
        rows = read_predictions(out, sets[name].model_version).to_pandas()
        rows = rows[(rows["model"] == sets[name].model) & (rows["patch_mode"] == sets[name].patch_mode)
                    & (rows["status"] == "ok")]
        joined = joined.merge(rows[["image_id", "score"]].rename(columns={"score": name}), on="image_id")
    joined["bin"] = [aspect_bin(a) for a in joined["aspect_ratio"]]
    printed = _mae_table(result["markdown"])
    assert "all" in printed
    for bin_label, cells in printed.items():
        group = joined if bin_label == "all" else joined[joined["bin"] == bin_label]
        assert int(cells[1]) == len(group), bin_label
        for column, name in enumerate(ROWS, start=2):
            if len(group) == 0:
                assert cells[column] == "–"
                continue
            mae = float(np.mean(np.abs(group[name] - group["score_mean"])))
            assert float(cells[column]) == pytest.approx(mae, abs=6e-4), (bin_label, name)


def test_rerun_reuses_finished_steps(demo):
    root, first = demo
    again = _run(root)
    for name, run in first["runs"].items():
        assert again["runs"][name].model_version == run.model_version, name
    assert all(s["scored"] == 0 for s in again["scored"].values())  # nothing rescored
    assert again["markdown"] == first["markdown"]


def test_rerun_from_fresh_prints_the_same_summary_to_the_last_digit(demo):
    root, first = demo
    again = _run(root, fresh=True)
    assert any(s["scored"] > 0 for s in again["scored"].values())  # really recomputed
    assert again["markdown"] == first["markdown"]
    assert pd.DataFrame(again["bootstrap"]).equals(pd.DataFrame(first["bootstrap"]))


def test_the_demo_deployment_is_what_make_demo_runs():
    """infra/prefect.yaml's reproduce/demo has the parameters of ``mpemd demo --size small`` (make demo)."""
    from pathlib import Path

    import yaml

    from flows.params import ReproduceParams, demo_params

    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "infra" / "prefect.yaml").read_text())
    (demo,) = [d for d in config["deployments"] if d["entrypoint"] == "flows/reproduce.py:reproduce"
               and d["name"] == "demo"]
    assert ReproduceParams(**demo["parameters"]) == demo_params("small")


def test_protocol_states_each_arms_learning_rate(demo):
    from flows.reproduce import demo_params
    from tasks.training.presets import resolve_config

    _, result = demo
    params = demo_params("tiny")
    cfg = resolve_config(params.preset, {**params.overrides, **params.mpemd_overrides})
    want = {"nima": cfg.lr, "nima_equal_budget": cfg.arm_lr("nima"), "mpemd_ada": cfg.arm_lr("ada"),
            "mpemd_avg": cfg.arm_lr("avg")}
    assert {r["arm"]: r["lr"] for r in result["learning_rates"]} == want
    for arm, lr in want.items():
        assert re.search(rf"\| {arm} \| [^|]+ \| {lr:g} \|", result["markdown"]), arm


def test_tune_lr_trains_each_arm_at_its_lowest_validation_emd(demo):
    """``tune_lr``: every arm tries each lr from the same stage 1; the one kept has the lowest val EMD
    (read back from each run's metrics.parquet), and protocol.md says so."""
    from flows.reproduce import demo_params, reproduce

    root, _ = demo
    params = demo_params("tiny", root=root).model_copy(update={"tune_lr": True, "tune_lrs": [0.001, 0.3],
                                                               "report_name": "tuned"})
    result = reproduce(**params.model_dump())
    chosen = {r["arm"]: r for r in result["learning_rates"]}
    for arm in ("nima_equal_budget", "mpemd_ada", "mpemd_avg"):
        run_dirs = {lr: storage.join(root, "runs", result["runs"][arm].run_id.rsplit("-lr", 1)[0] + f"-lr{lr:g}")
                    for lr in (0.001, 0.3)}
        val = {}
        for lr, run_dir in run_dirs.items():
            metrics = pd.read_parquet(storage.join(run_dir, "metrics.parquet"))
            val[lr] = float(metrics[metrics["split"] == "val"]["emd2"].min())
        assert val[0.001] != val[0.3]
        assert chosen[arm]["lr"] == min(val, key=val.get), (arm, val)
        assert "validation EMD among 0.001" in chosen[arm]["chosen_by"]
    assert "validation EMD among" in result["markdown"]
