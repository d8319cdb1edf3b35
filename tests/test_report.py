"""The error report: plots and Markdown from the queries, and the ``analyze-errors`` flow end to end."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from analysis_fixture import MPEMD_VERSION, NIMA_VERSION, write_root
from PIL import Image

from flows.analyze_errors import AnalyzeErrorsParams, PredictionSetChoice, analyze_errors, collect_tables
from model.aspect_bins import aspect_bin_labels
from tasks.analysis import report, sql
from tasks.core import storage

NIMA = PredictionSetChoice(model_version=NIMA_VERSION, label="NIMA", model="nima")
MPEMD = PredictionSetChoice(model_version=MPEMD_VERSION, label="MPEMD (grid)", patch_mode="grid", n_patches=8)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> str:
    url = str(tmp_path_factory.mktemp("report-root"))
    write_root(url)
    return url


def test_flow_writes_the_report_and_returns_the_comparison(root, prefect_harness, caplog):
    params = AnalyzeErrorsParams(root=root, report_name="paper", nima=NIMA, mpemd=MPEMD, worst_n=5,
                                 headline_min_n=4)
    result = analyze_errors(**params.model_dump())
    folder = Path(root) / "reports" / "paper"
    assert result["report"] == str(folder / "report.md")
    markdown = (folder / "report.md").read_text()
    for label in aspect_bin_labels():
        assert f"| {label} |" in markdown, label
    for key, name in report.PLOT_FILES.items():
        png = folder / name
        assert result["plots"][key] == str(png)
        with Image.open(png) as image:
            image.verify()
        with Image.open(png) as image:
            assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 200
        assert f"]({name})" in markdown
    assert not [p for p in folder.iterdir() if p.name.startswith(".tmp-")]  # atomic writes left no temp files

    # The returned rows are compare_models' answer, JSON-safe (undefined values None, not NaN).
    con = sql.connect(root, threads=1)
    try:
        want = sql.run_query_df(con, "compare_models", {
            "nima_version": NIMA_VERSION, "nima_model": "nima", "mpemd_version": MPEMD_VERSION,
            "mpemd_patch_mode": "grid", "mpemd_n_patches": 8})
    finally:
        con.close()
    rows = result["comparison"]
    assert [r["bin"] for r in rows] == list(want.bin)
    assert [r["n"] for r in rows] == list(want.n)
    assert rows[-1]["nima_mae"] == pytest.approx(want.nima_mae.iloc[-1])
    assert next(r for r in rows if r["bin"] == "1.4-1.6")["nima_mae"] is None
    # The fixture's typical-bin decrease is not significant: no ratio is claimed, and the report says why.
    top = result["headline"]
    assert top["bin"] is None and "not significantly" in top["reason"]
    # The printed line is that one sentence, its prefix once (it was "no largest-bin ratio: no
    # unusual/typical ratio: ...; no largest-bin ratio: ...").
    line = report.headline_sentence(top)
    assert line.count("no largest-bin ratio") == 1 and "unusual/typical" not in line, line
    assert "no largest-bin ratio" in markdown and "largest-bin ratio: among" not in markdown
    assert "MAE decrease: " in markdown and ("not significant" in markdown)
    assert set(result["errors"]) == {"NIMA", "MPEMD (grid)"}


def test_flow_compares_any_two_sets_with_intervals(root, prefect_harness):
    """Two MPEMD sets of one version (random vs grid): no NIMA needed."""
    random = PredictionSetChoice(model_version=MPEMD_VERSION, label="random", patch_mode="random", n_patches=8)
    grid = PredictionSetChoice(model_version=MPEMD_VERSION, label="grid", patch_mode="grid", n_patches=8)
    result = analyze_errors(**AnalyzeErrorsParams(root=root, report_name="modes", nima=random, mpemd=grid,
                                                  worst_n=0).model_dump())
    markdown = Path(result["report"]).read_text()
    assert "paired bootstrap" in markdown and "MAE decrease: " in markdown
    assert "## random: errors per aspect-ratio bin" in markdown and "## grid: errors per aspect-ratio bin" in markdown
    assert result["comparison"][-1]["bin"] == "all" and result["comparison"][-1]["n"] > 0


def test_flow_refuses_a_version_that_is_not_there(root, prefect_harness):
    params = AnalyzeErrorsParams(root=root, nima=NIMA.model_copy(update={"model_version": "nope"}), mpemd=MPEMD)
    with pytest.raises(ValueError, match="no ok predictions"):
        analyze_errors(**params.model_dump())


def test_params_reject_unsafe_names_and_bad_bins():
    with pytest.raises(ValueError):
        AnalyzeErrorsParams(root="r", report_name="../x", nima=NIMA, mpemd=MPEMD)
    with pytest.raises(ValueError):
        AnalyzeErrorsParams(root="r", nima=NIMA, mpemd=MPEMD, bin_edges="1,0.5")
    ok = AnalyzeErrorsParams(root="r", nima=NIMA, mpemd=MPEMD)
    assert AnalyzeErrorsParams.model_validate_json(ok.model_dump_json()) == ok  # JSON-safe (inf as text)


@pytest.fixture(scope="module")
def odd_bin_tables(root) -> report.ErrorTables:
    return collect_tables(AnalyzeErrorsParams(root=root, nima=NIMA, mpemd=MPEMD, bin_edges="0,0.5,1,5,10,inf"))


def test_report_renders_on_tables_with_empty_bins_and_no_rows(tmp_path, odd_bin_tables):
    tables = odd_bin_tables
    assert list(tables.comparison.bin) == ["0.0-0.5", "0.5-1.0", "1.0-5.0", "5.0-10.0", "10.0-inf", "all"]
    empty = AnalyzeErrorsParams(root=str(tmp_path / "empty"), nima=NIMA, mpemd=MPEMD)
    con = sql.connect(empty.root, threads=1)
    try:
        blank = report.ErrorTables(
            labels=("A", "B"),
            comparison=sql.run_query_df(con, "compare_models", {"nima_version": "a", "mpemd_version": "b"}),
            errors={"A": sql.run_query_df(con, "errors_by_aspect_bin", {"model_version": "a"})},
            aspect_histogram=sql.run_query_df(con, "aspect_ratio_histogram"),
            score_distribution=sql.run_query_df(con, "score_distribution"),
            paired=sql.run_query_df(con, "paired_scores", {"nima_version": "a", "mpemd_version": "b"}))
    finally:
        con.close()
    for t in (tables, blank):
        plots = report.render_plots(t)
        for png in plots.values():
            Image.open(io.BytesIO(png)).verify()
        markdown = report.render_markdown(t, "t")
        for label in t.comparison.bin:
            assert f"| {label} |" in markdown
    assert "no claim is made" in report.render_markdown(blank, "t")  # no bootstrap: no headline


def test_headline_ratio_only_when_the_typical_decrease_is_significantly_positive(odd_bin_tables):
    import numpy as np

    from tasks.analysis.bootstrap import paired_bootstrap

    rng = np.random.default_rng(0)
    labels = rng.choice(["0.6-0.8", "1.6-inf"], size=400)
    true = rng.normal(5, 1, 400)
    error = rng.normal(0, 1, 400)
    gain = np.where(labels == "0.6-0.8", 0.2, 0.6)
    strong = paired_bootstrap(true, true + error + np.sign(error) * gain, true + error + rng.normal(0, 0.3, 400), labels,
                              typical_bin="0.6-0.8", n_resamples=500)
    tables = odd_bin_tables
    tables_strong = report.ErrorTables(**{**tables.__dict__, "bootstrap": strong, "headline_min_n": 10})
    top = report.headline(tables_strong)
    assert top["bin"] == "1.6-inf" and top["lo"] < top["decrease_vs_typical"] < top["hi"]
    text = report.render_markdown(tables_strong, "t")
    assert "largest-bin ratio: among the bins of at least 10 test images" in text and "is 1.6-inf" in text
    assert "the paper: up to 7.9x" in text and "seed:" not in text
    sentence = report.headline_sentence(top)
    assert sentence.startswith("largest-bin ratio: among the bins of at least 10 test images, 1.6-inf")
    assert "Ratios to it are not shown" not in text  # a significant typical decrease: the column is kept
    figure = report.plot_mae_by_bin(tables_strong.comparison, tables_strong.labels, strong)
    bars = figure.axes[1].containers[0]  # the interval bars below the MAE bars
    shown = [b for b in tables_strong.comparison["bin"] if b != "all"]
    drawn = bars.lines[0].get_ydata()
    for k, label in enumerate(shown):
        want = strong.bins[label][1].estimate if label in strong.bins else float("nan")
        assert (np.isnan(want) and np.isnan(drawn[k])) or drawn[k] == pytest.approx(want)


def test_no_ratio_to_a_typical_decrease_that_is_not_significant(odd_bin_tables):
    """report.md's per-bin ratio column and the printed headline follow the protocol's rule."""
    tables = odd_bin_tables
    assert tables.bootstrap is not None and not tables.bootstrap.typical.significant
    text = report.render_markdown(tables, "t")
    assert "Ratios to it are not shown: the typical bin's decrease" in text
    section = text.split("per aspect-ratio bin")[1].split("![MAE per bin]")[0]
    header = next(line for line in section.splitlines() if line.startswith("| bin |"))
    column = [c.strip() for c in header.strip("|").split("|")].index(f"x {tables.typical_bin}")
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith(("| bin", "| ---"))]
    assert rows and all(line.strip("|").split("|")[column].strip() == "-" for line in rows)
    sentence = report.headline_sentence(report.headline(tables))
    assert sentence.count("no largest-bin ratio") == 1 and "no unusual/typical ratio" not in sentence


@pytest.mark.s3
def test_report_writes_to_s3(s3_bucket, odd_bin_tables):
    url = f"{s3_bucket}/data"
    tables = odd_bin_tables
    paths = report.write_report(url, "s3", report.render_markdown(tables, "t"), report.render_plots(tables))

    assert storage.read_bytes(paths["report"]).decode().startswith("# t")
    with Image.open(io.BytesIO(storage.read_bytes(paths["plots"]["mae_by_bin"]))) as image:
        assert image.format == "PNG"
