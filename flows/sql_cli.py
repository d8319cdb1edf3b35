"""``mpemd sql``: run one query file of ``sql/`` over a data root and print the answer.

    mpemd sql --list
    mpemd sql errors_by_aspect_bin --root s3://bucket/ava --param model_version=3f2a --format table

Values given with ``--param k=v`` are bound by DuckDB as the file's declared types, never pasted
into the SQL. Tables go to stdout (``parquet`` as bytes, for ``> out.parquet``); errors to stderr.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from model.aspect_bins import ASPECT_BIN_EDGES, parse_edges
from tasks.core.cli_values import parse_key_values

if TYPE_CHECKING:  # DuckDB loads when a query runs, not for the parser; pyarrow only for --format parquet
    import pyarrow as pa

    from tasks.analysis import sql

FORMATS = ("table", "csv", "parquet", "json")


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="query file name (without .sql); see --list")
    p.add_argument("--list", action="store_true", help="list the queries, their purpose and parameters")
    p.add_argument("--root", default=os.environ.get("MPEMD_ROOT", "data"),
                   help="data root holding manifests/ and predictions/ (local path or URL; default "
                        "$MPEMD_ROOT or ./data)")
    p.add_argument("--param", action="append", default=[], metavar="K=V",
                   help="a query parameter (repeatable); NULL for SQL NULL")
    p.add_argument("--format", choices=FORMATS, default="table", help="output format (default table)")
    p.add_argument("--bins", default=None, metavar="EDGES",
                   help="aspect-ratio bin edges, comma separated (default: METHOD.md's "
                        f"{','.join(str(e) for e in ASPECT_BIN_EDGES)})")
    p.add_argument("--httpfs", action="store_true",
                   help="read s3:// with DuckDB's httpfs if it is already installed (default: fsspec)")


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("sql", help="run a DuckDB question of sql/ over a data root",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(p)
    p.set_defaults(func=run)


def format_listing(queries: list[sql.SqlQuery]) -> str:
    width = max(len(q.name) for q in queries)
    lines = []
    for q in queries:
        lines.append(f"{q.name:<{width}}  {q.purpose}")
        if q.params:
            params = ", ".join(p.name + (" (required)" if p.required else f"={'NULL' if p.default is None else p.default}")
                               for p in q.params)
            lines.append(f"{'':<{width}}    params: {params}")
    return "\n".join(lines)


@dataclass(frozen=True)
class Rows:
    """A query's answer as plain Python rows (``tasks.analysis.sql.run_query_rows``): printing it as a table,
    CSV or JSON needs no pyarrow, whose import (with numpy's) was ~4% of a 5 M-row ``mpemd sql``."""

    names: list[str]
    types: list[str]  # DuckDB's type names
    rows: list[tuple]

    @classmethod
    def from_arrow(cls, table: pa.Table) -> Rows:
        columns = [column.to_pylist() for column in table.columns]
        return cls(table.column_names, [str(t) for t in table.schema.types], list(zip(*columns, strict=True)))


# Type names that print right-aligned: DuckDB's (upper case) and Arrow's (lower case, via from_arrow).
_NUMERIC_TYPES = ("TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT", "UTINYINT", "USMALLINT", "UINTEGER",
                  "UBIGINT", "UHUGEINT", "FLOAT", "DOUBLE", "DECIMAL", "int", "uint", "float", "double", "decimal",
                  "halffloat")


def _is_numeric(type_name: str) -> bool:
    return type_name.startswith(_NUMERIC_TYPES)


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "NULL"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e6 else f"{value:.4g}"
    return str(value)


def format_table(result: Rows) -> str:
    """An aligned text table: numbers right, text left, every line the same width."""
    columns = [[_cell(row[i]) for row in result.rows] for i in range(len(result.names))]
    numeric = [_is_numeric(t) for t in result.types]
    widths = [max([len(n), *map(len, col)]) for n, col in zip(result.names, columns, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if num else c.ljust(w)
                         for c, w, num in zip(cells, widths, numeric, strict=True))

    lines = [line(result.names), line(["-" * w for w in widths])]
    lines += [line([col[i] for col in columns]) for i in range(len(result.rows))]
    return "\n".join(lines)


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dt.date | dt.datetime):
        return value.isoformat()
    return value


def _csv_cell(value: Any) -> str:
    """One CSV field as pyarrow's CSV writer wrote it: text quoted, NULL empty, floats shortest."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        text = repr(value)
        return text[:-2] if text.endswith(".0") else text
    if isinstance(value, int):
        return str(value)
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%fZ")
        return value.strftime("%Y-%m-%d %H:%M:%S.%f")
    if isinstance(value, dt.date):
        return value.isoformat()
    return '"' + str(value).replace('"', '""') + '"'


def format_csv(result: Rows) -> str:
    lines = [",".join(_csv_cell(name) for name in result.names)]
    lines += [",".join(_csv_cell(v) for v in row) for row in result.rows]
    return "\n".join(lines) + "\n"


def write_result(result: Rows | pa.Table, fmt: str, out: Any = None) -> None:
    """Write a query's answer to ``out`` (default stdout) as ``fmt`` (parquet: an Arrow table)."""
    out = out or sys.stdout
    if fmt == "parquet":
        import pyarrow.parquet as pq

        buffer = io.BytesIO()
        pq.write_table(result, buffer)
        out.flush()
        out.buffer.write(buffer.getvalue())
        out.buffer.flush()
        return
    if not isinstance(result, Rows):
        result = Rows.from_arrow(result)
    if fmt == "table":
        out.write(format_table(result) + "\n")
    elif fmt == "csv":
        out.write(format_csv(result))
    elif fmt == "json":
        rows = [{k: _json_value(v) for k, v in zip(result.names, r, strict=True)} for r in result.rows]
        out.write(json.dumps(rows, indent=1, default=str) + "\n")
    else:
        raise ValueError(f"unknown format {fmt!r}")


def run(args: argparse.Namespace, *, close: bool = True) -> int:
    """Run the command ``args`` names. ``close=False`` leaves the connection to the process's end
    (``flows.launch.end_now``)."""
    from tasks.analysis import sql
    from tasks.core import storage
    from tasks.core.errors import NEVER_RETRIED, UserError, error_line, missing_path

    if args.list:
        print(format_listing(sql.list_queries()))
        return 0
    if not args.name:
        print("mpemd: error: name a query (see mpemd sql --list)", file=sys.stderr)
        return 2
    try:
        query = sql.load_query(args.name)
        params = query.bind(parse_key_values(args.param)) if args.name != sql.VIEWS_FILE else {}
        edges = parse_edges(args.bins) if args.bins else ASPECT_BIN_EDGES
        sql.check_bin_edges(edges)  # validates the edges before any I/O
    except ValueError as e:
        print(f"mpemd: error: {e}", file=sys.stderr)
        return 2
    try:
        if not storage.exists(args.root):  # a mistyped root: say so, not "no predictions"
            raise missing_path("data root", args.root)
        con = sql.connect(args.root, edges, use_httpfs=args.httpfs)
    except NEVER_RETRIED as e:  # a root that is not there or not readable: one line, as `mpemd` prints
        print(f"mpemd: error: {error_line(e)}", file=sys.stderr)
        return 2
    try:
        sql.check_versions(con, params)  # an unknown version is an error, not an all-NULL table
        # Arrow only where the output is Parquet; the other formats print Python rows.
        answer = (sql.run_query(con, args.name, params) if args.format == "parquet"
                  else Rows(*sql.run_query_rows(con, args.name, params)))
    except UserError as e:
        print(f"mpemd: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # DuckDB's errors name the problem; show them without a traceback
        print(f"mpemd: error: {args.name} failed: {e}", file=sys.stderr)
        return 1
    finally:
        if close:
            con.close()
    write_result(answer, args.format)
    return 0


def main(argv: list[str] | None = None, *, close: bool = True) -> int:
    """``mpemd sql`` on its own (tests, ``python -m flows.sql_cli``)."""
    parser = argparse.ArgumentParser(prog="mpemd sql", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(parser)
    return run(parser.parse_args(argv), close=close)


if __name__ == "__main__":
    sys.exit(main())
