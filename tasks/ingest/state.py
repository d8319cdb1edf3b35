"""The fetch stage's resume record and folder listings, held as Arrow columns.

A rerun over 10^6 images used to hold every recorded row, and every listed file, as Python dicts
(about 1 KB each). Here the record is one Arrow table (about 200 bytes per image with 60-character
URIs), the reuse rules are column operations, and a listing keeps names and sizes only.
"""

from __future__ import annotations

import os
import posixpath
import time
import uuid
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tasks.core import storage, store_pages
from tasks.core.memory import release_freed_memory
from tasks.core.schemas import IMAGE_SCHEMA
from tasks.ingest.settings import FetchConfig

VERIFY_LEVEL = {"header": 0, "full": 1}
LISTING_SCHEMA = pa.schema([("name", pa.string()), ("size", pa.int64())])
_LIST_CHUNK = 65_536  # listed entries held as Python objects at once
GATHER_ROWS = 16_384  # recorded rows held as one table (Gathered)
PLAN_ROWS = 65_536  # recorded rows whose reuse is decided at once (reusable)


def state_folder(root: str) -> str:
    return storage.join(root, "ava", "_fetch")


def load_state(root: str, ids: np.ndarray | None = None) -> pa.Table:
    """Rows recorded by earlier runs (``IMAGE_SCHEMA``), one per image id: the latest part wins.
    Given ``ids``, only their rows: a record of images no longer in the labels is not held."""
    fs, path = storage.filesystem(state_folder(root))
    if not fs.exists(path):
        return IMAGE_SCHEMA.empty_table()
    # Time-ordered part names (see StateRecorder.flush): later rows are newer. A hidden name is a
    # writer's temporary (``.tmp-*``), maybe empty if the run was killed while writing it: no part.
    parts = sorted(p for p in fs.ls(path, detail=False)
                   if p.endswith(".parquet") and not posixpath.basename(p).startswith((".", "_")))
    wanted = None if ids is None else _sorted_unique(np.asarray(ids, dtype=np.int64))
    # Filtered as gathered tables, not as 256-row parts: a call per part cost 0.5-0.9 CPU-s at 10^6.
    gathered = Gathered(None if wanted is None else lambda table: _rows_of(table, wanted))
    for p in parts:
        gathered.add(storage.read_parquet_file(fs, p).select(IMAGE_SCHEMA.names).cast(IMAGE_SCHEMA))
    tables = gathered.tables()
    if not tables:
        return IMAGE_SCHEMA.empty_table()
    table = pa.concat_tables(tables)
    del tables
    ids = table.column("image_id").to_numpy()
    _, first_in_reversed = np.unique(ids[::-1], return_index=True)
    if len(first_in_reversed) == len(ids):  # each image recorded once: no copy of the rows
        return table
    return table.take(pa.array(np.sort(len(ids) - 1 - first_in_reversed)))


def _rows_of(part: pa.Table, wanted: np.ndarray) -> pa.Table:
    """The rows of ``part`` whose id is in ``wanted`` (sorted, unique); ``part`` itself if all are."""
    return part if (member := is_in_sorted(part.column("image_id").to_numpy(), wanted)).all() \
        else part.filter(pa.array(member))


def _sorted_unique(values: np.ndarray) -> np.ndarray:
    """``np.unique(values)`` by a sort: numpy 2's hash-based ``unique`` took 1.5 s for 10^6 ids, this 0.1 s."""
    values = np.sort(values)
    return values[np.r_[True, values[1:] != values[:-1]]] if len(values) else values


def is_in_sorted(values: np.ndarray, sorted_unique: np.ndarray) -> np.ndarray:
    """Per value, whether it is in ``sorted_unique``: a binary search each, no set built per call."""
    if len(sorted_unique) == 0:
        return np.zeros(len(values), dtype=bool)
    at = np.minimum(np.searchsorted(sorted_unique, values), len(sorted_unique) - 1)
    return sorted_unique[at] == values


class Gathered:
    """Small tables (a part of 256 rows) gathered into tables of ``GATHER_ROWS`` rows or more, one
    chunk per column. Thousands of small tables hold the rows in buffers interleaved in the same
    memory pages, so letting one column go later frees no page; gathered, a column's buffers are
    its own (a rerun at 3x10^5 images: load_state +105 MB, sorted_by_id +51 MB; docs/performance.md)."""

    def __init__(self, select: Callable[[pa.Table], pa.Table] | None = None) -> None:
        self.select = select or (lambda table: table)  # the rows to keep of each gathered table
        self.done: list[pa.Table] = []
        self.recent: list[pa.Table] = []
        self.n_recent = 0

    def add(self, table: pa.Table) -> None:
        self.recent.append(table)
        self.n_recent += table.num_rows
        if self.n_recent >= GATHER_ROWS:
            self.done.append(_one_uri_buffer(self.select(pa.concat_tables(self.recent).combine_chunks())))
            self.recent, self.n_recent = [], 0

    def tables(self) -> list[pa.Table]:
        if not self.recent:
            return list(self.done)
        return [*self.done, self.select(pa.concat_tables(self.recent))]


def _one_uri_buffer(table: pa.Table) -> pa.Table:
    """``source_uri`` as the very ``uri`` column where they are equal (a reference keeps the image
    where it is): ~64 bytes an image held once, not twice."""
    names = table.column_names
    if "uri" in names and "source_uri" in names and table.column("uri").equals(table.column("source_uri")):
        return table.set_column(names.index("source_uri"), table.schema.field("source_uri"), table.column("uri"))
    return table


def take_rows(table: pa.Table, rows: np.ndarray) -> pa.Table:
    """``table.take(rows)``, without the copy when ``rows`` are all the rows in order (a rerun over the
    same labels keeps every recorded row, recorded in label order: a copy would double the record)."""
    if len(rows) == table.num_rows and (len(rows) == 0 or (rows[0] == 0 and (np.diff(rows) == 1).all())):
        return table
    return table.take(pa.array(rows))


def sorted_by_id(tables: list[pa.Table]) -> pa.Table:
    """The rows of ``tables`` in image id order as one table of one chunk per column, built a column
    at a time: each column's old chunks are let go (and their pages given back) once copied, so the
    rows are held ~1.2x, not 2x.
    Empties ``tables`` (the caller's list), whose parts would otherwise outlive their copy."""
    ids = np.concatenate([t.column("image_id").to_numpy() for t in tables]) if tables else np.empty(0, np.int64)
    order = np.argsort(ids, kind="stable")
    in_order = len(order) == 0 or (np.diff(ids) >= 0).all()
    schema = tables[0].schema if tables else IMAGE_SCHEMA
    # A reference keeps the image where it is: one buffer for uri and source_uri (~64 bytes an image).
    same_uri = all(t.column("uri").equals(t.column("source_uri")) for t in tables)
    columns = []
    for name in schema.names:
        if name == "source_uri" and same_uri:
            columns.append(columns[schema.get_field_index("uri")])
        else:
            # Chunks, not the ChunkedArrays: given those, chunked_array converts them value by value.
            column = pa.chunked_array([c for t in tables for c in t.column(name).chunks], type=schema.field(name).type)
            columns.append(column.combine_chunks() if in_order else column.take(pa.array(order)).combine_chunks())
        tables[:] = [t.drop_columns([name]) for t in tables]
        release_freed_memory()  # else the allocator keeps the column's old pages for later (+144 MB at 10^6)
    tables.clear()
    return pa.table(columns, schema=schema)


def list_files(folder: str | None, sizes: bool = True) -> pa.Table | None:
    """``name, size`` (``LISTING_SCHEMA``) of the files in one folder; None when it cannot be listed
    (no folder), empty when it does not exist. Sizes are 0 unless asked for (a stat per file)."""
    if folder is None:
        return None
    fs, path = storage.filesystem(folder)
    if not fs.exists(path):
        return LISTING_SCHEMA.empty_table()
    if storage.protocol_of(folder) == "file":
        return _list_local(path, sizes)
    if store_pages.lists_by_page(fs):
        # A page of info dicts at a time: fs.ls holds every one (~1.3 KB each at 10^5 images) and files
        # them in s3fs's listing cache for the process's life (docs/performance.md).
        paged = [_listing_batch(page) for page in store_pages.folder_pages(fs, path)]
        if paged:
            return pa.Table.from_batches(paged, schema=LISTING_SCHEMA).combine_chunks()
    return pa.Table.from_batches([_listing_batch(fs.ls(path, detail=True))], schema=LISTING_SCHEMA)


def _listing_batch(infos: list[dict]) -> pa.RecordBatch:
    """``name, size`` of the files among ``infos`` (fsspec info dicts; folders left out)."""
    files = [i for i in infos if i.get("type") != "directory"]
    return pa.record_batch([pa.array([posixpath.basename(i["name"]) for i in files], pa.string()),
                            pa.array([int(i.get("size") or 0) for i in files], pa.int64())], schema=LISTING_SCHEMA)


def _list_local(path: str, sizes: bool) -> pa.Table:
    """A local folder listed in chunks, without fsspec's dict of ten facts per file."""
    batches: list[pa.RecordBatch] = []
    names: list[str] = []
    lengths: list[int] = []

    def flush() -> None:
        batches.append(pa.record_batch([pa.array(names, pa.string()), pa.array(lengths, pa.int64())],
                                       schema=LISTING_SCHEMA))
        names.clear()
        lengths.clear()

    with os.scandir(path) as entries:
        for entry in entries:
            if entry.is_dir():  # follows links, as fsspec's listing does
                continue
            names.append(entry.name)
            lengths.append(_size(entry) if sizes else 0)
            if len(names) >= _LIST_CHUNK:
                flush()
    flush()
    return pa.Table.from_batches(batches, schema=LISTING_SCHEMA).combine_chunks()


def _size(entry: os.DirEntry) -> int:
    try:
        return entry.stat().st_size
    except OSError:  # a dangling link: fsspec reports size 0 too
        return 0


def reusable(state: pa.Table, uris: Callable[[np.ndarray], pa.Array], dest: pa.Table | None,
             settings: FetchConfig) -> np.ndarray:
    """Per row of ``state`` (``load_state``), whether this run may keep it; ``uris(ids)`` gives the
    source URI of each id now asked for.

    Kept when recorded from the same source, verified at least as strictly as now asked, and: in
    reference mode recorded as that source; in copy mode recorded as a copy whose file is still in
    ``dest`` (the destination's listing) with the recorded size. Decided ``PLAN_ROWS`` rows at a time,
    so the source URIs and the rules' columns are never held for every image at once."""
    wanted = VERIFY_LEVEL["full" if settings.full_decode else "header"]
    copies = None if settings.mode == "reference" else _sizes_by_id(dest)
    keep = np.zeros(state.num_rows, dtype=bool)
    for start in range(0, state.num_rows, PLAN_ROWS):
        rows = state.slice(start, PLAN_ROWS).select(["image_id", "uri", "source_uri", "bytes", "verified"])
        ids = rows.column("image_id").to_numpy()
        src = uris(ids)
        level = pc.index_in(rows.column("verified"), value_set=pa.array(list(VERIFY_LEVEL)))
        ok = pc.and_(pc.equal(rows.column("source_uri"), src), pc.greater_equal(pc.fill_null(level, -1), wanted))
        if copies is None:
            ok = pc.and_(ok, pc.equal(rows.column("uri"), src))
        else:
            listed = pa.array(_listed_size(copies, ids))
            ok = pc.and_(ok, pc.and_(pc.equal(listed, rows.column("bytes")), pc.not_equal(rows.column("uri"), src)))
        keep[start:start + len(ids)] = pc.fill_null(ok, False).to_numpy(zero_copy_only=False)
    return keep


def _sizes_by_id(dest: pa.Table | None) -> tuple[np.ndarray, np.ndarray]:
    """The destination's copies (``<image_id>.jpg``, as a copy is named) as sorted ids and their sizes:
    16 bytes a file, where a lookup by name held every name as a Python string."""
    if dest is None:
        dest = LISTING_SCHEMA.empty_table()
    names = dest.column("name")
    # Canonical decimal names only: exactly those that ``f"{image_id}.jpg"`` can be.
    copy = pc.fill_null(pc.match_substring_regex(names, r"^(0|-?[1-9][0-9]{0,17})\.jpg$"), False)
    stems = pc.utf8_slice_codeunits(names.filter(copy), 0, -4)
    ids = pc.cast(stems, pa.int64(), safe=False).to_numpy() if len(stems) else np.empty(0, np.int64)
    sizes = dest.column("size").filter(copy).to_numpy()
    order = np.argsort(ids, kind="stable")
    return ids[order], sizes[order]


def _listed_size(copies: tuple[np.ndarray, np.ndarray], ids: np.ndarray) -> np.ndarray:
    """Size of each id's copy in the destination listing, -1 where it has none."""
    listed_ids, sizes = copies
    if len(listed_ids) == 0:
        return np.full(len(ids), -1, dtype=np.int64)
    at = np.minimum(np.searchsorted(listed_ids, ids), len(listed_ids) - 1)
    return np.where(listed_ids[at] == ids, sizes[at], -1)


class StateRecorder:
    """Verified rows written to the state folder a part of ``batch_size`` rows at a time; each part
    is kept as an Arrow table too (``gathered``), so no verified row stays a Python dict."""

    def __init__(self, root: str, batch_size: int) -> None:
        self.folder, self.batch_size = state_folder(root), batch_size
        self.pending: list[dict] = []
        self.gathered = Gathered()

    def add(self, row: dict) -> None:
        self.pending.append(row)
        if len(self.pending) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            table = pa.Table.from_pylist(self.pending, schema=IMAGE_SCHEMA)
            # Time-ordered names: load_state lets the newest record of an image win.
            name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
            storage.write_parquet_atomic(table, storage.join(self.folder, name))
            self.gathered.add(table)
            self.pending.clear()
