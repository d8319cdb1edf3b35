"""The fair NIMA-vs-MPEMD protocol as people read it: every prediction set on the same test images.

Rows (stable names: reports, Parquet, README and tests use them; new rows are added, none renamed):

- ``nima``: stage 1, warp prediction;
- ``nima_equal_budget``: stage 1 continued for exactly the epochs stage 2 trains, warp: the fair baseline;
- ``nima_patches_<mode>``: stage-1 weights, MPEMD's patch prediction;
- ``nima_equal_budget_patches_<mode>``: the equal-budget NIMA weights, MPEMD's patch prediction;
- ``mpemd_ada_<mode>``: stage 2 with the adaptive loss; ``mpemd_avg_<mode>``: stage 2, plain average loss;

``<mode>`` is ``random`` or ``grid``. Each row is three things: its weights' training budget (stage 1,
or stage 1 + stage 2's epochs), its training (EMD on warped images, or MPEMD_ada / MPEMD_avg on
patches) and its prediction protocol (warp, random or grid patches). A question (``Pair``) that
attributes a gain changes exactly one of them (``Pair.factor``); the method comparisons (the headline:
``mpemd_ada_<first mode>`` against ``nima_equal_budget``) change training and prediction together at
the same budget. Every pair gets a paired bootstrap (``tasks/analysis/bootstrap.py``) over the images
all sets scored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from model.aspect_bins import TYPICAL_ASPECT_BIN, aspect_bin_labels
from model.metrics import regression_metrics
from tasks.analysis import sql
from tasks.analysis.bootstrap import (
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    HEADLINE_MIN_N,
    NOT_SIGNIFICANT,
    BootstrapResult,
    Interval,
    paired_bootstrap,
)
from tasks.core import markdown, storage
from tasks.core.records import frame_rows

NIMA, EQUAL_BUDGET = "nima", "nima_equal_budget"
BASELINE = EQUAL_BUDGET
STAGE1, STAGE2 = "stage 1", "stage 1 + stage 2's epochs"  # a row's weights' training budget
FACTORS = ("budget", "training", "prediction")  # what a pair may change; "method": training and prediction


def patches_row(mode: str) -> str:
    return f"nima_patches_{mode}"


def equal_budget_patches_row(mode: str) -> str:
    return f"nima_equal_budget_patches_{mode}"


def mpemd_row(loss: str, mode: str) -> str:
    return f"mpemd_{loss}_{mode}"


def row_names(patch_modes: Sequence[str]) -> list[str]:
    """Every row of the protocol, in report order."""
    names = [NIMA, EQUAL_BUDGET]
    names += [patches_row(m) for m in patch_modes]
    names += [equal_budget_patches_row(m) for m in patch_modes]
    names += [mpemd_row(loss, m) for loss in ("ada", "avg") for m in patch_modes]
    return names


@dataclass(frozen=True)
class PredictionSet:
    """One stored prediction set: a model version narrowed to one model / patch mode / |P|."""

    name: str
    model_version: str
    model: str | None  # nima | mpemd (how predictions were made); None: any
    patch_mode: str | None  # warp | random | grid; None: any
    n_patches: int | None  # None: any
    budget: str | None = None  # STAGE1 | STAGE2: the weights' training budget (None: not a protocol row)
    training: str | None = None  # emd (warped images) | mpemd_ada | mpemd_avg (patches)

    def differs_in(self, other: PredictionSet) -> set[str]:
        """Which of ``FACTORS`` two protocol rows differ in."""
        mine = (self.budget, self.training, self.patch_mode)
        theirs = (other.budget, other.training, other.patch_mode)
        return {f for f, a, b in zip(FACTORS, mine, theirs, strict=True) if a != b}

    def query_params(self, prefix: str = "") -> dict[str, Any]:
        """Parameters of the sql/ questions: ``model_version, model, ...`` or ``<prefix>_version, ...``."""
        values = {"model": self.model, "patch_mode": self.patch_mode, "n_patches": self.n_patches}
        if not prefix:
            return {"model_version": self.model_version, **values}
        return {f"{prefix}_version": self.model_version, **{f"{prefix}_{k}": v for k, v in values.items()}}


def protocol_sets(versions: Mapping[str, str], patch_modes: Sequence[str], n_patches: int) -> list[PredictionSet]:
    """The rows from the checkpoints' model versions: keys ``nima``, ``nima_equal_budget``,
    ``mpemd_ada``, ``mpemd_avg``."""
    sets = [PredictionSet(NIMA, versions[NIMA], "nima", "warp", 1, STAGE1, "emd"),
            PredictionSet(EQUAL_BUDGET, versions[EQUAL_BUDGET], "nima", "warp", 1, STAGE2, "emd")]
    sets += [PredictionSet(patches_row(m), versions[NIMA], "mpemd", m, n_patches, STAGE1, "emd")
             for m in patch_modes]
    sets += [PredictionSet(equal_budget_patches_row(m), versions[EQUAL_BUDGET], "mpemd", m, n_patches, STAGE2, "emd")
             for m in patch_modes]
    sets += [PredictionSet(mpemd_row(loss, m), versions[f"mpemd_{loss}"], "mpemd", m, n_patches, STAGE2,
                           f"mpemd_{loss}") for loss in ("ada", "avg") for m in patch_modes]
    return sets


@dataclass(frozen=True)
class Pair:
    """A question: is ``candidate`` better than ``baseline`` (on the same images)? ``factor``: the one
    thing of ``FACTORS`` the two rows differ in, or ``method`` (training and prediction together)."""

    baseline: str
    candidate: str
    question: str
    factor: str = "method"


def protocol_pairs(patch_modes: Sequence[str]) -> list[Pair]:
    """The headline first, then the method comparisons, then each ingredient alone (one factor each)."""
    primary = patch_modes[0]
    pairs = [Pair(BASELINE, mpemd_row("ada", primary), "headline: MPEMD_ada against NIMA at equal budget")]
    pairs += [Pair(BASELINE, mpemd_row("ada", mode), f"MPEMD_ada ({mode}) against NIMA at equal budget")
              for mode in patch_modes if mode != primary]
    pairs += [Pair(BASELINE, mpemd_row("avg", mode), f"MPEMD_avg ({mode}) against NIMA at equal budget")
              for mode in patch_modes]
    for mode in patch_modes:
        pairs += [
            Pair(NIMA, patches_row(mode), f"patch prediction alone ({mode}), stage-1 weights", "prediction"),
            Pair(BASELINE, equal_budget_patches_row(mode), f"patch prediction alone ({mode}), equal-budget weights",
                 "prediction"),
            Pair(equal_budget_patches_row(mode), mpemd_row("ada", mode),
                 f"what training on patches adds ({mode}), same budget and prediction", "training"),
            Pair(mpemd_row("avg", mode), mpemd_row("ada", mode), f"adaptive vs average loss ({mode})", "training"),
        ]
    pairs += [Pair(mpemd_row("ada", primary), mpemd_row("ada", mode), f"{mode} vs {primary} patches (MPEMD_ada)",
                   "prediction") for mode in patch_modes if mode != primary]
    pairs.append(Pair(NIMA, EQUAL_BUDGET, "what the extra epochs buy NIMA", "budget"))
    return pairs


def scores_frame(con: Any, sets: Sequence[PredictionSet], split: str | None = "test") -> pd.DataFrame:
    """One row per image scored by EVERY set: ``image_id, bin, bin_order, true_score`` and one column
    of predicted scores per set name (so every row of every table is over the same images)."""
    frame = None
    for one in sets:
        rows = sql.run_query_df(con, "set_scores", {**one.query_params(), "split": split})
        if rows.empty:
            raise ValueError(f"prediction set {one.name} ({one.query_params()}) has no scored {split} images")
        rows = rows.rename(columns={"pred_score": one.name})
        keep = ["image_id", one.name] if frame is not None else ["image_id", "bin", "bin_order", "true_score", one.name]
        frame = rows[keep] if frame is None else frame.merge(rows[keep], on="image_id", how="inner")
    assert frame is not None
    return frame.sort_values("image_id", kind="stable").reset_index(drop=True)


def mae_by_bin(frame: pd.DataFrame, names: Sequence[str], bins: Sequence[str]) -> pd.DataFrame:
    """Bins (and ``all``) x ``n`` and each set's MAE: all rows per bin."""
    records = []
    for label in [*bins, "all"]:
        part = frame if label == "all" else frame[frame["bin"] == label]
        record: dict[str, Any] = {"bin": label, "n": len(part)}
        for name in names:
            record[name] = float(np.mean(np.abs(part[name] - part["true_score"]))) if len(part) else math.nan
        records.append(record)
    return pd.DataFrame.from_records(records)


def overall_table(frame: pd.DataFrame, names: Sequence[str]) -> pd.DataFrame:
    """Per set over every image: n, MAE, MSE, LCC, SRCC and the mean error (bias)."""
    records = []
    for name in names:
        metrics = regression_metrics(frame[name].to_numpy(), frame["true_score"].to_numpy())
        bias = float(np.mean(frame[name] - frame["true_score"])) if len(frame) else math.nan
        records.append({"row": name, **{k: metrics[k] for k in ("n", "mae", "mse", "lcc", "srcc")}, "bias": bias})
    return pd.DataFrame.from_records(records)


def bootstrap_pairs(frame: pd.DataFrame, pairs: Sequence[Pair], bins: Sequence[str], *,
                    typical_bin: str = TYPICAL_ASPECT_BIN, n_resamples: int = DEFAULT_RESAMPLES,
                    seed: int = DEFAULT_SEED, min_n: int = HEADLINE_MIN_N,
                    groups: Sequence[Any] | None = None) -> dict[Pair, BootstrapResult]:
    """A paired bootstrap per pair; the same seed (same resamples of the same images) for all.
    ``groups``: each image's training seed, for a two-level bootstrap (seeds, then images)."""
    labels = [b if isinstance(b, str) else None for b in frame["bin"]]
    return {pair: paired_bootstrap(frame["true_score"], frame[pair.baseline], frame[pair.candidate], labels,
                                   typical_bin=typical_bin, n_resamples=n_resamples, seed=seed, min_n=min_n,
                                   bin_order=bins, groups=groups)
            for pair in pairs}


def bootstrap_records(results: Mapping[Pair, BootstrapResult]) -> list[dict[str, Any]]:
    """Every interval of every pair, one flat row each (Parquet / JSON)."""
    return [{"baseline": pair.baseline, "candidate": pair.candidate, **row}
            for pair, result in results.items() for row in result.rows()]


# ---------------------------------------------------------------------------------------------
# Markdown


def _num(value: Any, digits: int = 3, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float | np.floating):
        return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"
    return str(value)


def interval_text(interval: Interval, digits: int = 4) -> str:
    """``+0.041 [+0.012, +0.070]``; an undefined interval shows the estimate alone."""
    if math.isnan(interval.lo) or math.isnan(interval.hi):
        return f"{_num(interval.estimate, digits, True)} [no interval]"
    return (f"{_num(interval.estimate, digits, True)} [{_num(interval.lo, digits, True)}, "
            f"{_num(interval.hi, digits, True)}]")


def _interval_with_verdict(interval: Interval) -> str:
    return f"{interval_text(interval)} {'significant' if interval.significant else NOT_SIGNIFICANT}"


def headline_markdown(pair: Pair, result: BootstrapResult) -> list[str]:
    """The headline in words: each claim with its interval and verdict, ratios only where defined."""
    pct = round(result.level * 100)
    o = result.overall
    levels = (f"two-level: {result.n_groups} training seeds, then images; " if result.n_groups > 1 else "")
    lines = [f"**Headline** ({pair.candidate} vs {pair.baseline}, {result.n} test images, paired bootstrap "
             f"({levels}{result.n_resamples} resamples, bootstrap seed {result.seed}), {pct}% intervals; > 0 "
             f"favours {pair.candidate}):", ""]
    for key, label in (("mae_decrease", "MAE decrease"), ("mse_decrease", "MSE decrease"),
                       ("lcc_gain", "LCC gain"), ("srcc_gain", "SRCC gain")):
        lines.append(f"- {label}: {interval_text(o[key])}, {o[key].verdict}")
    lines.append(f"- MAE decrease in the typical bin {result.typical_bin}: {interval_text(result.typical)}, "
                 f"{result.typical.verdict}")
    lines.append(f"- MAE decrease pooled over the other bins: {interval_text(result.unusual)}, {result.unusual.verdict}")
    lines.append(f"- unusual minus typical (the pooled decrease over the other bins minus the typical bin's): "
                 f"{interval_text(result.unusual_minus_typical)}, {result.unusual_minus_typical.verdict}")
    lines += ratio_lines(result)
    lines += [f"- {note}" for note in result.notes]
    return [*lines, ""]


def learning_rates_markdown(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Each arm's learning rate (``flows/reproduce.arm_learning_rates``) as a table."""
    return ["## Learning rate of each arm", "",
            "`nima`: stage 1; the others: from stage 1 for stage 2's epochs, each at its own learning rate.", "",
            markdown.table(["arm", "run", "lr", "epochs", "chosen by"],
                           [[r["arm"], r["run"], f"{r['lr']:g}", str(r["epochs"]), r["chosen_by"]] for r in rows]),
            ""]


PAPER_DECREASE_RATIO = 7.9  # the paper: MAE decrease for unusual ratios up to 7.9x the typical bin's


def ratio_lines(result: BootstrapResult) -> list[str]:
    """The two ratios in words, each only where its denominator (the typical bin's decrease) is
    significant: otherwise the note saying why there is none."""
    lines = []
    typical = result.typical_bin
    if result.unusual_over_typical is not None:
        lines.append(f"- unusual / typical: the MAE decrease pooled over the other bins is "
                     f"{interval_text(result.unusual_over_typical, 2)} times the decrease in {typical}")
    if result.largest_bin_ratio is not None:
        label, r = result.largest_bin_ratio
        share = "" if result.largest_bin_share is None else f", picked in {result.largest_bin_share:.0%} of resamples"
        lines.append(f"- largest-bin ratio: among the bins of at least {result.min_n} test images, the one whose MAE "
                     f"decrease is the largest multiple of the decrease in {typical} (picked again in each "
                     f"resample and measured on the images it left out) is {label}{share}: "
                     f"{interval_text(r, 2)} times (the paper: up to {PAPER_DECREASE_RATIO}x)")
    return lines


def protocol_markdown(frame: pd.DataFrame, names: Sequence[str], bins: Sequence[str],
                      results: Mapping[Pair, BootstrapResult], *, report: str | None = None,
                      learning_rates: Sequence[Mapping[str, Any]] = ()) -> str:
    """The printed summary of ``reproduce``: headline, all rows per bin, overall, every comparison."""
    pairs = list(results)
    parts = ["# NIMA vs MPEMD: the fair protocol", ""]
    if pairs:
        parts += headline_markdown(pairs[0], results[pairs[0]])
    if learning_rates:
        parts += learning_rates_markdown(learning_rates)
    by_bin = mae_by_bin(frame, names, bins)
    parts += ["## MAE per aspect-ratio bin, every row", "",
              "The same test images in every column (those scored by all rows); `–`: no images.", ""]
    parts.append(markdown.table(["bin", "n", *names], [[r["bin"], str(r["n"]), *(_num(r[n]) for n in names)]
                                                        for r in by_bin.to_dict("records")]))
    overall = overall_table(frame, names)
    parts += ["", "## Overall", ""]
    parts.append(markdown.table(
        ["row", "n", "MAE", "MSE", "LCC", "SRCC", "bias"],
        [[r["row"], str(r["n"]), _num(r["mae"]), _num(r["mse"]), _num(r["lcc"]), _num(r["srcc"]),
          _num(r["bias"], signed=True)] for r in overall.to_dict("records")]))
    parts += ["", "`bias`: the mean of predicted minus true score (< 0: the row predicts too low on average; "
              "MAE counts it, LCC and SRCC do not)."]
    parts += ["", "## Comparisons (paired bootstrap; > 0 favours the candidate)", "",
              "Each cell: estimate [interval], then the verdict (\"not significant\" when the interval "
              "includes zero).", ""]
    parts.append(markdown.table(
        ["question", "baseline", "candidate", "MAE decrease", "MSE decrease", "LCC gain", "SRCC gain",
         "unusual - typical"],
        [[p.question, p.baseline, p.candidate, *(_interval_with_verdict(r.overall[k]) for k in
          ("mae_decrease", "mse_decrease", "lcc_gain", "srcc_gain")), _interval_with_verdict(r.unusual_minus_typical)]
         for p, r in results.items()]))
    parts += ["", f"`unusual - typical`: the candidate's MAE decrease pooled over every bin but "
              f"{typical_of(results)}, minus its decrease in {typical_of(results)} (> 0: the gain is larger away "
              "from the typical aspect ratio). Ratios are printed only in the headline, and only where the "
              "typical bin's decrease is significant (a ratio to a decrease that may be zero means nothing)."]
    for pair in pairs[:1]:
        result = results[pair]
        parts += ["", f"## {pair.candidate} vs {pair.baseline}: MAE decrease per bin", ""]
        parts.append(markdown.table(["bin", "n", "MAE decrease [interval]", "verdict"],
                                    [[label, str(n), interval_text(i), i.verdict]
                                     for label, (n, i) in result.bins.items()]))
    if report:
        parts += ["", f"Report: {report}"]
    return "\n".join(parts) + "\n"


def typical_of(results: Mapping[Pair, BootstrapResult]) -> str:
    return next(iter(results.values())).typical_bin if results else TYPICAL_ASPECT_BIN


# ---------------------------------------------------------------------------------------------
# The whole protocol over a data root


@dataclass(frozen=True)
class ProtocolResult:
    markdown: str  # the printed summary (no timings: the same seed prints the same text)
    by_bin: list[dict[str, Any]]  # mae_by_bin rows
    overall: list[dict[str, Any]]  # overall_table rows
    bootstrap: list[dict[str, Any]]  # bootstrap_records
    report: str  # {root}/reports/<name>/protocol.md
    n_images: int


def run_protocol(root: str, sets: Sequence[PredictionSet], pairs: Sequence[Pair], *, report_name: str,
                 split: str | None = "test", bin_edges: Sequence[float] | None = None,
                 typical_bin: str = TYPICAL_ASPECT_BIN, n_resamples: int = DEFAULT_RESAMPLES,
                 seed: int = DEFAULT_SEED, learning_rates: Sequence[Mapping[str, Any]] = ()) -> ProtocolResult:
    """Every row on the images all sets scored, every pair bootstrapped; writes ``protocol.md`` and
    ``bootstrap.parquet`` under ``{root}/reports/<report_name>/``."""
    edges = list(bin_edges) if bin_edges is not None else None
    con = sql.connect(root, edges) if edges is not None else sql.connect(root)
    try:
        frame = scores_frame(con, sets, split)
    finally:
        con.close()
    bins = aspect_bin_labels(edges) if edges is not None else aspect_bin_labels()
    names = [s.name for s in sets]
    results = bootstrap_pairs(frame, pairs, bins, typical_bin=typical_bin, n_resamples=n_resamples, seed=seed)
    base = storage.join(root, "reports", report_name)
    report = storage.join(base, "protocol.md")
    markdown = protocol_markdown(frame, names, bins, results, report=report, learning_rates=learning_rates)
    records = bootstrap_records(results)
    storage.write_parquet_atomic(pa.Table.from_pylist(records), storage.join(base, "bootstrap.parquet"))
    storage.write_text_atomic(report, markdown)
    return ProtocolResult(markdown=markdown, by_bin=frame_rows(mae_by_bin(frame, names, bins)),
                          overall=frame_rows(overall_table(frame, names)), bootstrap=records, report=report,
                          n_images=len(frame))
