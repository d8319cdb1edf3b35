"""What a run rescores: plan_scoring's decisions from the listing and the output's state (issue 22
made both compact: the listing as columns, the state as keys); the decisions are the dict version's."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pytest

from tasks.core import storage
from tasks.core.schemas import PREDICTION_SCHEMA
from tasks.scoring.layout import partition_url
from tasks.scoring.listing import SourceObject, SourceObjects, list_source
from tasks.scoring.predictions import TRANSIENT_ERROR_PREFIX, ScoringSettings, plan_scoring

NIMA = ScoringSettings("nima", "warp", 1)


def _row(uri: str, *, size: int | None = 10, mtime: float | None = 1.0, etag: str | None = None,
         model: str = "nima", status: str = "ok", error: str | None = None) -> dict:
    return {"uri": uri, "model": model, "patch_mode": "warp" if model == "nima" else "random",
            "n_patches": 1 if model == "nima" else 8, "source_size": size, "source_mtime": mtime,
            "source_etag": etag, "scored_at": 0, "status": status, "error": error}


def _write_part(out: str, rows: list[dict], index: int = 0) -> None:
    part = storage.join(partition_url(out, "v1", "2026-01-01"), f"part-{index:05d}-{index:016x}.parquet")
    storage.write_parquet_atomic(pa.Table.from_pylist(rows, schema=PREDICTION_SCHEMA), part)


def test_plan_rescores_new_changed_other_settings_and_transient_errors_only(tmp_path):
    out = str(tmp_path / "out")
    _write_part(out, [
        _row("/b/same.jpg"),
        _row("/b/size.jpg", size=11),  # the file is 10 bytes now
        _row("/b/mtime.jpg", mtime=2.0),  # touched since
        _row("/b/etag.jpg", etag="old"),
        _row("/b/s3same.jpg", etag="e1", size=99),  # an ETag decides, not the size
        _row("/b/mpemd.jpg", model="mpemd"),  # scored with other settings only
        _row("/b/flaky.jpg", status="error", error=f"{TRANSIENT_ERROR_PREFIX}: timeout"),
        _row("/b/broken.jpg", status="error", error="decode: not an image"),  # final: never retried
    ])
    _write_part(out, [_row("/b/history.jpg", size=5), _row("/b/history.jpg")], index=1)  # old and new rows
    names = ["same", "size", "mtime", "etag", "s3same", "mpemd", "flaky", "broken", "history", "new"]
    objects = SourceObjects(SourceObject(f"/b/{n}.jpg", size=10, mtime=1.0,
                                         etag={"etag": "new", "s3same": "e1"}.get(n)) for n in names)
    plan = plan_scoring(objects, out, "v1", NIMA, shard_size=2)
    pending = [os.path.basename(o.uri) for shard in plan.shards for o in shard]
    assert pending == ["size.jpg", "mtime.jpg", "etag.jpg", "mpemd.jpg", "flaky.jpg", "new.jpg"]  # listing order
    assert [len(s) for s in plan.shards] == [2, 2, 2]
    assert (plan.listed, plan.skipped_unchanged) == (10, 4)
    assert plan_scoring(objects, str(tmp_path / "empty"), "v1", NIMA, 4).pending == 10


@pytest.mark.s3
def test_the_state_read_over_s3_opens_each_listed_part_without_a_lookup(s3_bucket, s3_requests):
    """The plan lists the parts (``finish_interrupted``) and reads each with its listing entry: one GET a
    part, no HEAD, even where a write into the folder dropped s3fs's listing cache."""
    from tasks.scoring.compaction import finish_interrupted
    from tasks.scoring.predictions import read_state

    out = storage.join(s3_bucket, "out")
    for i in range(4):
        _write_part(out, [_row(f"s3://b/{i}.jpg", etag=f"e{i}")], index=i)
    parts = finish_interrupted(out, "v1")
    storage.filesystem(out)[0].invalidate_cache()
    s3_requests.clear()
    assert len(read_state(out, "v1", NIMA, parts)) == 4
    assert s3_requests == ["get_object"] * 4


def test_local_parts_are_read_by_pyarrow_itself_not_through_a_python_file(tmp_path, monkeypatch):
    """A Python file's reads are pyarrow's threads calling back into Python, and its buffers are theirs to
    let go of under the GIL: a process whose last act is such a read can abort at exit ("terminate
    called": ``storage.read_parquet_file``). The state read, ``read_predictions`` and compaction open a
    local part by its path (``storage.open_parquet``): fsspec's local open is never called."""
    from fsspec.implementations.local import LocalFileSystem

    from tasks.scoring.compaction import compact_partition
    from tasks.scoring.layout import COMPACTING_PREFIX
    from tasks.scoring.predictions import read_predictions, read_state

    out = str(tmp_path / "out")
    for i in range(3):
        _write_part(out, [_row(f"/b/{i}.jpg")], index=i)
    partition = Path(partition_url(out, "v1", "2026-01-01"))
    sources = {p: p.read_bytes() for p in partition.iterdir()}
    monkeypatch.setattr(LocalFileSystem, "_open", lambda *a, **k: pytest.fail(f"a Python file: {a[1:]}"))
    assert len(read_state(out, "v1", NIMA)) == 3
    assert read_predictions(out, "v1", latest=False).num_rows == 3
    compact_partition(str(partition))
    (merged,) = partition.iterdir()
    assert read_predictions(out, "v1", latest=False).num_rows == 3
    # caught between its commit and its deletes: the merged file's footer names the sources it hides
    for path, data in sources.items():
        path.write_bytes(data)
    (partition / f"{COMPACTING_PREFIX}{merged.stem}.json").write_text("{}")
    assert len(read_state(out, "v1", NIMA)) == 3 and read_predictions(out, "v1", latest=False).num_rows == 3


def test_source_objects_read_back_as_listed_and_sort_like_sorted():
    objects = [SourceObject("/a/x.jpg", size=0, mtime=0.0, image_id=0),  # zeros are facts, not None
               SourceObject("/a.b/y.jpg"),  # no facts at all
               SourceObject("s3://b/z.jpg", size=3, etag="e", mtime=float("nan"), image_id=7),
               SourceObject("/a/\u00e9.jpg", size=1, mtime=1.5),
               SourceObject("/a/x.jpg", size=2)]  # a manifest may name a URI twice: both kept, in order
    column = SourceObjects(objects)
    assert [repr(o) for o in column] == [repr(o) for o in objects]  # repr: nan == nan
    assert column[3:] == objects[3:] and column[-1] == objects[-1] and column[0] == objects[0]
    column.sort_by_uri()
    expected = sorted(objects, key=lambda o: o.uri)
    assert [repr(o) for o in column] == [repr(o) for o in expected]  # repr: nan == nan
    assert len(column) == 5 and len(SourceObjects()) == 0


def test_folder_listing_equals_what_find_lists(tmp_path):
    """The folder is walked a directory at a time: the same objects, facts and order as fs.find."""
    for name in ["a/1.jpg", "a.b/2.jpg", "a/c/3.png", "4.jpg", "a/5.txt", "z/6.jpg"]:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(name.encode())
    fs, root = storage.filesystem(str(tmp_path))
    expected = [SourceObject(path, size=v.size, mtime=v.mtime, image_id=int(os.path.basename(path)[0]))
                for path, info in fs.find(root, detail=True).items() if not path.endswith(".txt")
                for v in [storage.file_version(info)]]
    listing = list_source(str(tmp_path))
    assert list(listing.objects) == expected and listing.skipped_non_image == 1
    (single,) = list_source(str(tmp_path / "4.jpg")).objects  # a file is its own listing, as find has it
    assert single == next(o for o in expected if o.uri == str(tmp_path / "4.jpg"))


@pytest.mark.parametrize("chunk", [1, 2, 10_000])
def test_chunked_split_keeps_counts_and_the_first_skipped_examples(tmp_path, monkeypatch, chunk):
    from tasks.scoring import listing as listing_module

    monkeypatch.setattr(listing_module, "_CHUNK", chunk)
    for i in range(15):
        (tmp_path / f"{i:02d}.txt").write_bytes(b"text")
    (tmp_path / "IMG").write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 60)  # a JPEG by content
    (tmp_path / "1.jpg").write_bytes(b"x")
    got = list_source(str(tmp_path))
    assert [os.path.basename(o.uri) for o in got.objects] == ["1.jpg", "IMG"]
    assert (got.skipped_non_image, got.by_content) == (15, 1)
    assert got.skipped_examples == [str(tmp_path / f"{i:02d}.txt") for i in range(10)]
