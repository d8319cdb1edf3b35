"""The prediction table: its schema, its layout on storage, and the incremental state read back from it.

Layout (Hive style; the partition keys live in the path ONLY, never as columns; names and markers
in ``tasks.scoring.layout``)::

    {out}/model_version=<version>/date=<YYYY-MM-DD>/part-<shard>-<shard_key>.parquet

Each shard is committed as ONE file written atomically (temp name + rename locally, a single PUT on
object stores), so a reader never sees half a shard. ``shard_key`` is a hash of what the shard
scores (model version, settings, each image's URI and content fingerprint): re-running the same
shard (a task retry after a commit whose acknowledgement was lost) rewrites the same name instead
of adding a second copy. The output itself is the incremental state: an image whose row already
exists for this model version, these settings and the same content fingerprint is not scored again.

Rows are history: a changed image gets a new row beside the old one; ``read_predictions(latest=True)``
keeps the newest row per URI.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import posixpath
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from tasks.core import storage
from tasks.core.schemas import PREDICTION_SCHEMA, conform
from tasks.scoring.layout import (
    SCHEMA_RECORD,
    SHARD_KEY_HEX,
    Listed,
    list_entries,
    list_files,
    part_paths,
    partition_of,
    partition_url,
    visible_entries,
)
from tasks.scoring.listing import SourceObject, cut_into_shards
from tasks.scoring.output_lock import assert_held

if TYPE_CHECKING:
    import fsspec

# Errors starting with this are retried by the next run; every other error row is final.
TRANSIENT_ERROR_PREFIX = "fetch: I/O error"
_READ_THREADS = 8  # parts read at once (object stores: each read waits on the network)
# State needs these columns only; reading them is cheap even for millions of rows.
_STATE_COLUMNS = ["uri", "model", "patch_mode", "n_patches", "source_etag", "source_size", "source_mtime",
                  "status", "error"]


@dataclass(frozen=True)
class ScoringSettings:
    """What makes two predictions of the same image comparable (besides the model version)."""

    method: str  # nima | mpemd
    patch_mode: str  # warp for nima; random | grid for mpemd
    n_patches: int  # 1 for nima


def shard_key(model_version: str, settings: ScoringSettings, objects: Sequence[SourceObject], seed: int = 0) -> str:
    digest = hashlib.sha256(f"{model_version}|{settings}|{seed}".encode())
    for obj in objects:
        digest.update(f"\n{obj.uri}\t{obj.fingerprint}".encode())
    return digest.hexdigest()[:SHARD_KEY_HEX]


def list_parts(out: str, model_version: str) -> list[str]:
    """Committed part files of a model version (temporary and foreign files are ignored)."""
    return list(listed_parts(out, model_version))


def listed_parts(out: str, model_version: str) -> Listed:
    """``list_parts`` with each part's listing entry: a reader opens the part with it and looks nothing
    up (``storage.open_listed``)."""
    fs, path = storage.filesystem(partition_url(out, model_version))
    return visible_entries(fs, list_entries(fs, path))


def rows_to_table(rows: Iterable[dict[str, Any]]) -> pa.Table:
    """Prediction rows (dicts with the schema's columns) -> a table of exactly PREDICTION_SCHEMA."""
    rows = list(rows)
    columns = {f.name: [r.get(f.name) for r in rows] for f in PREDICTION_SCHEMA}
    return pa.table(columns, schema=PREDICTION_SCHEMA)


def write_part(table: pa.Table, url: str) -> str:
    """Commit one shard's rows atomically; returns ``url``."""
    assert_held(url)  # a run whose output lock was taken over stops before its next commit
    if table.schema != PREDICTION_SCHEMA:
        table = table.cast(PREDICTION_SCHEMA)
    record_schema(url)
    storage.write_parquet_atomic(table, url)
    return url


def schema_record_text(schema: pa.Schema = PREDICTION_SCHEMA) -> str:
    """What ``SCHEMA_RECORD`` holds: each column's name and Arrow type, in order."""
    return json.dumps([[f.name, str(f.type)] for f in schema])


_recorded: set[str] = set()  # version folders this process has recorded (or found recorded or older)


def record_schema(part: str) -> None:
    """Write the schema record of ``part``'s version folder once, before its first part.

    A reader (tasks.analysis.sql) that finds the record in every version knows all their parts share
    this schema without opening a footer (on S3 one request per file). The record goes first, so a
    part never exists without it; a version already holding parts from a writer that kept no record
    gets none (its files may differ: readers keep ``union_by_name`` there)."""
    version_url = posixpath.dirname(posixpath.dirname(part))
    if version_url in _recorded:
        return
    fs, path = storage.filesystem(version_url)
    record = storage.join(version_url, SCHEMA_RECORD)
    if not storage.exists(record) and not part_paths(list_files(fs, path)):
        storage.write_text_atomic(record, schema_record_text())
    _recorded.add(version_url)


def _read_parts(out: str, model_version: str, columns: Sequence[str] | None = None,
                files: Listed | None = None) -> pa.Table | None:
    """The parts' rows (``columns``, default all), in part order; None when there is no part.

    File by file with pyarrow.parquet, a few in parallel (object-store reads wait on the network), not
    through pyarrow.dataset: importing that loads pandas, a large part of a nightly no-op run."""
    fs, _ = storage.filesystem(out)
    files = listed_parts(out, model_version) if files is None else files
    if not files:
        return None
    schema = pa.schema([PREDICTION_SCHEMA.field(c) for c in columns]) if columns else PREDICTION_SCHEMA

    def read(path: str) -> pa.Table:
        with storage.open_parquet(fs, path, files[path]) as part:
            return conform(part.read(columns=[c for c in schema.names if c in part.schema_arrow.names]), schema)

    with ThreadPoolExecutor(min(_READ_THREADS, len(files))) as pool:
        return pa.concat_tables(pool.map(read, files))


State = set[bytes]  # state_key(uri, fingerprint) of each image content with a final row


def state_key(uri: str, fingerprint: str) -> bytes:
    """A compact key for (URI, content fingerprint): 16 bytes of BLAKE2b, not the two strings (~200
    bytes a row at 10^6 rows). Two different pairs share a key with odds ~n^2 / 2^129 (10^-27 at 10^6)."""
    return hashlib.blake2b(f"{len(uri)}:{uri}{fingerprint}".encode(errors="surrogatepass"), digest_size=16).digest()


def _add_final_keys(fs: fsspec.AbstractFileSystem, path: str, entry: dict[str, Any] | None,
                    settings: ScoringSettings, state: State) -> None:
    """Add to ``state`` the key of each row of the part at ``path`` (``entry``: its listing entry) that is
    final for ``settings``."""
    schema = pa.schema([PREDICTION_SCHEMA.field(c) for c in _STATE_COLUMNS])
    wanted = (settings.method, settings.patch_mode, settings.n_patches)
    with storage.open_parquet(fs, path, entry) as part:
        present = [c for c in _STATE_COLUMNS if c in part.schema_arrow.names]
        # batch by batch, one column list at a time: the whole table as Python rows held ~1 KB a row
        for batch in part.iter_batches(batch_size=16_384, columns=present):
            columns = [column.to_pylist() for column in conform(batch, schema).columns]
            for uri, model, patch_mode, n_patches, etag, size, mtime, status, error in zip(*columns, strict=True):
                if (model, patch_mode, n_patches) != wanted:
                    continue
                # An I/O failure may be transient (network, permissions being fixed): try it again next run.
                if status == "error" and (error or "").startswith(TRANSIENT_ERROR_PREFIX):
                    continue
                state.add(state_key(uri, storage.content_fingerprint(etag, size, mtime)))


def read_state(out: str, model_version: str, settings: ScoringSettings, files: Listed | None = None) -> State:
    """What is already scored for this model version and these settings: the key of each (URI, content)
    with a final row (``files``: its parts when the caller has just listed them).

    Compared in Python, not with pyarrow.compute: a Python value turned into an Arrow scalar makes
    pyarrow import pandas (the nightly no-op's cost), and the loop visits each row anyway."""
    fs, _ = storage.filesystem(out)
    files = listed_parts(out, model_version) if files is None else files
    state: State = set()
    if files:  # a few parts at once (object stores: each read waits on the network); set.add is atomic
        with ThreadPoolExecutor(min(_READ_THREADS, len(files))) as pool:
            list(pool.map(lambda path: _add_final_keys(fs, path, files[path], settings, state), files))
    return state


def is_done(obj: SourceObject, state: State) -> bool:
    """True when ``obj`` with its current content already has a final row."""
    return state_key(obj.uri, obj.fingerprint) in state


def run_date(date: str | None = None) -> str:
    """The ``date=`` partition: ``date`` if given (validated), else today in UTC."""
    if date:
        return dt.date.fromisoformat(date).isoformat()
    return dt.datetime.now(dt.timezone.utc).date().isoformat()


def read_predictions(out: str, model_version: str, *, latest: bool = True) -> pa.Table:
    """All rows of a model version; ``latest`` keeps the newest row per (URI, settings)."""
    table = _read_parts(out, model_version)
    if table is None:
        return pa.Table.from_batches([], schema=PREDICTION_SCHEMA)
    if not latest or table.num_rows == 0:
        return table
    order = table.sort_by([("uri", "ascending"), ("scored_at", "descending")])
    keys = list(zip(*(order[c].to_pylist() for c in ("uri", "model", "patch_mode", "n_patches")), strict=True))
    keep = [i for i, k in enumerate(keys) if i == 0 or k != keys[i - 1]]
    return order.take(keep)


@dataclass
class ScoringPlan:
    """What a run has to do: the images not yet scored, cut into shards."""

    model_version: str
    settings: ScoringSettings
    listed: int
    skipped_unchanged: int
    shards: list[list[SourceObject]]
    # date= partitions that already held several part files when the run planned: shards of a run
    # killed before its compaction, or written with compact off (the run merges them too).
    untidy_dates: tuple[str, ...] = ()

    @property
    def pending(self) -> int:
        return sum(len(s) for s in self.shards)


def dates_with_several_parts(parts: Iterable[str]) -> tuple[str, ...]:
    """The ``date=`` values of listed part paths (``list_parts``) that hold two files or more."""
    dates = Counter(partition[1] for partition in map(partition_of, parts) if partition)
    return tuple(sorted(date for date, n in dates.items() if n >= 2))


def plan_scoring(objects: Sequence[SourceObject], out: str, model_version: str, settings: ScoringSettings,
                 shard_size: int, files: Listed | None = None) -> ScoringPlan:
    """Skip what the output already holds for this content, and shard the rest (listing order kept)."""
    state = read_state(out, model_version, settings, files)
    pending = [o for o in objects if not is_done(o, state)]
    return ScoringPlan(model_version, settings, len(objects), len(objects) - len(pending),
                       cut_into_shards(pending, shard_size))
