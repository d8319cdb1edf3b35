"""DuckDB's view of a remote filesystem (tasks/analysis/duckdb_storage.py): a group of files a query reads
together comes in one batch at its first open, each file once, within the cache's byte budget."""

from __future__ import annotations

import fsspec
import pytest

from tasks.analysis.duckdb_storage import info_once_per_path, read_groups


@pytest.fixture
def memory_fs():
    """A fresh in-memory filesystem whose ``cat_ranges`` records each batch it was asked for. fsspec's
    memory store is one per process, whatever the instance: ``/bucket`` is emptied before and after, so
    no other test sees these files (test_sql globs ``memory://bucket/*``)."""
    fs = fsspec.filesystem("memory", skip_instance_cache=True)
    if fs.exists("/bucket"):
        fs.rm("/bucket", recursive=True)
    fs.batches = []
    plain_cat_ranges = fs.cat_ranges
    fs.cat_ranges = lambda paths, *args, **kw: fs.batches.append(sorted(paths)) or plain_cat_ranges(paths, *args, **kw)
    yield fs
    if fs.exists("/bucket"):
        fs.rm("/bucket", recursive=True)


def _read(view, name: str) -> bytes:
    with view.open(f"memory://bucket/{name}.parquet", "rb") as f:
        return f.read()


def test_the_first_open_of_a_group_fetches_its_small_files_in_one_batch_each_once(memory_fs):
    sizes = {"a": 10, "b": 20, "c": 30, "big": 101, "x": 5, "y": 6}
    for name, size in sizes.items():
        memory_fs.pipe_file(f"/bucket/{name}.parquet", bytes(range(size)))
    view = info_once_per_path(memory_fs, cache_bytes=400)  # files up to 100 bytes are kept
    view.fetch_together([[f"memory://bucket/{n}.parquet" for n in ("a", "b", "c", "big")],
                         [f"memory://bucket/{n}.parquet" for n in ("x", "y")]])
    for _ in range(2):
        for name in ("b", "a", "c", "big"):
            assert _read(view, name) == bytes(range(sizes[name]))
    # one batch for the group's small files; the big one is read through the filesystem, never kept;
    # the other group is not fetched until one of its files is opened
    assert memory_fs.batches == [["/bucket/a.parquet", "/bucket/b.parquet", "/bucket/c.parquet"]]
    assert _read(view, "y") == bytes(range(6)) and _read(view, "x") == bytes(range(5))
    assert memory_fs.batches[1:] == [["/bucket/x.parquet", "/bucket/y.parquet"]]


def test_a_group_larger_than_the_budget_comes_in_batches_that_fit_it(memory_fs):
    names = [f"d{i}" for i in range(6)]
    for name in names:
        memory_fs.pipe_file(f"/bucket/{name}.parquet", bytes(24))
    # four files of 24 bytes fit, not five; a batch may fill the cache
    view = info_once_per_path(memory_fs, cache_bytes=100, batch_bytes=100)
    view.fetch_together([[f"/bucket/{n}.parquet" for n in names]])
    for name in names:
        assert _read(view, name) == bytes(24)
    batches = memory_fs.batches
    assert [len(b) for b in batches] == [4, 2]
    assert sorted(path for batch in batches for path in batch) == [f"/bucket/{n}.parquet" for n in names]
    # the second batch let the two least recently opened go: reading d0 again fetches those two again
    # (d2-d5 held: 96 bytes); room is made first, the least recently opened going (d2, d3), so the
    # cache never holds more than its budget, and d4, d5 are still held
    assert _read(view, "d0") == bytes(24) and batches[-1] == ["/bucket/d0.parquet", "/bucket/d1.parquet"]
    assert _read(view, "d5") == _read(view, "d4") == bytes(24) and len(batches) == 3
    assert _read(view, "d2") == bytes(24) and batches[-1] == ["/bucket/d2.parquet", "/bucket/d3.parquet"]


def test_a_file_of_the_group_gone_since_the_listing_fails_only_its_own_open(memory_fs):
    for name in ("a", "b"):
        memory_fs.pipe_file(f"/bucket/{name}.parquet", b"1234")
    view = info_once_per_path(memory_fs)
    view.fetch_together([["/bucket/a.parquet", "/bucket/b.parquet"]])
    view.info("/bucket/b.parquet")  # listed ...
    memory_fs.rm("/bucket/b.parquet")  # ... then removed
    assert _read(view, "a") == b"1234"
    with pytest.raises(FileNotFoundError):
        _read(view, "b")


def test_read_groups_puts_the_manifests_together_and_each_version_apart():
    files = {"manifests": ["s3://b/m/test.parquet"], "rejected": ["s3://b/m/rejected.parquet"],
             "predictions": ["s3://b/p/model_version=v1/date=2024-01-01/p0.parquet",
                             "s3://b/p/model_version=v2/date=2024-01-01/p0.parquet",
                             "s3://b/p/model_version=v1/date=2024-01-02/p0.parquet"]}
    assert read_groups(files) == [
        ["s3://b/m/test.parquet", "s3://b/m/rejected.parquet"],
        ["s3://b/p/model_version=v1/date=2024-01-01/p0.parquet", "s3://b/p/model_version=v1/date=2024-01-02/p0.parquet"],
        ["s3://b/p/model_version=v2/date=2024-01-01/p0.parquet"]]


@pytest.mark.s3
def test_a_file_too_big_to_keep_is_read_by_the_ranges_asked_not_a_read_ahead_block(s3_bucket, monkeypatch):
    """DuckDB reads a big Parquet file by column chunks; s3fs's default read-ahead fetched from each
    offset to ~50 MB past it (800 MB of GETs for a 94 MB file of bench_sql's independent layout)."""
    import s3fs

    from tasks.core import storage

    url = f"{s3_bucket}/big.parquet"
    fs, path = storage.filesystem(url)
    fs.pipe_file(path, bytes(range(256)) * 8192)  # 2 MB
    asked: list[str] = []
    plain = s3fs.S3FileSystem._call_s3

    async def recorded(self, method, *args, **kwargs):
        if method == "get_object":
            asked.append(kwargs.get("Range", "whole"))
        return await plain(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", recorded)
    view = info_once_per_path(fs, cache_bytes=2**20)  # files over 256 KB are not kept
    with view.open(url, "rb") as f:
        f.seek(2**20)
        assert f.read(1000) == (bytes(range(256)) * 4)[:1000]
        f.seek(100)
        assert f.read(10) == bytes(range(100, 110))
    assert asked == [f"bytes={2**20}-{2**20 + 999}", "bytes=100-109"]


def test_a_batch_takes_the_files_after_the_one_opened_first(memory_fs):
    """DuckDB opens a version's files in the group's order. Taken from the group's start, a batch for a
    version bigger than the cache refetched the files it had just let go at each open past them
    (5,008 shard files over S3: 11,350 GETs to connect)."""
    names = [f"d{i}" for i in range(6)]
    for name in names:
        memory_fs.pipe_file(f"/bucket/{name}.parquet", bytes(24))
    view = info_once_per_path(memory_fs, cache_bytes=100, batch_bytes=100)  # four files of 24 bytes, one batch
    view.fetch_together([[f"/bucket/{n}.parquet" for n in names]])
    assert _read(view, "d3") == bytes(24)
    # d3, then the files after it, then (room left) the first before it
    assert memory_fs.batches == [["/bucket/d0.parquet", "/bucket/d3.parquet", "/bucket/d4.parquet",
                                  "/bucket/d5.parquet"]]
    assert _read(view, "d4") == bytes(24) and len(memory_fs.batches) == 1


def test_files_fetched_and_not_read_yet_are_let_go_last(memory_fs):
    """Two scan threads read a version a few files apart. A batch for the one ahead let go of the
    least recently read files first, which were the files fetched for the one behind and not read
    yet: it fetched them again, and its batch let go of the first one's (5,008 shard files over S3)."""
    names = [f"d{i}" for i in range(6)]
    for name in names:
        memory_fs.pipe_file(f"/bucket/{name}.parquet", bytes(24))
    view = info_once_per_path(memory_fs, cache_bytes=100, batch_bytes=100)  # four files of 24 bytes, one batch
    view.fetch_together([[f"/bucket/{n}.parquet" for n in names]])
    for name in ("d0", "d1", "d4"):  # d2 and d3 came with d0 and are not read yet when d4 comes
        assert _read(view, name) == bytes(24)
    assert [len(b) for b in memory_fs.batches] == [4, 2]
    assert _read(view, "d2") == _read(view, "d3") == _read(view, "d5") == bytes(24)
    assert len(memory_fs.batches) == 2  # d0 and d1, read, made the room for d4 and d5


def test_two_scans_of_a_group_bigger_than_the_cache_fetch_each_file_once(memory_fs):
    """DuckDB's scans read a version at two places at once (two threads, or a second scan of the same
    files). A batch that filled the whole cache let go of the other scan's files before it read them,
    so each open fetched a whole cache again (5,008 shard files, 473 MB, over S3: no answer in 400 s).
    A batch of a quarter of the cache leaves the other scan's batch in place."""
    names = [f"d{i:02}" for i in range(16)]
    for name in names:
        memory_fs.pipe_file(f"/bucket/{name}.parquet", bytes(24))
    view = info_once_per_path(memory_fs, cache_bytes=200)  # eight files of 24 bytes fit; a batch holds two
    view.fetch_together([[f"/bucket/{n}.parquet" for n in names]])
    for first, second in zip(names[:8], names[8:], strict=True):  # two scans, eight files apart
        assert _read(view, first) == _read(view, second) == bytes(24)
    assert [len(batch) for batch in memory_fs.batches] == [2] * 8
    assert sorted(path for batch in memory_fs.batches for path in batch) == [f"/bucket/{n}.parquet" for n in names]


def test_files_the_cache_lets_go_are_read_again_from_local_disk_not_fetched_again(memory_fs, tmp_path):
    """A version bigger than the cache, scanned twice (latest_by_place's second scan): with a spill folder
    each file is fetched once and read back from disk after; past the spill budget, fetched again."""
    names = [f"d{i}" for i in range(6)]
    for i, name in enumerate(names):
        memory_fs.pipe_file(f"/bucket/{name}.parquet", bytes([i]) * 24)
    group = [[f"/bucket/{n}.parquet" for n in names]]
    # four files of 24 bytes fit, two a batch; the spill folder holds every file let go
    view = info_once_per_path(memory_fs, cache_bytes=100, batch_bytes=50, spill_dir=str(tmp_path / "spill"))
    view.fetch_together(group)
    for _ in range(3):
        for i, name in enumerate(names):
            assert _read(view, name) == bytes([i]) * 24
    assert sorted(path for batch in memory_fs.batches for path in batch) == sorted(group[0])
    assert 2 <= len(list((tmp_path / "spill").glob("*/*"))) <= len(names)

    memory_fs.batches.clear()  # a budget of one file: the others let go are fetched again
    view = info_once_per_path(memory_fs, cache_bytes=100, batch_bytes=50, spill_dir=str(tmp_path / "small"),
                              spill_bytes=24)
    view.fetch_together(group)
    for _ in range(2):
        for i, name in enumerate(names):
            assert _read(view, name) == bytes([i]) * 24
    assert len(list((tmp_path / "small").glob("*/*"))) == 1
    assert len(memory_fs.batches) > 3


def test_a_spill_folder_that_cannot_be_written_means_fetching_again_not_an_error(memory_fs, tmp_path):
    names = ("a", "b", "c", "d", "e")
    for name in names:
        memory_fs.pipe_file(f"/bucket/{name}.parquet", name.encode() * 24)
    blocked = tmp_path / "a-file"
    blocked.write_bytes(b"")  # a file where the folder should be: makedirs fails
    # four files of 24 bytes fit, one a batch: the fifth lets the first go, and so on
    view = info_once_per_path(memory_fs, cache_bytes=96, batch_bytes=24, spill_dir=str(blocked / "spill"))
    for _ in range(2):
        for name in names:
            assert _read(view, name) == name.encode() * 24
    assert len(memory_fs.batches) == 10


def test_two_caches_sharing_a_spill_folder_keep_their_own_files_and_remove_them(memory_fs, tmp_path):
    """The connections of one process spill into the same folder: each cache writes in a folder of its
    own (numbered alike, they overwrote each other's copies), removed when the cache goes."""
    import gc

    for name in ("a", "b", "c", "d", "e"):
        memory_fs.pipe_file(f"/bucket/{name}.parquet", name.encode() * 24)
    spill = tmp_path / "spill"
    views = [info_once_per_path(memory_fs, cache_bytes=96, batch_bytes=24, spill_dir=str(spill)) for _ in range(2)]
    for view, order in zip(views, (("a", "b", "c", "d", "e"), ("e", "d", "c", "b", "a")), strict=True):
        for name in order:  # the fifth lets the first go to disk: "a" for one, "e" for the other
            assert _read(view, name) == name.encode() * 24
    for view, name in zip(views, ("a", "e"), strict=True):
        assert _read(view, name) == name.encode() * 24  # its own copy, from disk
    assert len(list(spill.iterdir())) == 2
    del views, view
    gc.collect()
    assert list(spill.iterdir()) == []
