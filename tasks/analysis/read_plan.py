"""How the views of sql/views.sql read a root's prediction files: with ``union_by_name`` or without
(``shares_one_schema``), which plan ``prediction_set_of_images`` takes for each model version, and for
which splits ``scored`` keeps only the split's images at the scan (``small_splits``); and, once a
connection knows those, its chooser macros without the branches it never takes (``drop_unchosen_branches``).

``latest_by_place`` keeps fixed-size states per image and settles the rare images with two rows at
their latest time in a second scan of the files holding them; ``latest_by_key`` keeps the whole key
per image and scans once. Over big files the second scan is cheap and the key costs a quarter more
CPU and memory; over thousands of small files (a scoring run's shards, left uncompacted) the second
scan opens most files again at ~0.28 ms each, more than the key costs. The files' rows decide
(``version_sizes``: their bytes, and the rows per byte of a few footers).
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import duckdb

from tasks.core import storage
from tasks.scoring.layout import partition_of, schema_recorded

# A version whose prediction files average under this many rows is read in one pass (latest_by_key). The
# key costs ~0.05 us a row more, the tie pass ~0.28 ms a file (bench_sql's lean files) to ~0.45 ms (every
# column mpemd score writes): one pass wins under ~5,000-9,000 rows a file. mpemd score's shard is 1,000
# images; the 10^6-row history's 40 files of 25,000 rows cost +12% CPU in one pass (0.21 -> 0.235 s).
SMALL_FILE_ROWS = 8_192
# ... and whose rows are at most the memory limit over this many bytes: the key's aggregate holds ~290
# bytes an image, and past about half the limit DuckDB slows it. bench_sql's shards under a 4 GB limit:
# one pass 5.3-5.5 s against 6.5-6.7 at 7.5 M rows, 9.8-10.1 s against 8.4-8.8 at 10 M rows.
MEMORY_PER_ROW = 512
# Rows are the bytes a version's files add up to times the rows per byte of a few of them (FOOTERS_SAMPLED:
# the smallest, a middle and the largest), from their footers where the root is local (~0.3 ms each).
# Elsewhere, or where a footer cannot be read, bytes over BYTES_PER_ROW_GUESS, the densest rows on disk
# (bench_sql's; mpemd score's with every column are ~95 bytes a row): rows over-counted, the plan that
# holds less. Bytes alone took 5,008 shard files with every column (473 MB, 5 M rows) for 30 M rows, and
# their version for too big to read in one pass: 1 s more of a 6 s query.
FOOTERS_SAMPLED = 3
BYTES_PER_ROW_GUESS = 16
# A split whose manifest file holds at most this share of all the manifests' bytes has its images picked
# at the predictions' scan, before the latest row per image is found (a semi join DuckDB pushes into the
# scan), not only by the join after it. bench_sql at 5 M rows: the val split (10% of the images)
# 1.33-1.35 -> 0.82-0.89 s; the test split (90%) 2.31-2.47 -> 2.88-2.95 s, so big splits keep the join alone.
SMALL_SPLIT_SHARE = 0.5
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


@dataclass(frozen=True)
class VersionSize:
    """A model version's prediction files: how many, and about how many rows they hold."""

    files: int
    rows: float


def version_sizes(con: duckdb.DuckDBPyConnection, files: Sequence[str], sizes: Mapping[str, int],
                  sample: int = FOOTERS_SAMPLED) -> dict[str, VersionSize]:
    """Each model version of the prediction ``files`` whose sizes (``sizes``: bytes by path, from the
    listing) are known: its file count and estimated rows (see FOOTERS_SAMPLED)."""
    by_version: dict[str, list[str]] = {}
    for path in files:
        partition = partition_of(path)
        if partition and path in sizes:
            by_version.setdefault(partition[0], []).append(path)
    estimates = {}
    for version, paths in by_version.items():
        total = sum(sizes[p] for p in paths)
        per_byte = _rows_per_byte(con, sorted(paths, key=sizes.__getitem__), sizes, sample)
        estimates[version] = VersionSize(len(paths), total * per_byte)
    return estimates


def _rows_per_byte(con: duckdb.DuckDBPyConnection, by_size: list[str], sizes: Mapping[str, int], sample: int) -> float:
    """Rows per byte of the files ``by_size`` (sorted by size), from the footers of ``sample`` of them spread
    over that order where they are local files; 1 / BYTES_PER_ROW_GUESS otherwise."""
    picked = sorted({by_size[round(i * (len(by_size) - 1) / max(1, sample - 1))] for i in range(sample)})
    if not picked or any(storage.protocol_of(p) != "file" for p in picked) or not (read := sum(sizes[p] for p in picked)):
        return 1 / BYTES_PER_ROW_GUESS
    try:
        ((rows,),) = con.execute("SELECT sum(num_rows) FROM parquet_file_metadata($files)", {"files": picked}).fetchall()
    except duckdb.Error:  # not Parquet, or gone since the listing: the query will say so
        return 1 / BYTES_PER_ROW_GUESS
    return int(rows or 0) / read


def memory_limit_bytes(con: duckdb.DuckDBPyConnection) -> int:
    """DuckDB's memory limit in bytes (it reads the setting back as e.g. ``3.7 GiB``); 0 where the
    text is not understood (then no version is read in one pass, the plan that holds less)."""
    ((text,),) = con.execute("SELECT current_setting('memory_limit')").fetchall()
    try:
        number, unit = str(text).split()
        return int(float(number) * _UNITS[unit.upper()])
    except (ValueError, KeyError):
        return 0


def one_pass_versions(versions: Mapping[str, VersionSize], small_file_rows: int = SMALL_FILE_ROWS,
                      max_rows: float | None = None) -> list[str]:
    """The model versions (``version_sizes``) whose files average under ``small_file_rows`` rows and,
    with ``max_rows``, add up to at most that."""
    return sorted(v for v, size in versions.items()
                  if size.rows < small_file_rows * size.files and (max_rows is None or size.rows <= max_rows))


def small_splits(manifest_files: Sequence[str], sizes: Mapping[str, int], share: float = SMALL_SPLIT_SHARE) -> list[str]:
    """The splits (a manifest file's name: ``<split>.parquet``) whose file holds at most ``share`` of
    the bytes of all ``manifest_files`` (``sizes``: from the listing; no file is opened). Bytes stand in
    for rows: every manifest has one schema. A mislabelled file costs speed only: the scan's filter is
    the same condition as the join on the split."""
    known = {f: sizes[f] for f in manifest_files if f in sizes}
    total = sum(known.values())
    return sorted(posixpath.basename(f).removesuffix(".parquet") for f, size in known.items()
                  if len(known) > 1 and size <= share * total)


def shares_one_schema(con: duckdb.DuckDBPyConnection, root: str, paths: Sequence[str]) -> bool:
    """True when the local Parquet files ``paths`` all have the same columns and types, in order.

    Then DuckDB reads them without ``union_by_name``, which re-reads every file's schema at each bind
    (a query binds the predictions up to three times) and slows each scan. The schema record
    ``write_part`` leaves in each version folder answers without opening a file (remote: a request per
    footer, in series; 5,008 local shard files: 0.6 CPU-s). Else DuckDB reads the local footers here
    (its metadata cache keeps them for the query). Older files missing a column, and remote versions
    without a record, keep ``union_by_name``.
    """
    if not paths:
        return False
    versions = sorted({p.rsplit("/", 2)[0] for p in paths})
    if all(schema_recorded(*storage.filesystem(v)) for v in versions):
        return True
    if storage.protocol_of(root) != "file":
        return False
    ((schemas,),) = con.execute(
        "SELECT count(DISTINCT columns) FROM (SELECT list((name, duckdb_type) ORDER BY column_id) AS columns "
        "FROM parquet_schema($files) WHERE column_id > 0 GROUP BY file_name)", {"files": list(paths)}).fetchall()
    return schemas == 1


def declare(con: duckdb.DuckDBPyConnection, root: str, files: Sequence[str], manifest_files: Sequence[str] = (),
            sizes: Mapping[str, int] | None = None) -> bool:
    """Set the connection's ``prediction_union``, ``one_pass_versions`` and ``prefiltered_splits``
    (views.sql) for the prediction ``files`` and the ``manifest_files`` of ``root``, whose sizes in bytes
    ``sizes`` holds (``tasks.analysis.root_listing.list_root``; a file without one counts for neither plan).
    Returns ``prediction_union``: whether the views read the predictions with ``union_by_name``."""
    sizes = sizes or {}
    # One schema in every prediction file (what write_part writes): DuckDB may skip union_by_name.
    union = not shares_one_schema(con, root, files)
    con.execute("SET VARIABLE prediction_union = $u", {"u": union})
    one_pass = one_pass_versions(version_sizes(con, files, sizes), max_rows=memory_limit_bytes(con) / MEMORY_PER_ROW)
    con.execute("SET VARIABLE one_pass_versions = $v::VARCHAR[]", {"v": one_pass})
    con.execute("SET VARIABLE prefiltered_splits = $s::VARCHAR[]", {"s": small_splits(manifest_files, sizes)})
    return union


# The statements of views.sql's two choosers with one branch: the split never picked at the scan, and
# each plan of prediction_set_of_images.
_SCAN_ALL_IMAGES = ("CREATE OR REPLACE MACRO chosen_predictions(version, model_name, mode, patches, split_name := NULL) "
                    "AS TABLE SELECT * FROM ok_predictions(version, model_name, mode, patches)")
_ONE_PLAN = ("CREATE OR REPLACE MACRO prediction_set_of_images(version, model_name, mode, patches, split_name := NULL) "
             "AS TABLE SELECT * FROM {plan}(version, model_name, mode, patches, split_name := split_name)")
# What those statements name, which a views.sql must define for them to replace its own.
_CHOOSERS_AND_BRANCHES = ("chosen_predictions", "prediction_set_of_images", "ok_predictions", "latest_by_key",
                          "latest_by_place")
_MACRO_HEAD = re.compile(r"^CREATE OR REPLACE MACRO (\w+)\(", re.MULTILINE)
_macro_statements: dict[str, dict[str, str]] = {}  # a views.sql text -> its macros' statements


def _views_macros(con: duckdb.DuckDBPyConnection, views: str) -> dict[str, str]:
    """Each ``CREATE OR REPLACE MACRO`` statement of ``views`` (sql/views.sql's text) by macro name, as
    written there (its comments with it). Parsed once a process (~5 ms; through ``con``: the module's
    default connection would be made for it, ~30 ms more)."""
    if views not in _macro_statements:
        _macro_statements[views] = {match.group(1): statement.query for statement in con.extract_statements(views)
                                    if (match := _MACRO_HEAD.search(statement.query))}
    return _macro_statements[views]


def drop_unchosen_branches(con: duckdb.DuckDBPyConnection, views: str) -> None:
    """Define ``chosen_predictions`` and ``prediction_set_of_images`` on ``con`` without the branch its
    variables (``prefiltered_splits``, ``one_pass_versions`` of ``prediction_versions``) never take,
    or as ``views`` (the text of sql/views.sql, which made them) writes them where each branch may be
    taken. Same answers either way.

    DuckDB binds both branches of each UNION ALL before it folds the constant test away, and each bind
    of a branch binds a ``read_parquet`` of the version's files (a local file is stat'ed twice at each):
    errors_by_aspect_bin bound them 6 times. Over 5,008 shard files its bind took 0.33-0.37 s, 0.11 s with
    one branch of each. Call it again after changing those variables (views.sql leaves both branches)."""
    macros = _views_macros(con, views)
    if not all(macro in macros for macro in _CHOOSERS_AND_BRANCHES):
        return  # another views.sql (MPEMD_SQL_DIR, e.g. an older one): its definitions stay as it wrote them
    ((versions, one_pass, prefiltered),) = con.execute(
        "SELECT coalesce(getvariable('prediction_versions'), []::VARCHAR[]), "
        "coalesce(getvariable('one_pass_versions'), []::VARCHAR[]), "
        "coalesce(getvariable('prefiltered_splits'), []::VARCHAR[])").fetchall()
    # split_at_scan is false for every split: the branch with the semi join is never taken
    con.execute(macros["chosen_predictions"] if prefiltered else _SCAN_ALL_IMAGES)
    # a version not listed has no file: either plan answers nothing for it
    if versions and set(versions) <= set(one_pass):
        con.execute(_ONE_PLAN.format(plan="latest_by_key"))
    elif not set(versions) & set(one_pass):
        con.execute(_ONE_PLAN.format(plan="latest_by_place"))
    else:
        con.execute(macros["prediction_set_of_images"])
