"""The connection's CASE-chain bin lookup counts what views.sql's lambda counts, for any bins."""

from __future__ import annotations

import math

import duckdb
import numpy as np
import pytest

from model.aspect_bins import ASPECT_BIN_EDGES
from tasks.analysis import sql
from tasks.analysis.bin_lookup import bin_position_sql

LAMBDA = ("CREATE OR REPLACE MACRO bin_position(ratio) AS "
          "len(list_filter((SELECT list(lo ORDER BY lo) FROM aspect_bins), lambda edge: edge <= ratio))")


@pytest.mark.parametrize("edges", [ASPECT_BIN_EDGES, (0.0, 0.7, 1.0, math.inf), (-math.inf, 1.0, 2.0),
                                   (0.5, 0.75)])
def test_the_case_chain_counts_the_lower_edges_at_or_below_a_ratio_as_the_lambda_does(edges):
    con = duckdb.connect()
    sql.set_aspect_bins(con, edges)
    rng = np.random.default_rng(0)
    finite = [e for e in edges if math.isfinite(e)]
    ratios = [*rng.uniform(-1, 3, 500), *finite, *(np.nextafter(e, -np.inf) for e in finite),
              *(np.nextafter(e, np.inf) for e in finite), math.inf, -math.inf, math.nan, None]
    con.execute("CREATE TABLE r AS SELECT unnest($r::DOUBLE[]) AS ratio", {"r": ratios})
    query = "SELECT ratio, bin_position(ratio) FROM r ORDER BY ratio NULLS LAST"
    con.execute(LAMBDA)
    want = con.execute(query).fetchall()
    con.execute(bin_position_sql(edges))
    got = con.execute(query).fetchall()
    assert len(got) == len(ratios) and [p for _, p in got] == [p for _, p in want]  # same order (NaN != NaN)
    assert {position for _, position in got} == set(range(len(edges)))  # every count, 0 .. edges-1


def test_connections_use_the_case_chain_and_their_queries_see_it(tmp_path):
    con = sql.connect(str(tmp_path), bin_edges=(0.0, 0.7, 1.0, math.inf), threads=1)
    try:
        ((definition,),) = con.execute("SELECT macro_definition FROM duckdb_functions() "
                                       "WHERE function_name = 'bin_position'").fetchall()
        assert "CASE" in definition and "list_filter" not in definition
        assert con.execute("SELECT bin_position(0.8), bin_position(5.0), bin_position(-1.0)").fetchone() == (2, 3, 0)
    finally:
        con.close()
