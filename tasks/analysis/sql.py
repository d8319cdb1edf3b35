"""Run the DuckDB questions in ``sql/`` over a data root (a local folder or any fsspec URL).

``connect(root)`` opens an embedded DuckDB, lets it read the root through fsspec (s3fs for
``s3://``: DuckDB's own httpfs is downloaded at run time, so it is only used when asked for AND
already installed), fills the ``aspect_bins`` parameter table and runs ``sql/views.sql``.
``run_query(con, name, params)`` runs one file with its named parameters bound by DuckDB, never
formatted into the text.

Each query file starts with ``-- purpose: <one line>`` and declares its parameters, one a line::

    -- param: model_version VARCHAR (required) what it means
    -- param: limit BIGINT = 20  what it means

Where the files live: ``sql/`` at the top of the repository, beside ``tasks/``; it is also a
package (``sql/__init__.py``, packaged with its ``*.sql`` as package data), so an installed
``mpemd`` has the same sibling layout in site-packages. ``MPEMD_SQL_DIR`` points elsewhere.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import itertools
import logging
import os
import re
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb

from model.aspect_bins import ASPECT_BIN_EDGES, aspect_bin_labels
from model.thresholds import CONSTANT_RTOL
from tasks.analysis import bin_lookup, bootstrap_sql, duckdb_storage, read_plan
from tasks.analysis.root_listing import (  # noqa: F401  (data_files, list_root: their callers' names)
    data_files,
    list_root,
    list_root_entries,
    listed_sizes,
)
from tasks.core import scratch
from tasks.core.cli_values import parse_bool
from tasks.core.errors import UnknownChoiceError
from tasks.scoring.layout import partition_of

if TYPE_CHECKING:  # pyarrow (and the numpy it loads) only where a function needs it: not in mpemd sql
    import fsspec
    import pyarrow as pa

logger = logging.getLogger("mpemd")

VIEWS_FILE = "views"

_PURPOSE_RE = re.compile(r"^--\s*purpose:\s*(.+?)\s*$")
_PARAM_RE = re.compile(
    r"^--\s*param:\s*(?P<name>[A-Za-z_]\w*)\s+(?P<type>[A-Za-z]+)\s*"
    r"(?:\((?P<required>required)\)|=\s*(?P<default>'[^']*'|\S+))?\s*(?P<doc>.*)$"
)


@dataclass(frozen=True)
class QueryParam:
    """One named parameter of a query file: DuckDB type, default (None is SQL NULL), meaning."""

    name: str
    type: str
    required: bool
    default: Any
    doc: str

    def convert(self, value: Any) -> Any:
        """A value (a CLI string or a Python value) as this parameter's Python type."""
        if value is None or (isinstance(value, str) and value.upper() == "NULL"):
            return None
        kind = self.type.upper()
        if kind in ("INTEGER", "BIGINT", "INT"):
            return int(value)
        if kind in ("DOUBLE", "FLOAT", "REAL"):
            return float(value)
        if kind == "BOOLEAN":
            return parse_bool(value, self.name) if isinstance(value, str) else bool(value)
        if kind == "DATE":
            return value if isinstance(value, dt.date) else dt.date.fromisoformat(str(value))
        return str(value)


class MissingParameterError(ValueError):
    """A required query parameter was not given (``name``: which)."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(message)
        self.name = name


@dataclass(frozen=True)
class SqlQuery:
    """One ``.sql`` file: its name (file stem), one-line purpose, parameters and text."""

    name: str
    purpose: str
    params: tuple[QueryParam, ...]
    text: str
    path: Path

    def bind(self, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Every declared parameter's value: given ones converted, the rest their defaults.

        Unknown names and missing required ones raise ``ValueError`` naming them.
        """
        given = dict(given or {})
        known = {p.name: p for p in self.params}
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise ValueError(f"{self.name}: unknown parameter(s) {unknown}; it takes {sorted(known)}")
        values = {}
        for p in self.params:
            if p.name in given:
                values[p.name] = p.convert(given[p.name])
            elif p.required:
                raise MissingParameterError(p.name, f"{self.name}: parameter {p.name!r} is required ({p.doc})")
            else:
                values[p.name] = p.default
        return values


def sql_dir() -> Path:
    """The folder holding the query files (``MPEMD_SQL_DIR`` or the ``sql`` sibling of ``tasks``)."""
    override = os.environ.get("MPEMD_SQL_DIR")
    return Path(override) if override else Path(__file__).resolve().parents[2] / "sql"


def _parse_default(param_type: str, literal: str | None) -> Any:
    if literal is None or literal.upper() == "NULL":
        return None
    if literal.startswith("'") and literal.endswith("'"):
        literal = literal[1:-1]
    return QueryParam("default", param_type, False, None, "").convert(literal)


def parse_query(path: Path) -> SqlQuery:
    """Read one query file and its ``-- purpose:`` and ``-- param:`` header lines."""
    text = path.read_text(encoding="utf-8")
    purpose = ""
    params = []
    for line in text.splitlines():
        if not line.startswith("--"):
            if line.strip():
                break  # the header ends at the first line of SQL
            continue
        if m := _PURPOSE_RE.match(line):
            purpose = m.group(1)
        elif m := _PARAM_RE.match(line):
            required = m.group("required") is not None
            params.append(QueryParam(m.group("name"), m.group("type").upper(), required,
                                     None if required else _parse_default(m.group("type"), m.group("default")),
                                     m.group("doc").strip()))
    if not purpose:
        raise ValueError(f"{path}: no '-- purpose:' line")
    return SqlQuery(path.stem, purpose, tuple(params), text, path)


def list_queries() -> list[SqlQuery]:
    """Every query file, sorted by name (``views`` included: it sets a connection up)."""
    return [parse_query(p) for p in sorted(sql_dir().glob("*.sql"))]


def load_query(name: str) -> SqlQuery:
    path = sql_dir() / f"{name}.sql"
    if not re.fullmatch(r"[A-Za-z_]\w*", name) or not path.is_file():
        names = ", ".join(q.name for q in list_queries())
        raise ValueError(f"no query named {name!r} in {sql_dir()} (there are: {names})")
    return parse_query(path)


# ---------------------------------------------------------------------------------------------
# Connection set-up


MAX_BINS = 2**16 - 1  # the per-bin queries sort by bin_order as a USMALLINT


def check_bin_edges(edges: Sequence[float] = ASPECT_BIN_EDGES) -> list[float]:
    """``edges`` as floats; ``ValueError`` unless they are at least two, strictly increasing, and make
    at most ``MAX_BINS`` bins."""
    edges = [float(e) for e in edges]
    if len(edges) < 2 or any(b <= a for a, b in itertools.pairwise(edges)):
        raise ValueError(f"bin edges must be at least two, strictly increasing: {edges}")
    if len(edges) - 1 > MAX_BINS:
        raise ValueError(f"bin edges make {len(edges) - 1:,} bins; at most {MAX_BINS:,}")
    return edges


def set_aspect_bins(con: duckdb.DuckDBPyConnection, edges: Sequence[float] = ASPECT_BIN_EDGES) -> None:
    """(Re)build the bins parameter table every per-bin query joins: ``bin`` label, half-open
    ``[lo, hi)`` and ``bin_order``. Built by DuckDB from bound lists: a pyarrow table from Python
    lists would make pyarrow import pandas, a cost paid by every ``mpemd sql`` call."""
    edges = check_bin_edges(edges)
    con.execute("""
        CREATE OR REPLACE TABLE aspect_bins AS
        SELECT unnest($labels::VARCHAR[]) AS bin, unnest($lo::DOUBLE[]) AS lo, unnest($hi::DOUBLE[]) AS hi,
               (generate_subscripts($lo::DOUBLE[], 1) - 1)::INTEGER AS bin_order""",
                {"labels": aspect_bin_labels(edges), "lo": edges[:-1], "hi": edges[1:]})


def _contract_schema(kind: str) -> pa.Schema:
    """The DESIGN.md schema of ``kind`` (``tasks.core.schemas``: pyarrow only, no pandas to load)."""
    from tasks.core.schemas import MANIFEST_SCHEMA, PREDICTION_SCHEMA, REJECTED_SCHEMA

    return {"manifests": MANIFEST_SCHEMA, "rejected": REJECTED_SCHEMA}.get(kind, PREDICTION_SCHEMA)


def _empty_file(kind: str) -> str:
    """A zero-row Parquet file of ``kind``'s contract schema (one per process, removed at exit).

    The views read files; pointing them at an empty file of the right schema lets every query
    run, with the same code, over a root that has nothing yet.
    """
    # Predictions keep their Hive layout so the partition columns exist (with no rows).
    rel = "model_version=none/date=1970-01-01/part-0.parquet" if kind == "predictions" else "part-0.parquet"
    path = scratch.process_folder("mpemd-empty-views-") / kind / rel
    if not path.exists():
        import pyarrow as pa
        import pyarrow.parquet as pq

        path.parent.mkdir(parents=True, exist_ok=True)
        # from_batches, not schema.empty_table(): the latter makes pyarrow import pandas
        pq.write_table(pa.Table.from_batches([], schema=_contract_schema(kind)), path)
    return str(path)


def version_of(path: str) -> str | None:
    """The model version of a prediction file, from its ``model_version=<v>/date=<d>/<file>`` path."""
    partition = partition_of(path)
    return partition[0] if partition else None


def create_views(con: duckdb.DuckDBPyConnection, root: str,
                 view: fsspec.AbstractFileSystem | None = None) -> list[tuple[str, str]]:
    """Point the views of ``sql/views.sql`` at ``root``'s files; returns the views and macros made."""
    files, entries = list_root_entries(root)
    duckdb_storage.know_entries(view, entries)  # DuckDB's lookups of the listed files: no request, no scan
    sizes = listed_sizes(entries)
    for kind, variable in (("manifests", "manifest_files"), ("rejected", "rejected_files"),
                           ("predictions", "prediction_files")):
        listed = files[kind] or [_empty_file(kind)]
        con.execute(f"SET VARIABLE {variable} = $files", {"files": listed})
    # union_by_name or not; one pass or two per version; which splits scored() picks at the scan
    union = read_plan.declare(con, root, files["predictions"], files["manifests"], sizes)
    # A remote root's groups (register_storage: a group comes in one batch at the first open of any of
    # its files). The views' binds below open every manifest, and every prediction file under
    # union_by_name: those groups are registered first. Otherwise the binds open one prediction file,
    # and with its group registered the first version came whole at connect (5,008 shard files over S3:
    # 64 MB, 718 GETs), read by a query or not: the versions' groups go after the binds.
    duckdb_storage.fetch_together(view, {k: v for k, v in files.items() if union or k != "predictions"})
    # The stored versions, from the Hive paths (check_versions: no file is opened).
    con.execute("SET VARIABLE prediction_versions = $v::VARCHAR[]",
                {"v": sorted({version_of(f) for f in files["predictions"]} - {None})})
    # The one tolerance of "constant" (model.metrics.is_constant) for the lcc / srcc_by_bin macros.
    con.execute("SET VARIABLE constant_rtol = $rtol", {"rtol": float(CONSTANT_RTOL)})
    logger.debug("views over %s: %s", root, {k: len(v) for k, v in files.items()})
    made = con.sql(load_query(VIEWS_FILE).text).fetchall()
    if not union:
        duckdb_storage.fetch_together(view, {"predictions": files["predictions"]})
    return made


def default_threads() -> int:
    """``MPEMD_DUCKDB_THREADS`` or the cores this process may run on (not the host's count)."""
    override = os.environ.get("MPEMD_DUCKDB_THREADS")
    return int(override) if override else max(1, len(os.sched_getaffinity(0)))


def default_memory_limit() -> str:
    """``MPEMD_DUCKDB_MEMORY`` or half the physical memory: DuckDB spills sorts and hash tables to
    its temp directory beyond it, and the rest is left to the Python process and its neighbours."""
    override = os.environ.get("MPEMD_DUCKDB_MEMORY")
    if override:
        return override
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return f"{max(256, total // 2 // 2**20)}MB"


def _spill_directory() -> str:
    """One private spill folder per process (DuckDB's default is ``.tmp`` in the working directory),
    removed at exit, and by a later connection where this process was killed (tasks.core.scratch)."""
    return str(scratch.process_folder("mpemd-duckdb-spill-"))


_connections: weakref.WeakSet[duckdb.DuckDBPyConnection] = weakref.WeakSet()


def interrupt_queries() -> None:
    """Interrupt the running query of every connection ``connect`` made (flows.signals calls it at Ctrl-C
    or SIGTERM). DuckDB stops a query on a signal by itself too, but then waits for the tasks running
    on its other threads to end on their own: over a single-task source, minutes."""
    for con in list(_connections):
        with contextlib.suppress(duckdb.Error):  # closed meanwhile
            con.interrupt()


def connect(root: str, bin_edges: Sequence[float] = ASPECT_BIN_EDGES, *, threads: int | None = None,
            memory_limit: str | None = None, use_httpfs: bool = False,
            progress_bar: bool = True) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with the bins table and the views over ``root`` ready to query.

    ``threads`` and ``memory_limit`` default to ``default_threads()`` / ``default_memory_limit()``.
    ``progress_bar=False``: never DuckDB's progress bar (on stdout, where DuckDB's own rule shows it).
    """
    config: dict[str, Any] = {
        "autoinstall_known_extensions": False, "autoload_known_extensions": False,
        "threads": threads or default_threads(), "memory_limit": memory_limit or default_memory_limit(),
        "temp_directory": _spill_directory(),
    }
    con = duckdb.connect(":memory:", config=config)
    _connections.add(con)
    try:
        if not progress_bar:  # a connection's setting, not a global one: first, before any other statement
            con.execute("SET enable_progress_bar = false")
        # Footers parsed once per file, not once per scan (mpemd score writes a file per 1,000-image
        # shard; a query binds and scans them more than once). The parquet extension's setting.
        con.execute("SET parquet_metadata_cache = true")
        set_aspect_bins(con, bin_edges)
        # a remote file the cache lets go of is kept on disk in the spill folder (removed at exit)
        view = duckdb_storage.register_storage(con, root, use_httpfs=use_httpfs,
                                               spill_dir=os.path.join(_spill_directory(), "remote-files"))
        create_views(con, root, view)
        bin_lookup.use_fast_bin_position(con, bin_edges)  # after views.sql, whose lambda it replaces
        # after views.sql too: its choosers, less the branches never taken
        read_plan.drop_unchosen_branches(con, load_query(VIEWS_FILE).text)
    except BaseException:
        con.close()
        raise
    return con


def statement(con: duckdb.DuckDBPyConnection, query: SqlQuery, params: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The statement answering ``query`` and its parameters: the file's, but bootstrap's resamples run
    here first, in batches (``bootstrap_sql``: its memory then does not grow with them)."""
    return bootstrap_sql.prepare(con, params) if query.name == "bootstrap" else (query.text, params)


def _relation(con: duckdb.DuckDBPyConnection, name: str, params: Mapping[str, Any] | None) -> duckdb.DuckDBPyRelation:
    """Query file ``name`` with ``params`` bound by DuckDB, not yet fetched."""
    query = load_query(name)
    if name == VIEWS_FILE:  # several statements, no parameters: (re)makes the views
        return con.sql(query.text)
    text, values = statement(con, query, query.bind(params))
    return con.sql(text, params=values)


def run_query(con: duckdb.DuckDBPyConnection, name: str, params: Mapping[str, Any] | None = None) -> pa.Table:
    """Run query file ``name`` with ``params`` bound by DuckDB; the result as an Arrow table."""
    return _relation(con, name, params).to_arrow_table()


def run_query_rows(con: duckdb.DuckDBPyConnection, name: str, params: Mapping[str, Any] | None = None
                   ) -> tuple[list[str], list[str], list[tuple]]:
    """``run_query`` as (column names, DuckDB type names, rows of Python values): no pyarrow to load."""
    result = _relation(con, name, params)
    return result.columns, [str(t) for t in result.types], result.fetchall()


def run_query_df(con: duckdb.DuckDBPyConnection, name: str, params: Mapping[str, Any] | None = None) -> Any:
    """``run_query`` as a pandas DataFrame (NULLs as NaN/None)."""
    return run_query(con, name, params).to_pandas()


def check_versions(con: duckdb.DuckDBPyConnection, params: Mapping[str, Any]) -> None:
    """Every ``*version`` parameter names a stored model version; a typo must not print an all-NULL
    table (``UnknownChoiceError`` listing the versions on hand)."""
    wanted = {k: v for k, v in params.items() if k.endswith("version") and v not in (None, "NULL")}
    if not wanted:
        return
    # The versions of the listed files' Hive paths (create_views sets them): a scan of the partition
    # column opened every file (0.8 CPU-s over 5,000 shard files); prediction_sets would also count
    # the distinct images of every set. A version whose files hold no row counts as stored.
    ((held,),) = con.execute("SELECT getvariable('prediction_versions')").fetchall()
    held = sorted(held or [])
    for key, value in wanted.items():
        if value not in held:
            raise UnknownChoiceError(f"{key}={value} has no predictions; stored model versions: "
                                     f"{', '.join(held) if held else 'none (run mpemd score first)'}")
