"""The aspect-ratio bin lookup of a connection, written out for its own bins.

``sql/views.sql`` defines ``bin_position(ratio)`` for any ``aspect_bins`` table (the count of lower
edges <= ratio, by a lambda over the sorted edges), so the file also works from a plain ``duckdb``
shell. A lambda runs per row and builds a list per row: over the ~4.5 M manifest rows of a 5 M-row
``errors_by_aspect_bin`` that is ~0.2 CPU-s of ~4.8. A connection knows its edges, so it replaces the
macro by the same count as a CASE chain of comparisons, which DuckDB runs on whole vectors.
"""

from __future__ import annotations

from collections.abc import Sequence

import duckdb


def bin_position_sql(edges: Sequence[float]) -> str:
    """``CREATE MACRO bin_position(ratio)``: how many of the bins' lower edges (``edges[:-1]``) are
    <= ratio, as views.sql's lambda counts them (NULL -> 0; NaN, which DuckDB orders above every
    number, -> all of them)."""
    lows = sorted(float(edge) for edge in edges[:-1])
    # Highest edge first: the first edge the ratio reaches tells how many edges lie at or below it.
    whens = " ".join(f"WHEN ratio >= '{low!r}'::DOUBLE THEN {count}"
                     for count, low in sorted(enumerate(lows, start=1), reverse=True))
    return f"CREATE OR REPLACE MACRO bin_position(ratio) AS CASE {whens} ELSE 0 END"


def use_fast_bin_position(con: duckdb.DuckDBPyConnection, edges: Sequence[float]) -> None:
    """Replace views.sql's ``bin_position`` on ``con`` by the CASE chain of ``edges`` (after views.sql ran)."""
    con.execute(bin_position_sql(edges))
