"""``sql/bootstrap.sql`` with its resamples in batches, so its memory does not grow with images x resamples.

The file computes every resample at once: test images x (n_resamples + 1) drawn rows, materialized
and sorted twice per resample for the SRCC ranks, which met a 4 GB DuckDB limit past 10^6 rows of
history and bent its cost curve (docs/performance.md). Here the same macros of ``sql/views.sql`` run
in steps: the pairs once into a temporary table, then ``bootstrap_statistics`` over a range of
resamples at a time (at most ``MPEMD_BOOTSTRAP_DRAWS`` drawn rows, at least one resample), appended
to a second temporary table, then ``bootstrap_intervals`` over both. A resample's draws depend on
(seed, resample, draw) only, so the answer is the file's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import duckdb

DRAWS_ENV = "MPEMD_BOOTSTRAP_DRAWS"
# ~1 GB of DuckDB buffers at ~100 bytes a drawn row (its columns and the two sorts' keys): a batch
# stays far inside a 4 GB limit, and is large enough that the per-batch overhead is small.
DEFAULT_DRAWS = 10_000_000
PAIRS_TABLE = "bootstrap_batch_pairs"
STATS_TABLE = "bootstrap_batch_stats"
PAIR_PARAMS = ("baseline_version", "baseline_model", "baseline_patch_mode", "baseline_n_patches",
               "candidate_version", "candidate_model", "candidate_patch_mode", "candidate_n_patches", "split")


def max_draws() -> int:
    """The drawn rows one batch may hold: ``MPEMD_BOOTSTRAP_DRAWS`` or ``DEFAULT_DRAWS``."""
    value = int(os.environ.get(DRAWS_ENV) or DEFAULT_DRAWS)
    if value < 1:
        raise ValueError(f"{DRAWS_ENV} must be >= 1, not {value}")
    return value


def resample_batches(n_images: int, n_resamples: int, draws: int) -> list[tuple[int, int]]:
    """Ranges [from, to) of resamples -1 (the data itself) .. n_resamples - 1, each of at most ``draws``
    drawn rows (``n_images`` a resample) and at least one resample."""
    step = max(1, draws // max(n_images, 1))
    return [(lo, min(lo + step, n_resamples)) for lo in range(-1, n_resamples, step)]


def prepare(con: duckdb.DuckDBPyConnection, params: Mapping[str, Any], draws: int | None = None
            ) -> tuple[str, dict[str, Any]]:
    """Compute every resample's statistics in batches into temporary tables (replacing those of an earlier
    call); the statement that answers from them and its parameters (``params``: bootstrap.sql's, bound).

    The tables live as long as the connection (the returned statement reads them when it is fetched)."""
    pairs_sql = ", ".join(f"${name}" for name in PAIR_PARAMS)
    con.execute(f"CREATE OR REPLACE TEMP TABLE {PAIRS_TABLE} AS FROM bootstrap_pairs({pairs_sql})",
                {name: params[name] for name in PAIR_PARAMS})
    ((n_images,),) = con.execute(f"SELECT count(*) FROM {PAIRS_TABLE}").fetchall()
    batches = resample_batches(n_images, params["n_resamples"], draws or max_draws())
    stats = f"FROM bootstrap_statistics('{PAIRS_TABLE}', $seed, $typical_bin, $lo, $hi)"
    for i, (lo, hi) in enumerate(batches):
        values = {"seed": params["seed"], "typical_bin": params["typical_bin"], "lo": lo, "hi": hi}
        if i == 0:  # the first batch makes the table (its column types are the file's)
            con.execute(f"CREATE OR REPLACE TEMP TABLE {STATS_TABLE} AS {stats}", values)
        else:
            con.execute(f"INSERT INTO {STATS_TABLE} {stats}", values)
    answer = f"FROM bootstrap_intervals('{PAIRS_TABLE}', '{STATS_TABLE}', $n_resamples, $level, $min_n)"
    return answer, {name: params[name] for name in ("n_resamples", "level", "min_n")}
