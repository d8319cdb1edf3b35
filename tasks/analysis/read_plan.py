"""How the views of sql/views.sql read a root's prediction files: with ``union_by_name`` or without
(``shares_one_schema``).
"""

from __future__ import annotations

from collections.abc import Sequence

import duckdb

from tasks.core import storage
from tasks.scoring.layout import SCHEMA_RECORD


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
    # (the record's existence first: its comparison imports pyarrow, which `mpemd sql` otherwise skips)
    if all(storage.exists(storage.join(v, SCHEMA_RECORD)) for v in versions):
        from tasks.scoring.predictions import schema_recorded

        if all(schema_recorded(*storage.filesystem(v)) for v in versions):
            return True
    if storage.protocol_of(root) != "file":
        return False
    ((schemas,),) = con.execute(
        "SELECT count(DISTINCT columns) FROM (SELECT list((name, duckdb_type) ORDER BY column_id) AS columns "
        "FROM parquet_schema($files) WHERE column_id > 0 GROUP BY file_name)", {"files": list(paths)}).fetchall()
    return schemas == 1


def declare(con: duckdb.DuckDBPyConnection, root: str, files: Sequence[str]) -> None:
    """Set the connection's ``prediction_union`` (views.sql) for the prediction ``files`` of ``root``."""
    # One schema in every prediction file (what write_part writes): DuckDB may skip union_by_name.
    con.execute("SET VARIABLE prediction_union = $u", {"u": not shares_one_schema(con, root, files)})
