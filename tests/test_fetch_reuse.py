"""The fetch stage's reuse rules on a rerun: exactly the images whose record no longer holds are
fetched again (changed copy, other source, stricter verification, other mode), and the result is
the same table as a first run's."""

from __future__ import annotations

import io
import shutil
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

import tasks.ingest.fetch as fetch
import tasks.ingest.state as state
from tasks.core.schemas import IMAGE_SCHEMA
from tasks.ingest.fetch import FetchConfig, fetch_images
from tasks.ingest.state import load_state, sorted_by_id, take_rows

IDS = [11, 3, 7, 42, 5, 19]


def _jpeg(i: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (16 + i, 12), (i * 5 % 255, 90, 160)).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.fixture
def mirror(tmp_path: Path) -> Path:
    folder = tmp_path / "mirror"
    folder.mkdir()
    for i in IDS:
        (folder / f"{i}.jpg").write_bytes(_jpeg(i))
    return folder


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every source URI the fetch reads."""
    seen: list[str] = []
    lock = threading.Lock()
    real = fetch.read_with_retries

    def spy(uri: str, *args, **kwargs) -> bytes:
        with lock:
            seen.append(uri)
        return real(uri, *args, **kwargs)

    monkeypatch.setattr(fetch, "read_with_retries", spy)
    return seen


def _fetched_ids(reads: list[str]) -> list[int]:
    ids = sorted(int(Path(u).stem) for u in reads)
    reads.clear()
    return ids


def test_a_copy_rerun_fetches_only_the_changed_and_missing_copies(mirror, reads, tmp_path):
    root = str(tmp_path / "root")
    settings = FetchConfig(max_concurrency=2, batch_size=2)
    first = fetch_images(IDS, str(mirror), root, settings)
    assert _fetched_ids(reads) == sorted(IDS) and first.images.num_rows == len(IDS)

    images = tmp_path / "root" / "ava" / "images"
    (images / "7.jpg").write_bytes(b"x")  # a copy of another size
    (images / "42.jpg").unlink()  # a copy gone
    again = fetch_images(IDS, str(mirror), root, settings)
    assert _fetched_ids(reads) == [7, 42]
    assert (again.n_skipped, again.n_fetched) == (4, 2)
    assert again.images.equals(first.images)  # same rows, same order, same values

    unchanged = fetch_images(IDS, str(mirror), root, settings)
    assert _fetched_ids(reads) == [] and unchanged.images.equals(first.images)


def test_a_stricter_check_another_source_or_mode_fetches_again(mirror, reads, tmp_path):
    root = str(tmp_path / "root")
    fetch_images(IDS, str(mirror), root, FetchConfig(max_concurrency=2))
    reads.clear()

    full = fetch_images(IDS, str(mirror), root, FetchConfig(full_decode=True))
    assert _fetched_ids(reads) == sorted(IDS)
    assert set(full.images.column("verified").to_pylist()) == {"full"}
    header = fetch_images(IDS, str(mirror), root, FetchConfig())  # full verification covers a header check
    assert _fetched_ids(reads) == [] and header.images.equals(full.images)

    other = tmp_path / "other"
    shutil.copytree(mirror, other)
    fetch_images([3, 5], str(other), root, FetchConfig())
    assert _fetched_ids(reads) == [3, 5]
    back = fetch_images(IDS, str(mirror), root, FetchConfig())  # 3 and 5 were last recorded from `other`
    assert _fetched_ids(reads) == [3, 5]
    assert back.images.column("source_uri").to_pylist() == [str(mirror / f"{i}.jpg") for i in sorted(IDS)]

    reference = fetch_images(IDS, str(mirror), root, FetchConfig(mode="reference"))
    assert _fetched_ids(reads) == sorted(IDS)
    assert reference.images.column("uri").to_pylist() == [str(mirror / f"{i}.jpg") for i in sorted(IDS)]
    fetch_images(IDS, str(mirror), root, FetchConfig(mode="reference"))
    assert _fetched_ids(reads) == []


def test_the_latest_record_of_an_image_wins_and_missing_files_are_rejected(mirror, reads, tmp_path):
    root = str(tmp_path / "root")
    fetch_images(IDS, str(mirror), root, FetchConfig())
    fetch_images(IDS, str(mirror), root, FetchConfig(full_decode=True))
    state = load_state(root)
    assert sorted(state.column("image_id").to_pylist()) == sorted(IDS)
    assert set(state.column("verified").to_pylist()) == {"full"}

    reads.clear()
    (mirror / "19.jpg").unlink()
    result = fetch_images([*IDS, 99, 3], str(mirror), root, FetchConfig(mode="reference"))
    assert _fetched_ids(reads) == [3, 5, 7, 11, 42]  # 19 and 99 are not at the source: not asked for
    assert result.rejected.column("image_id").to_pylist() == [19, 99]
    assert set(result.rejected.column("stage").to_pylist()) == {"fetch"}
    assert result.images.column("image_id").to_pylist() == [3, 5, 7, 11, 42]


def test_local_references_are_checked_in_the_callers_thread_and_copies_on_the_pool(mirror, monkeypatch, tmp_path):
    """Reading local files in place has no wait for threads to hide; a pool of them only fought over
    the GIL (kernel time equal to user time at AVA's size). Copies and remote sources keep the pool;
    both paths give the same rows."""
    threads: dict[str, set[int]] = {"reference": set(), "copy": set()}
    real = fetch._fetch_one

    def spy(image_id, source, root, settings):
        threads[settings.mode].add(threading.get_ident())
        return real(image_id, source, root, settings)

    monkeypatch.setattr(fetch, "_fetch_one", spy)
    referenced = fetch_images(IDS, str(mirror), str(tmp_path / "a"), FetchConfig(mode="reference", max_concurrency=4))
    copied = fetch_images(IDS, str(mirror), str(tmp_path / "b"), FetchConfig(mode="copy", max_concurrency=4))
    assert threads["reference"] == {threading.get_ident()}
    assert threads["copy"] and threading.get_ident() not in threads["copy"]
    assert referenced.images.num_rows == copied.images.num_rows == len(IDS)
    assert referenced.images.column("checksum").equals(copied.images.column("checksum"))


def _state_rows(ids: list[int]) -> pa.Table:
    return pa.Table.from_pylist([{"image_id": i, "uri": f"/m/{i}.jpg", "source_uri": f"/m/{i}.jpg", "width": i,
                                  "height": 2 * i, "raw_width": i, "raw_height": 2 * i, "orientation": 1,
                                  "format": "JPEG", "bytes": 10 * i, "checksum": str(i), "verified": "header"}
                                 for i in ids], schema=IMAGE_SCHEMA)


@pytest.mark.parametrize("parts", [[[9, 2, 7], [4], [11, 5, 3]], [[1, 2], [3, 4, 5]], [[6]], [[]]])
def test_the_verified_parts_come_back_as_one_table_in_id_order(parts):
    tables = [_state_rows(ids) for ids in parts]
    expected = pa.concat_tables(tables).sort_by("image_id").combine_chunks()
    got = sorted_by_id(tables)
    assert got.equals(expected) and got.schema == IMAGE_SCHEMA
    assert all(got.column(name).num_chunks == 1 for name in got.column_names)
    assert tables == []  # the parts are let go


def test_a_take_of_every_row_in_order_is_the_table_itself():
    table = pa.concat_tables([_state_rows([5, 1]), _state_rows([3])])
    assert take_rows(table, np.arange(3)) is table
    assert take_rows(table, np.array([2, 0])).equals(table.take([2, 0]))
    assert take_rows(table, np.array([0, 1])).equals(table.take([0, 1]))  # a prefix is a copy
    assert take_rows(table, np.array([1, 0, 2])).column("image_id").to_pylist() == [1, 5, 3]


def test_small_parts_are_gathered_in_order_into_tables_of_one_chunk(monkeypatch):
    monkeypatch.setattr(state, "GATHER_ROWS", 3)
    parts = [_state_rows([2 * k + 1, 2 * k]) for k in range(5)]
    gathered = state.Gathered()
    for part in parts:
        gathered.add(part)
    tables = gathered.tables()
    assert [t.num_rows for t in tables] == [4, 4, 2]
    assert all(c.num_chunks == 1 for t in tables[:2] for c in t.columns)
    assert pa.concat_tables(tables).equals(pa.concat_tables(parts))
    uri, source = tables[0].column("uri").chunk(0), tables[0].column("source_uri").chunk(0)
    assert uri.buffers()[2].address == source.buffers()[2].address  # equal: held once


def test_a_reference_holds_its_uri_and_source_uri_in_one_buffer():
    got = sorted_by_id([_state_rows([3, 1]), _state_rows([2])])
    uri, source = got.column("uri").chunk(0), got.column("source_uri").chunk(0)
    assert uri.buffers()[2].address == source.buffers()[2].address
    copies = _state_rows([3, 1]).set_column(1, "uri", pa.array(["/root/3.jpg", "/root/1.jpg"]))
    got = sorted_by_id([copies])
    assert got.column("uri").to_pylist() == ["/root/1.jpg", "/root/3.jpg"]
    assert got.column("source_uri").to_pylist() == ["/m/1.jpg", "/m/3.jpg"]


@pytest.mark.parametrize("mode", ["copy", "reference"])
def test_a_rerun_decides_reuse_a_block_of_records_at_a_time_with_the_same_outcome(mirror, reads, tmp_path,
                                                                                  monkeypatch, mode):
    """Blocks of 4 recorded rows over 6 images, records to keep and to drop in both blocks: the source
    URIs are built for a block at most, and the ids fetched again and the table are those of one block."""
    root = str(tmp_path / "root")
    settings = FetchConfig(mode=mode, batch_size=3)
    if mode == "copy":
        first = fetch_images(IDS, str(mirror), root, settings)  # recorded 11 3 7 | 42 5 19
        images = tmp_path / "root" / "ava" / "images"
        (images / "11.jpg").write_bytes(b"x")  # first block: a copy of another size
        (images / "5.jpg").rename(images / "05.jpg")  # second block: not the name of 5's copy
        expected = [5, 11]
    else:
        other = tmp_path / "other"
        shutil.copytree(mirror, other)
        fetch_images(IDS, str(other), root, settings)
        first = fetch_images([11, 42], str(mirror), root, settings)  # latest: 3 7 5 19 (other) | 11 42
        expected = [3, 5, 7, 19]
    reads.clear()

    built: list[int] = []
    real_uris = fetch.ImageSource.uris
    monkeypatch.setattr(fetch.ImageSource, "uris", lambda self, ids: built.append(len(ids)) or real_uris(self, ids))
    monkeypatch.setattr(state, "PLAN_ROWS", 4)
    again = fetch_images(IDS, str(mirror), root, settings)
    assert max(built) <= 4 and sum(built) >= len(IDS)
    assert _fetched_ids(reads) == expected
    assert (again.n_skipped, again.n_fetched) == (len(IDS) - len(expected), len(expected))
    assert again.images.column("source_uri").to_pylist() == [str(mirror / f"{i}.jpg") for i in sorted(IDS)]
    if mode == "copy":
        assert again.images.equals(first.images)

    monkeypatch.setattr(state, "PLAN_ROWS", 65_536)
    one_block = fetch_images(IDS, str(mirror), root, settings)
    assert _fetched_ids(reads) == []
    assert one_block.images.equals(again.images) and one_block.rejected.equals(again.rejected)


@pytest.mark.parametrize("gather_rows", [16_384, 3])
def test_the_record_is_read_for_the_asked_ids_only_the_latest_row_of_each(mirror, tmp_path, monkeypatch,
                                                                         gather_rows):
    """Parts of 2 rows, gathered by 3 or more rows (or all in one): the ids are picked out either way."""
    monkeypatch.setattr(state, "GATHER_ROWS", gather_rows)
    root = str(tmp_path / "root")
    fetch_images(IDS, str(mirror), root, FetchConfig(batch_size=2))
    fetch_images([7, 42], str(mirror), root, FetchConfig(full_decode=True))
    got = load_state(root, np.array([42, 3, 7, 1000]))
    assert sorted(got.column("image_id").to_pylist()) == [3, 7, 42]
    assert dict(zip(got.column("image_id").to_pylist(), got.column("verified").to_pylist(), strict=True)) == {
        3: "header", 7: "full", 42: "full"}
    assert load_state(root, np.array([], dtype=np.int64)).num_rows == 0
    assert load_state(root).num_rows == len(IDS)


def test_a_temporary_left_by_a_run_killed_while_writing_a_part_is_no_part(mirror, reads, tmp_path):
    """``write_parquet_atomic`` writes ``.tmp-<uuid>-part-*.parquet`` beside the part, then renames it:
    a kill in between leaves it, maybe empty. The next run resumes from the finished parts."""
    root = str(tmp_path / "root")
    first = fetch_images(IDS, str(mirror), root, FetchConfig(mode="reference", batch_size=2))
    folder = tmp_path / "root" / "ava" / "_fetch"
    (folder / ".tmp-0123abcd-part-99999999999999999999-0123abcd.parquet").write_bytes(b"")
    assert load_state(root).num_rows == len(IDS)
    reads.clear()
    again = fetch_images(IDS, str(mirror), root, FetchConfig(mode="reference"))
    assert _fetched_ids(reads) == [] and again.images.equals(first.images)
