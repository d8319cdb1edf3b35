"""``mpemd sql``: run one query file of ``sql/`` over a data root and print the answer.

    mpemd sql --list
    mpemd sql errors_by_aspect_bin --root s3://bucket/ava --param model_version=3f2a --format table

Values given with ``--param k=v`` are bound by DuckDB as the file's declared types, never pasted
into the SQL. DuckDB writes the answer itself, to stdout or ``--out FILE``: ``COPY ... TO`` as CSV,
JSON or Parquet, its own table rendering for ``table``; errors go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from flows import signals
from model.aspect_bins import ASPECT_BIN_EDGES, parse_edges
from tasks.core.cli_args import (
    CliSpec,
    HelpFormatter,
    ParameterError,
    Parser,
    add_model_arguments,
    model_from_args,
)

if TYPE_CHECKING:  # DuckDB loads when a query runs, not for the parser
    from collections.abc import Sequence

    import duckdb

    from tasks.analysis import sql


def _about(text: str) -> dict[str, str]:
    return {"description": text}


@dataclass(frozen=True)
class SqlParams:
    """``mpemd sql``'s settings; its command line is generated from them as every ``mpemd`` command's.
    A dataclass, not a pydantic model: pydantic was ~0.06 CPU-s of every call (docs/performance.md)."""

    name: str | None = field(default=None, metadata=_about("query file name (without .sql); see --list"))
    list_queries: bool = field(default=False, metadata=_about("list the queries, their purpose and parameters"))
    root: str = field(default_factory=lambda: os.environ.get("MPEMD_ROOT", "data"),
                      metadata=_about("data root holding manifests/ and predictions/ (local path or URL; "
                                      "$MPEMD_ROOT or ./data)"))
    param: dict[str, str] = field(default_factory=dict, metadata=_about("a query parameter K=V (repeatable); "
                                                                       "NULL for SQL NULL"))
    format: Literal["table", "csv", "parquet", "json"] = field(default="table", metadata=_about("output format"))
    out: str | None = field(default=None, metadata=_about("write the answer to this file instead of stdout"))
    bins: str | None = field(default=None, metadata=_about(
        "aspect-ratio bin edges, comma separated (default: METHOD.md's "
        f"{','.join(str(e) for e in ASPECT_BIN_EDGES)})"))
    httpfs: bool = field(default=False, metadata=_about("read s3:// with DuckDB's httpfs if it is already installed "
                                                        "(default: fsspec)"))


SQL_CLI = CliSpec(positional=("name",), flags={"list_queries": "--list"})


def _add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, SqlParams, SQL_CLI)


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("sql", help="run a DuckDB question of sql/ over a data root",
                              description=__doc__, formatter_class=HelpFormatter)
    _add_arguments(p)
    p.set_defaults(func=run)


def _params(args: argparse.Namespace) -> SqlParams:
    try:
        return model_from_args(args, SqlParams, SQL_CLI)
    except ParameterError as e:
        raise ValueError(str(e)) from None


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


def print_table(relation: duckdb.DuckDBPyRelation) -> None:
    """DuckDB's own table rendering, every row and column whole (its defaults elide to fit a screen)."""
    big = 2**31 - 1
    relation.show(max_width=big, max_rows=big, max_col_width=big)


def write_answer(con: duckdb.DuckDBPyConnection, query: sql.SqlQuery, params: dict[str, Any], fmt: str,
                 out: str | None) -> None:
    """The answer as ``fmt``, written by DuckDB itself (``COPY ... TO``, its table rendering) to
    ``out`` or stdout."""
    from tasks.analysis import sql

    text, params = sql.statement(con, query, params)
    text = text.strip().rstrip(";")
    if fmt == "table":
        with open(out, "w") if out else contextlib.nullcontext(sys.stdout) as file, contextlib.redirect_stdout(file):
            print_table(con.sql(text, params=params))
        return
    options = {"csv": "FORMAT csv, HEADER", "json": "FORMAT json, ARRAY true", "parquet": "FORMAT parquet"}[fmt]
    target = out or "/dev/stdout"
    sys.stdout.flush()  # what Python printed goes first
    con.execute(f"COPY (\n{text}\n) TO '{target.replace(chr(39), chr(39) * 2)}' ({options})", params)


# A version read from this many shard files, more than SHARDS_PER_DATE a date partition, gets a note:
# DuckDB pays ~0.15 ms a file a scan (5,008 files of 5 M rows: 2x the CPU of the same rows compacted).
SHARD_NOTE_FILES = 500
SHARDS_PER_DATE = 4


def predictions_folder_of(path: str) -> str:
    """The folder holding a prediction file's ``model_version=<v>/`` folder."""
    return path.rsplit("/model_version=", 1)[0]


def root_notes(files: list[str], root: str) -> list[str]:
    """Notes on how ``root``'s prediction ``files`` were found and kept: a root read as the predictions
    folder itself (``tasks.scoring.layout.prediction_data_entries``), and each model version whose files
    are still shards (not compacted)."""
    from tasks.scoring.layout import partition_of

    notes = []
    if files and not predictions_folder_of(files[0]).endswith("/predictions"):
        notes.append(f"{root} has no predictions/ folder and holds model_version=<v>/ folders: read as the "
                     "predictions (a data root keeps them in predictions/, beside manifests/)")
    per_version: dict[str, tuple[int, set[str]]] = {}
    for path in files:
        if partition := partition_of(path):
            count, dates = per_version.get(partition[0], (0, set()))
            per_version[partition[0]] = (count + 1, dates | {partition[1]})
    return notes + [
        f"model_version={version} is {count:,} files in {len(dates)} date partition(s), not compacted: "
        f"`mpemd compact --out {predictions_folder_of(files[0])} --model-version {version}` merges each "
        "partition into one file, which queries read faster"
        for version, (count, dates) in sorted(per_version.items())
        if count >= SHARD_NOTE_FILES and count > SHARDS_PER_DATE * len(dates)]


def _stored_versions(error: ValueError, root: str) -> str:
    """For a missing ``*version`` parameter, the model versions ``root`` holds (to pick from)."""
    from tasks.analysis import sql
    from tasks.core import storage

    if not (isinstance(error, sql.MissingParameterError) and error.name.endswith("version")):
        return ""
    try:
        if not storage.exists(root):
            return f"; and data root {root} does not exist"
        versions = sorted({sql.version_of(f) for f in sql.data_files(root)["predictions"]} - {None})
    except Exception:  # the root is missing or unreadable: the query's own error says so once run
        return ""
    return f"; stored model versions: {', '.join(versions) if versions else 'none (run mpemd score first)'}"


def _connect(root: str, edges: Sequence[float], httpfs: bool) -> duckdb.DuckDBPyConnection | int:
    """A connection over ``root``, or the exit status after one line on stderr (a root that is not
    there or not readable)."""
    from tasks.analysis import sql
    from tasks.core import storage
    from tasks.core.errors import error_line, is_user_error, missing_path, unreachable_line

    try:
        if not storage.exists(root):  # a mistyped root: say so, not "no predictions"
            raise missing_path("data root", root)
        # no progress bar: DuckDB draws it on stdout, the answer's stream, wherever Python's __main__ has
        # no file (python -c, a REPL), so a CSV piped on would begin with it
        return sql.connect(root, edges, use_httpfs=httpfs, progress_bar=False)
    except Exception as e:
        signals.reraise_interrupt(e)  # Ctrl-C or SIGTERM while the views were set up
        if not is_user_error(e):
            if (line := unreachable_line(e)) is None:
                raise
            print(f"mpemd: error: {line}", file=sys.stderr)
            return 1
        print(f"mpemd: error: {error_line(e)}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace, *, close: bool = True) -> int:
    """Run the command ``args`` names. ``close=False`` leaves the connection to the process's end
    (``flows.launch.end_now``)."""
    from tasks.analysis import sql
    from tasks.core.errors import UserError

    try:
        settings = _params(args)
        if settings.list_queries:
            print(format_listing(sql.list_queries()))
            return 0
        if not settings.name:
            raise ValueError("name a query (see mpemd sql --list)")
        query = sql.load_query(settings.name)
        params = query.bind(settings.param) if settings.name != sql.VIEWS_FILE else {}
        edges = parse_edges(settings.bins) if settings.bins else ASPECT_BIN_EDGES
        sql.check_bin_edges(edges)  # validates the edges before any I/O
    except ValueError as e:
        root = getattr(args, "root", None) or os.environ.get("MPEMD_ROOT", "data")
        print(f"mpemd: error: {e}{_stored_versions(e, root)}", file=sys.stderr)
        return 2
    con = _connect(settings.root, edges, settings.httpfs)
    if isinstance(con, int):
        return con
    try:
        ((files,),) = con.execute("SELECT getvariable('prediction_files')").fetchall()
        for note in root_notes(files or [], settings.root):
            print(f"mpemd: note: {note}", file=sys.stderr)
        sql.check_versions(con, params)  # an unknown version is an error, not an all-NULL table
        write_answer(con, query, params, settings.format, settings.out)
    except UserError as e:
        print(f"mpemd: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # DuckDB's errors name the problem; show them without a traceback
        if "Broken pipe" in str(e):  # the reader left (| head): what it wanted was written
            return 0
        signals.reraise_interrupt(e)
        print(f"mpemd: error: {settings.name} failed: {e}", file=sys.stderr)
        return 1
    finally:
        if close:
            con.close()
    return 0


def main(argv: list[str] | None = None, *, close: bool = True) -> int:
    """``mpemd sql`` on its own (tests, ``python -m flows.sql_cli``)."""
    parser = Parser(prog="mpemd sql", description=__doc__, formatter_class=HelpFormatter)
    _add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args, close=close)
    except KeyboardInterrupt as interrupt:  # Ctrl-C, or SIGTERM (flows.signals.Terminated)
        return signals.exit_status(interrupt)


if __name__ == "__main__":
    sys.exit(main())
