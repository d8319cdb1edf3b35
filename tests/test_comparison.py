"""The protocol's tables over any prediction sets, and the bootstrap in SQL against the one in numpy."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from analysis_fixture import MPEMD_VERSION, NIMA_VERSION, expected_set, write_root
from scipy import stats

from model.aspect_bins import aspect_bin_labels
from tasks.analysis import comparison, sql
from tasks.analysis.bootstrap import paired_bootstrap
from tasks.analysis.comparison import Pair, PredictionSet

NIMA = PredictionSet("nima", NIMA_VERSION, "nima", "warp", 1)
GRID = PredictionSet("mpemd_ada_grid", MPEMD_VERSION, "mpemd", "grid", 8)
RANDOM = PredictionSet("mpemd_ada_random", MPEMD_VERSION, "mpemd", "random", 8)
BINS = aspect_bin_labels()


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("comparison-root"))
    manifest, predictions = write_root(root)
    con = sql.connect(root)
    yield {"con": con, "manifest": manifest, "predictions": predictions}
    con.close()


def test_row_names_are_the_documented_stable_ones():
    assert comparison.row_names(["random", "grid"]) == [
        "nima", "nima_equal_budget", "nima_patches_random", "nima_patches_grid",
        "nima_equal_budget_patches_random", "nima_equal_budget_patches_grid",
        "mpemd_ada_random", "mpemd_ada_grid", "mpemd_avg_random", "mpemd_avg_grid"]
    versions = {"nima": "v1", "nima_equal_budget": "v2", "mpemd_ada": "v3", "mpemd_avg": "v4"}
    sets = {s.name: s for s in comparison.protocol_sets(versions, ["random", "grid"], 8)}
    assert list(sets) == comparison.row_names(["random", "grid"])
    assert (sets["nima_patches_grid"].model_version, sets["nima_patches_grid"].model) == ("v1", "mpemd")
    assert (sets["nima_equal_budget_patches_grid"].model_version, sets["nima_equal_budget_patches_grid"].model,
            sets["nima_equal_budget_patches_grid"].patch_mode) == ("v2", "mpemd", "grid")
    assert sets["nima_equal_budget"].query_params("baseline") == {
        "baseline_version": "v2", "baseline_model": "nima", "baseline_patch_mode": "warp", "baseline_n_patches": 1}
    pairs = comparison.protocol_pairs(["random", "grid"])
    assert (pairs[0].baseline, pairs[0].candidate) == ("nima_equal_budget", "mpemd_ada_random")
    asked = {(p.baseline, p.candidate) for p in pairs}
    assert {("nima", "nima_patches_grid"), ("nima_equal_budget", "nima_equal_budget_patches_grid"),
            ("nima_equal_budget_patches_grid", "mpemd_ada_grid"), ("nima", "nima_equal_budget")} <= asked
    assert ("nima_patches_grid", "mpemd_ada_grid") not in asked  # it changed budget and training at once


@pytest.mark.parametrize("modes", [["random", "grid"], ["grid"], ["grid", "random"]])
def test_every_attribution_pair_differs_in_exactly_one_thing(modes):
    """Built from ``protocol_pairs``: each side's (weights' training budget, training, prediction
    protocol); an attribution differs in exactly its ``factor``, a method comparison in training and
    prediction at the same budget."""
    versions = {"nima": "v1", "nima_equal_budget": "v2", "mpemd_ada": "v3", "mpemd_avg": "v4"}
    sets = {s.name: s for s in comparison.protocol_sets(versions, modes, 8)}
    pairs = comparison.protocol_pairs(modes)
    assert pairs[0].factor == "method" and pairs[0].baseline == "nima_equal_budget"
    for pair in pairs:
        differs = sets[pair.baseline].differs_in(sets[pair.candidate])
        if pair.factor == "method":
            assert differs == {"training", "prediction"}, pair
        else:
            assert differs == {pair.factor}, pair
    factors = [p.factor for p in pairs]
    assert factors.count("budget") == 1 and factors.count("prediction") >= 2 * len(modes)
    assert set(sets) == {n for p in pairs for n in (p.baseline, p.candidate)}  # every row is in a question


def test_scores_frame_keeps_images_scored_by_every_set(fixture_root):
    con, manifest, predictions = fixture_root["con"], fixture_root["manifest"], fixture_root["predictions"]
    frame = comparison.scores_frame(con, [NIMA, GRID, RANDOM])
    random = expected_set(manifest, predictions, MPEMD_VERSION, "mpemd", "random")
    assert sorted(frame["image_id"]) == sorted(random["image_id"])  # random scored every other image only
    nima = expected_set(manifest, predictions, NIMA_VERSION, "nima").set_index("image_id")
    np.testing.assert_allclose(frame["nima"], nima.loc[frame["image_id"], "score"].astype(float))


def test_mae_by_bin_matches_compare_models(fixture_root):
    con = fixture_root["con"]
    frame = comparison.scores_frame(con, [NIMA, GRID])
    table = comparison.mae_by_bin(frame, ["nima", "mpemd_ada_grid"], BINS).set_index("bin")
    want = sql.run_query_df(con, "compare_models", {
        **NIMA.query_params("nima"), **GRID.query_params("mpemd"), "split": "test"}).set_index("bin")
    for label in [*BINS, "all"]:
        assert table.loc[label, "n"] == want.loc[label, "n"], label
        for ours, theirs in (("nima", "nima_mae"), ("mpemd_ada_grid", "mpemd_mae")):
            if want.loc[label, "n"] == 0:
                assert math.isnan(table.loc[label, ours])
            else:
                assert table.loc[label, ours] == pytest.approx(want.loc[label, theirs]), label


def endpoint_mc_error(width: float, n_resamples: int, level: float = 0.95) -> float:
    """Monte-Carlo s.e. of the difference of two independent bootstrap estimates of a percentile end:
    sqrt(2) x sqrt(q (1 - q) / B) / f(x_q), with f the density of a normal bootstrap distribution whose
    central ``level`` interval is ``width`` wide (0.0152 x width for B = 4,000 at 95%)."""
    z = stats.norm.ppf(1 - (1 - level) / 2)
    q = (1 - level) / 2
    sigma = width / (2 * z)
    return math.sqrt(2) * math.sqrt(q * (1 - q) / n_resamples) * sigma / stats.norm.pdf(z)


def test_sql_bootstrap_agrees_with_the_numpy_one(fixture_root):
    con = fixture_root["con"]
    frame = comparison.scores_frame(con, [NIMA, GRID])
    py = paired_bootstrap(frame["true_score"], frame["nima"], frame["mpemd_ada_grid"], list(frame["bin"]),
                          typical_bin="0.6-0.8", n_resamples=4000, bin_order=BINS)
    answer = sql.run_query_df(con, "bootstrap", {**NIMA.query_params("baseline"), **GRID.query_params("candidate"),
                                                 "n_resamples": 4000})
    rows = answer.to_dict("records")
    by_key = {(r["statistic"], r["bin"] if isinstance(r["bin"], str) else None): r for r in rows}
    checks = {("mae_decrease", b): py.bins[b][1] for b in py.bins if py.bins[b][0] > 0}
    checks.update({(k, "all"): v for k, v in py.overall.items()})
    checks.update({("typical", None): py.typical, ("unusual", None): py.unusual,
                   ("unusual_minus_typical", None): py.unusual_minus_typical})
    for key, interval in checks.items():
        row = by_key[key]
        assert row["estimate"] == pytest.approx(interval.estimate, abs=1e-9), key  # the same data
        if math.isnan(interval.lo):
            assert row["lo"] is None or math.isnan(row["lo"]), key
            continue
        width = interval.hi - interval.lo
        # other random draws: the ends agree to 4 Monte-Carlo standard errors of their difference
        tolerance = 4 * endpoint_mc_error(width, 4000)
        assert row["lo"] == pytest.approx(interval.lo, abs=tolerance + 1e-9), key
        assert row["hi"] == pytest.approx(interval.hi, abs=tolerance + 1e-9), key
        assert bool(row["significant"]) == interval.significant or abs(interval.lo) < 0.1 * width \
            or abs(interval.hi) < 0.1 * width, key
    assert ("unusual_over_typical", None) in by_key if py.typical.significant else \
        ("unusual_over_typical", None) not in by_key
    again = sql.run_query_df(con, "bootstrap", {**NIMA.query_params("baseline"), **GRID.query_params("candidate"),
                                                "n_resamples": 4000})
    pd.testing.assert_frame_equal(again, answer)  # a fixed seed: the same intervals on a rerun


def test_markdown_shows_every_row_per_bin_and_says_not_significant(fixture_root):
    con = fixture_root["con"]
    frame = comparison.scores_frame(con, [NIMA, GRID, RANDOM])
    pairs = [Pair("nima", "mpemd_ada_grid", "headline"), Pair("mpemd_ada_random", "mpemd_ada_grid", "modes")]
    results = comparison.bootstrap_pairs(frame, pairs, BINS, n_resamples=500)
    names = ["nima", "mpemd_ada_grid", "mpemd_ada_random"]
    text = comparison.protocol_markdown(frame, names, BINS, results, report="r.md")
    assert "| bin | n | nima | mpemd_ada_grid | mpemd_ada_random |" in text
    for label in [*BINS, "all"]:
        assert f"| {label} |" in text
    assert "not significant" in text  # 18 images: most per-bin intervals include zero
    head = results[pairs[0]]
    if not (head.typical.significant and head.typical.lo > 0):
        assert "no largest-bin ratio" in text and "largest bin ratio:" not in text
    for record in comparison.bootstrap_records(results):
        if record["lo"] is not None and not math.isnan(record["lo"]) and record["lo"] <= 0 <= record["hi"]:
            assert record["verdict"] == "not significant"
