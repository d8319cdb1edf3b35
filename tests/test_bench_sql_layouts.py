"""bench_sql's layouts hold the same rows, and errors_by_aspect_bin answers on each exactly as the plain
pandas computation does (issue 22: history rows in the same date= partition and files as the latest)."""

from __future__ import annotations

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest

from benchmarks import bench_sql
from tasks.analysis import sql
from tasks.core.schemas import PREDICTION_SCHEMA
from tasks.scoring.layout import schema_recorded


@pytest.mark.parametrize("layout", ["bench", "independent", "scored shards"])
def test_errors_by_aspect_bin_equals_the_exact_computation_on_each_layout(tmp_path, layout):
    workdir = tmp_path / "rows"
    bench_sql.generate(workdir, 20_000, history=0.2)
    root = {"independent": lambda: bench_sql.independent(workdir, file_rows=7_000),
            "scored shards": lambda: bench_sql.split_parts(workdir, 1_000, full_schema=True)}.get(layout, lambda: workdir)()
    files = sorted((root / "predictions").rglob("*.parquet"))
    if layout == "independent":  # every row in one date= partition, several files, the full schema
        assert {f.parent.name for f in files} == {"date=2024-01-01"} and len(files) == 3
        assert "dist" in pq.read_schema(files[0]).names
    if layout == "scored shards":  # as mpemd score --no-compact leaves them: every column, and the record
        assert len(files) >= 20 and all(pq.read_schema(f).equals(PREDICTION_SCHEMA) for f in files)
        assert schema_recorded(fsspec.filesystem("file"), str(root / "predictions" / f"model_version={bench_sql.VERSION}"))
        con = sql.connect(str(root), threads=1)
        try:  # so the reader knows the one schema without opening a footer
            assert con.execute("SELECT getvariable('prediction_union')").fetchall() == [(False,)]
        finally:
            con.close()
    assert sum(pq.ParquetFile(f).metadata.num_rows for f in files) == sum(
        pq.ParquetFile(f).metadata.num_rows for f in (workdir / "predictions").rglob("*.parquet"))
    duck = bench_sql.run_duckdb(root, threads=1)["rows"]
    exact = bench_sql.run_pandas(root)["rows"]
    for column in bench_sql.COLUMNS[1:]:
        np.testing.assert_allclose(duck[column].astype(float), exact[column].astype(float), rtol=1e-9, atol=1e-9,
                                   equal_nan=True, err_msg=column)
