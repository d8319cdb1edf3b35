"""How the views of sql/views.sql read a root's prediction files: with ``union_by_name`` or without
(``shares_one_schema``), which plan ``prediction_set_of_images`` takes for each model version, and for
which splits ``scored`` keeps only the split's images at the scan (``small_splits``); and, once a
connection knows those, its chooser macros without the branches it never takes (``drop_unchosen_branches``).

``latest_by_place`` keeps fixed-size states per image and settles the rare images with two rows at
their latest time in a second scan of the files holding them; ``latest_by_key`` keeps the whole key
per image and scans once. Over big files the second scan is cheap and the key costs a quarter more
CPU and memory; over thousands of small files (a scoring run's shards, left uncompacted) the second
scan opens most files again at ~0.28 ms each, more than the key costs. The files' sizes decide.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Sequence

import duckdb
import fsspec

from tasks.core import storage
from tasks.scoring.layout import partition_of, schema_recorded

# A version whose prediction files average under this many bytes is read in one pass (latest_by_key).
# The key costs ~0.05 us a row more, the tie pass up to ~0.28 ms a file: one pass wins under ~5,000
# rows a file, ~15-100 bytes a row compressed. mpemd score's shard of 1,000 images is ~100 KB
# (bench_sql's ~20 KB); the 10^6-row history's 40 files of 25,000 rows, 364 KB each, cost +12% CPU in
# one pass (0.21 -> 0.235 s).
SMALL_FILE_BYTES = 256 * 2**10
# ... and whose files add up to at most the memory limit over this: the key's aggregate holds ~290 bytes
# an image, ~18x the densest rows on disk (bench_sql's, 16 bytes), and past about half the limit DuckDB
# slows it. bench_sql's shards under a 4 GB limit: one pass 5.3-5.5 s against 6.5-6.7 at 121 MB (7.5 M
# rows), 9.8-10.1 s against 8.4-8.8 at 161 MB (10 M rows; under the default 11.2 GiB: 6.9 against 8.0-8.7).
MEMORY_PER_FILE_BYTE = 40
# A split whose manifest file holds at most this share of all the manifests' bytes has its images picked
# at the predictions' scan, before the latest row per image is found (a semi join DuckDB pushes into the
# scan), not only by the join after it. bench_sql at 5 M rows: the val split (10% of the images)
# 1.33-1.35 -> 0.82-0.89 s; the test split (90%) 2.31-2.47 -> 2.88-2.95 s, so big splits keep the join alone.
SMALL_SPLIT_SHARE = 0.5
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def file_sizes(fs: fsspec.AbstractFileSystem, files: Sequence[str]) -> dict[str, int]:
    """The size of each of ``files`` (keys as given), from one listing of each folder they lie in
    (on an object store the listing cache the recursive listing filled: no request)."""
    wanted = {fs._strip_protocol(f): f for f in files}
    sizes: dict[str, int] = {}
    for folder in sorted({posixpath.dirname(p) for p in wanted}):
        try:
            entries = fs.ls(folder, detail=True)
        except FileNotFoundError:  # gone since the listing: its files' opens will say so
            continue
        for entry in entries:
            name = fs._strip_protocol(entry["name"])
            if name in wanted and entry.get("size") is not None:
                sizes[wanted[name]] = int(entry["size"])
    return sizes


def memory_limit_bytes(con: duckdb.DuckDBPyConnection) -> int:
    """DuckDB's memory limit in bytes (it reads the setting back as e.g. ``3.7 GiB``); 0 where the
    text is not understood (then no version is read in one pass, the plan that holds less)."""
    ((text,),) = con.execute("SELECT current_setting('memory_limit')").fetchall()
    try:
        number, unit = str(text).split()
        return int(float(number) * _UNITS[unit.upper()])
    except (ValueError, KeyError):
        return 0


def one_pass_versions(fs: fsspec.AbstractFileSystem, files: Sequence[str],
                      small_file_bytes: int = SMALL_FILE_BYTES, max_bytes: int | None = None) -> list[str]:
    """The model versions of ``files`` (prediction files) whose files average under ``small_file_bytes``
    and, with ``max_bytes``, add up to at most that."""
    sizes = file_sizes(fs, files)
    totals: dict[str, list[int]] = {}
    for path in files:
        partition = partition_of(path)
        if partition and path in sizes:
            count_and_bytes = totals.setdefault(partition[0], [0, 0])
            count_and_bytes[0] += 1
            count_and_bytes[1] += sizes[path]
    return sorted(v for v, (count, total) in totals.items()
                  if total < small_file_bytes * count and (max_bytes is None or total <= max_bytes))


def small_splits(fs: fsspec.AbstractFileSystem, manifest_files: Sequence[str],
                 share: float = SMALL_SPLIT_SHARE) -> list[str]:
    """The splits (a manifest file's name: ``<split>.parquet``) whose file holds at most ``share`` of
    the bytes of all ``manifest_files``, from the listing (no file is opened). Bytes stand in for rows:
    every manifest has one schema. A mislabelled file costs speed only: the scan's filter is the same
    condition as the join on the split."""
    sizes = file_sizes(fs, manifest_files)
    total = sum(sizes.values())
    return sorted(posixpath.basename(f).removesuffix(".parquet") for f, size in sizes.items()
                  if len(sizes) > 1 and size <= share * total)


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


def declare(con: duckdb.DuckDBPyConnection, root: str, files: Sequence[str],
            manifest_files: Sequence[str] = ()) -> None:
    """Set the connection's ``prediction_union``, ``one_pass_versions`` and ``prefiltered_splits``
    (views.sql) for the prediction ``files`` and the ``manifest_files`` of ``root``."""
    # One schema in every prediction file (what write_part writes): DuckDB may skip union_by_name.
    con.execute("SET VARIABLE prediction_union = $u", {"u": not shares_one_schema(con, root, files)})
    fs = storage.filesystem(root)[0]
    versions = one_pass_versions(fs, files, max_bytes=memory_limit_bytes(con) // MEMORY_PER_FILE_BYTE) if files else []
    con.execute("SET VARIABLE one_pass_versions = $v::VARCHAR[]", {"v": versions})
    con.execute("SET VARIABLE prefiltered_splits = $s::VARCHAR[]", {"s": small_splits(fs, manifest_files)})


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
