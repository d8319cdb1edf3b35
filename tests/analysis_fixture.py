"""A hand-made data root for the SQL and report tests, and the answers computed apart from DuckDB.

The root holds manifests (test and val splits) and predictions in the Hive layout of DESIGN.md:
two model versions (one all digits, to catch a version read as a number), a NIMA set, two MPEMD
sets told apart by patch mode, re-scored rows on a later date (the latest must win), error rows,
and rows of images outside the manifests. Scores are rounded so ties test the average ranks of SRCC.
Bins: 1.4-1.6 is left empty, 1.2-1.4 holds one image, ratios sit exactly on edges.
"""

from __future__ import annotations

import datetime as dt
import math

import numpy as np
import pandas as pd
import pyarrow as pa
from scipy import stats

from model.aspect_bins import ASPECT_BIN_EDGES, aspect_bin_labels
from tasks.analysis import read_plan, sql
from tasks.core import storage

NIMA_VERSION = "0123"  # all digits on purpose
MPEMD_VERSION = "mpemd-9f3c"
DATES = ("2024-03-01", "2024-03-02")
PLANS = ["latest_by_place", "latest_by_key"]  # prediction_set_of_images' two plans (sql/views.sql)
# scored()'s filter on the split's images at the predictions' scan (read_plan.small_splits): off, or on
# for every split, whatever the manifests' sizes chose
SPLIT_FILTERS = ["join only", "at the scan"]

# Aspect ratios of the test images: every bin but 1.4-1.6, edges included, one image in 1.2-1.4.
_TEST_RATIOS = [
    0.2, 0.35, 0.39,
    0.4, 0.45, 0.5, 0.55, 0.59, 0.6 - 1e-12,
    0.6, 0.62, 0.64, 0.6667, 0.6667, 0.7, 0.72, 0.75, 0.75, 0.78, 0.79, 0.8 - 1e-9,
    0.8, 0.85, 0.9, 0.95, 0.99,
    1.0, 1.0, 1.05, 1.1, 1.15,
    1.3,
    1.6, 1.8, 2.5, 3.0,
]


def manifest_frame(seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n_test, n_val = len(_TEST_RATIOS), 8
    ratios = np.array(_TEST_RATIOS + list(rng.uniform(0.5, 1.5, n_val)))
    width = np.full(ratios.size, 1000, dtype=np.int32)
    counts = rng.integers(0, 30, size=(ratios.size, 10)).astype(np.int32)
    counts[:, 4:6] += 20  # AVA-like: most votes in the middle
    p = counts / counts.sum(1, keepdims=True)
    score = p @ np.arange(1, 11)
    score = np.round(score * 4) / 4  # quarter steps: ties in the ground truth
    image_id = np.arange(1000, 1000 + ratios.size, dtype=np.int64)
    return pd.DataFrame({
        "image_id": image_id,
        "uri": [f"s3://ava/images/{i}.jpg" for i in image_id],
        "split": ["test"] * n_test + ["val"] * n_val,
        "rating_counts": list(counts),
        "n_ratings": counts.sum(1).astype(np.int32),
        "score_mean": score,
        "score_std": np.sqrt(((np.arange(1, 11) - score[:, None]) ** 2 * p).sum(1)),
        "width": width,
        "height": np.round(width * ratios).astype(np.int32),
        "aspect_ratio": ratios,
        "aspect_bin": ["x"] * ratios.size,  # deliberately wrong: the queries bin by aspect_ratio
        "semantic_tags": [[1, 2]] * ratios.size,
        "challenge_id": np.full(ratios.size, 7, dtype=np.int32),
    })


def _prediction_rows(manifest: pd.DataFrame, rng: np.random.Generator, model: str, patch_mode: str,
                     n_patches: int, noise: float, date: str, hour: int, ids: np.ndarray) -> pd.DataFrame:
    true = manifest.set_index("image_id").loc[ids, "score_mean"].to_numpy()
    ratio = manifest.set_index("image_id").loc[ids, "aspect_ratio"].to_numpy()
    # Error grows with distance from 2:3 for NIMA (warping hurts unusual ratios), less for MPEMD.
    score = true + rng.normal(0, noise, ids.size) + (0.3 if model == "nima" else 0.05) * np.abs(ratio - 0.67)
    score = np.round(score, 1)  # ties in the predictions too
    dist = np.full((ids.size, 10), 0.1, dtype=np.float32)
    return pd.DataFrame({
        "uri": [f"s3://ava/images/{i}.jpg" for i in ids],
        "image_id": ids.astype(np.int64),
        "model": model,
        "patch_mode": patch_mode,
        "n_patches": np.int32(n_patches),
        "dist": list(dist),
        "score": score,
        "score_std": np.full(ids.size, 1.4),
        "width": np.int32(1000),
        "height": np.int32(700),
        "aspect_ratio": ratio,
        "source_etag": [f"etag-{i}" for i in ids],
        "scored_at": pd.Timestamp(f"{date}T{hour:02d}:00:00", tz="UTC"),
        "status": "ok",
        "error": None,
    })


def prediction_frames(manifest: pd.DataFrame, seed: int = 1) -> dict[tuple[str, str], pd.DataFrame]:
    """``{(model_version, date): rows}`` of every prediction file."""
    rng = np.random.default_rng(seed)
    ids = manifest["image_id"].to_numpy()
    d1, d2 = DATES
    nima1 = _prediction_rows(manifest, rng, "nima", "warp", 1, 0.5, d1, 1, ids)
    # Re-scored on day 2 (a changed file): these rows must replace day 1's.
    rescored = ids[::5]
    nima2 = _prediction_rows(manifest, rng, "nima", "warp", 1, 0.5, d2, 1, rescored)
    # Two errors (no score) and two images outside AVA (no image_id).
    errors = nima1.iloc[:2].copy()
    errors[["status", "error", "score"]] = ["error", "decode: truncated JPEG", None]
    errors["scored_at"] = pd.Timestamp(f"{d2}T03:00:00", tz="UTC")
    outside = _prediction_rows(manifest, rng, "nima", "warp", 1, 0.5, d2, 2, ids[:2])
    outside["image_id"] = pd.array([None, None], dtype="Int64")
    outside["uri"] = ["s3://bucket/a.jpg", "s3://bucket/b.jpg"]
    grid = _prediction_rows(manifest, rng, "mpemd", "grid", 8, 0.3, d1, 4, ids)
    random = _prediction_rows(manifest, rng, "mpemd", "random", 8, 0.9, d1, 5, ids[::2])
    return {
        (NIMA_VERSION, d1): nima1,
        (NIMA_VERSION, d2): pd.concat([nima2, errors, outside], ignore_index=True),
        (MPEMD_VERSION, d1): pd.concat([grid, random], ignore_index=True),
    }


_PRED_SCHEMA = pa.schema([
    ("uri", pa.string()), ("image_id", pa.int64()), ("model", pa.string()), ("patch_mode", pa.string()),
    ("n_patches", pa.int32()), ("dist", pa.list_(pa.float32(), 10)), ("score", pa.float64()),
    ("score_std", pa.float64()), ("width", pa.int32()), ("height", pa.int32()),
    ("aspect_ratio", pa.float64()), ("source_etag", pa.string()),
    ("scored_at", pa.timestamp("us", tz="UTC")), ("status", pa.string()), ("error", pa.string()),
])
_MANIFEST_SCHEMA = pa.schema([
    ("image_id", pa.int64()), ("uri", pa.string()), ("split", pa.string()),
    ("rating_counts", pa.list_(pa.int32(), 10)), ("n_ratings", pa.int32()), ("score_mean", pa.float64()),
    ("score_std", pa.float64()), ("width", pa.int32()), ("height", pa.int32()),
    ("aspect_ratio", pa.float64()), ("aspect_bin", pa.string()), ("semantic_tags", pa.list_(pa.int32())),
    ("challenge_id", pa.int32()),
])


def write_root(root: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Write the fixture under ``root`` (any fsspec URL); returns (manifest, all prediction rows)."""
    manifest = manifest_frame()
    for split, rows in manifest.groupby("split"):
        table = pa.Table.from_pandas(rows, schema=_MANIFEST_SCHEMA, preserve_index=False)
        storage.write_parquet_atomic(table, storage.join(root, "manifests", f"{split}.parquet"))
    rejected = pa.table({"image_id": [1], "uri": ["s3://ava/images/1.jpg"], "stage": ["decode"],
                         "reason": ["not an image"]})
    storage.write_parquet_atomic(rejected, storage.join(root, "manifests", "rejected.parquet"))
    frames = prediction_frames(manifest)
    for (version, date), rows in frames.items():
        table = pa.Table.from_pandas(rows, schema=_PRED_SCHEMA, preserve_index=False)
        url = storage.join(root, "predictions", f"model_version={version}", f"date={date}", "part-0.parquet")
        storage.write_parquet_atomic(table, url)
    predictions = pd.concat(
        [f.assign(model_version=v, date=dt.date.fromisoformat(d)) for (v, d), f in frames.items()],
        ignore_index=True)
    return manifest, predictions


# ---------------------------------------------------------------------------------------------
# Answers computed with pandas / numpy / scipy (no DuckDB)


def expected_set(manifest: pd.DataFrame, predictions: pd.DataFrame, version: str, model: str | None = None,
                 patch_mode: str | None = None, split: str | None = "test") -> pd.DataFrame:
    """The latest ok row per image of one prediction set, joined to its truth (pred, true, ratio)."""
    p = predictions[(predictions.model_version == version) & (predictions.status == "ok")]
    if model is not None:
        p = p[p.model == model]
    if patch_mode is not None:
        p = p[p.patch_mode == patch_mode]
    p = p.dropna(subset=["image_id"]).sort_values("scored_at").groupby("image_id").tail(1)
    p = p.astype({"image_id": "int64"})
    m = manifest if split is None else manifest[manifest.split == split]
    return p.merge(m[["image_id", "score_mean", "aspect_ratio"]], on="image_id", suffixes=("_pred", ""))


def bin_labels_of(ratios: np.ndarray, edges=ASPECT_BIN_EDGES) -> np.ndarray:
    cut = pd.cut(ratios, bins=list(edges), right=False, labels=aspect_bin_labels(edges))
    return np.asarray(cut.astype(object))


def metrics(pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    pred, true = np.asarray(pred, dtype=np.float64), np.asarray(true, dtype=np.float64)
    n = len(pred)
    out = {"n": n, "mae": math.nan, "mse": math.nan, "lcc": math.nan, "srcc": math.nan, "accuracy": math.nan}
    if n == 0:
        return out
    out["mae"] = float(np.mean(np.abs(pred - true)))
    out["mse"] = float(np.mean((pred - true) ** 2))
    out["accuracy"] = float(np.mean((pred > 5) == (true > 5)))
    if n >= 2 and np.ptp(pred) > 0 and np.ptp(true) > 0:
        out["lcc"] = float(stats.pearsonr(pred, true)[0])
        out["srcc"] = float(stats.spearmanr(pred, true)[0])
    return out


def choose_branches(connection) -> None:
    """Define ``connection``'s chooser macros for its variables, as ``sql.connect`` does."""
    read_plan.drop_unchosen_branches(connection, sql.load_query(sql.VIEWS_FILE).text)


def use_split_filter(connection, split_filter: str) -> None:
    """Make ``connection``'s scored() pick each split's images at the scan too (``"at the scan"``), or
    by the join alone (``"join only"``), whatever the manifests' sizes chose."""
    connection.execute("SET VARIABLE prefiltered_splits = $s::VARCHAR[]",
                       {"s": ["train", "val", "test"] if split_filter == "at the scan" else []})
    choose_branches(connection)  # the macros then take the branch the variables say


def use_plan(connection, plan: str, version: str | None = "v1") -> None:
    """Make ``connection`` read ``version`` (None: every version) by ``plan``, whatever its file sizes chose."""
    ((stored,),) = connection.execute("SELECT getvariable('prediction_versions')").fetchall()
    versions = stored if version is None else [version]
    connection.execute("SET VARIABLE one_pass_versions = $v::VARCHAR[]",
                       {"v": versions if plan == "latest_by_key" else []})
    choose_branches(connection)
