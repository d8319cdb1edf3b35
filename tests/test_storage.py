"""Storage helpers: one code path for local folders, in-memory fsspec and a real S3 API on loopback."""

from __future__ import annotations

import os
import posixpath
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.core import storage


def _table(n: int = 5) -> pa.Table:
    return pa.table({
        "image_id": pa.array(range(n), pa.int64()),
        "uri": [f"s3://bucket/{i}.jpg" for i in range(n)],
        "dist": pa.array([[0.1] * 10] * n, pa.list_(pa.float32(), 10)),
    })


# ---- URLs -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("url, protocol", [
    ("/tmp/x.parquet", "file"), ("relative/dir", "file"), ("file:///tmp/x", "file"),
    ("s3://bucket/key", "s3"), ("gs://b/k", "gs"), ("https://example.org/a.jpg", "https"),
])
def test_protocol_of(url, protocol):
    assert storage.protocol_of(url) == protocol


def test_join():
    assert storage.join("s3://bucket/", "/runs/", "r1/", "metrics.parquet") == "s3://bucket/runs/r1/metrics.parquet"
    assert storage.join("/data/root", "manifests", "train.parquet") == "/data/root/manifests/train.parquet"
    assert storage.join("s3://bucket/root") == "s3://bucket/root"
    assert storage.join("s3://bucket/root/", "", "a") == "s3://bucket/root/a"  # empty parts skipped


def test_s3_endpoint_from_environment(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    fs, path = storage.filesystem("s3://bucket/a/b.parquet")
    assert path == "bucket/a/b.parquet" and fs.endpoint_url == "http://127.0.0.1:9"
    assert storage.unstrip(fs, path) == "s3://bucket/a/b.parquet"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:8")  # the service-specific variable wins
    assert storage.filesystem("s3://bucket/x")[0].endpoint_url == "http://127.0.0.1:8"
    explicit, _ = storage.filesystem("s3://bucket/x", endpoint_url="http://127.0.0.1:7")
    assert explicit.endpoint_url == "http://127.0.0.1:7"  # storage_options beat the environment


def test_local_paths_stay_paths(tmp_path):
    fs, path = storage.filesystem(str(tmp_path / "a.bin"))
    assert path == str(tmp_path / "a.bin")
    assert storage.unstrip(fs, path) == path  # no "file://" prefix for local files


# ---- atomic writes ----------------------------------------------------------------------------------

def test_write_bytes_creates_parents_and_overwrites(tmp_path):
    target = tmp_path / "deep" / "er" / "file.bin"
    storage.write_bytes_atomic(str(target), b"first")
    assert target.read_bytes() == b"first"
    storage.write_bytes_atomic(str(target), b"second, longer")
    assert storage.read_bytes(str(target)) == b"second, longer"
    assert sorted(os.listdir(target.parent)) == ["file.bin"]  # no temporary files left behind


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "keep.bin"
    storage.write_bytes_atomic(str(target), b"old")
    with pytest.raises(TypeError):
        storage.write_bytes_atomic(str(target), "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["keep.bin"]


def test_write_replaces_the_file_in_one_step(tmp_path):
    """Readers holding the old file keep reading old bytes: the new file is a new inode (rename)."""
    target = tmp_path / "swap.bin"
    storage.write_bytes_atomic(str(target), b"A" * 1000)
    with open(target, "rb") as reader:
        storage.write_bytes_atomic(str(target), b"B" * 1000)
        assert reader.read() == b"A" * 1000
    assert target.read_bytes() == b"B" * 1000


def test_text_and_parquet_round_trip(tmp_path):
    text_url = str(tmp_path / "reports" / "r" / "report.md")
    storage.write_text_atomic(text_url, "# Résumé ✓\n")
    assert storage.read_bytes(text_url).decode("utf-8") == "# Résumé ✓\n"
    url = str(tmp_path / "manifests" / "train.parquet")
    table = _table()
    storage.write_parquet_atomic(table, url)
    assert storage.read_parquet(url).equals(table)
    assert pq.ParquetFile(url).metadata.row_group(0).column(0).compression == "ZSTD"
    storage.write_parquet_atomic(table, url, compression="snappy")
    assert pq.ParquetFile(url).metadata.row_group(0).column(0).compression == "SNAPPY"
    assert storage.read_parquet(url, columns=["image_id"]).column_names == ["image_id"]


def test_hive_partitioned_folder_reads_back(tmp_path):
    """DESIGN's predictions layout: partition keys live in the path only, and reading the folder works."""
    root = tmp_path / "predictions"
    for version, date in (("abc123", "2024-01-01"), ("abc123", "2024-01-02")):
        url = storage.join(str(root), f"model_version={version}", f"date={date}", "part-0.parquet")
        storage.write_parquet_atomic(_table(3), url)
    table = storage.read_parquet(str(root))
    assert table.num_rows == 6
    assert {"model_version", "date"} <= set(table.column_names)
    assert set(table.column("image_id").to_pylist()) == {0, 1, 2}


def test_exists_makedirs_open_url(tmp_path):
    folder = str(tmp_path / "a" / "b")
    assert not storage.exists(folder)
    storage.makedirs(folder)
    storage.makedirs(folder)  # idempotent
    assert storage.exists(folder)
    url = storage.join(folder, "c.txt")
    with storage.open_url(url, "wb") as f:
        f.write(b"hello")
    with storage.open_url(url) as f:
        assert f.read() == b"hello"


def test_other_fsspec_backends_use_the_same_code():
    root = f"memory://mpemd-test-{uuid.uuid4().hex[:8]}"
    url = storage.join(root, "stats", "hist.parquet")
    storage.write_parquet_atomic(_table(4), url)
    assert storage.exists(url) and storage.read_parquet(url).num_rows == 4
    storage.write_bytes_atomic(storage.join(root, "x.bin"), b"\x00\x01")
    assert storage.read_bytes(storage.join(root, "x.bin")) == b"\x00\x01"


# ---- a real S3 API (moto server mode on 127.0.0.1) ----------------------------------------------------

@pytest.mark.s3
def test_s3_round_trips(s3_bucket):
    url = storage.join(s3_bucket, "runs", "r1", "metrics.parquet")
    assert not storage.exists(url)
    storage.write_parquet_atomic(_table(), url)
    assert storage.read_parquet(url).equals(_table())
    storage.write_parquet_atomic(_table(2), url)  # a rerun replaces, never appends
    assert storage.read_parquet(url).num_rows == 2
    raw = storage.join(s3_bucket, "ava", "images", "953619.jpg")
    storage.write_bytes_atomic(raw, b"\xff\xd8 bytes \xff\xd9")
    assert storage.read_bytes(raw) == b"\xff\xd8 bytes \xff\xd9"
    with storage.open_url(raw) as f:
        assert f.read(2) == b"\xff\xd8"
    fs, path = storage.filesystem(raw)
    assert storage.unstrip(fs, path) == raw
    assert sorted(storage.unstrip(fs, p) for p in fs.find(storage.filesystem(s3_bucket)[1])) == sorted([url, raw])


@pytest.mark.s3
def test_a_listed_file_opens_without_a_lookup_and_a_replaced_one_is_an_error(s3_bucket, s3_requests):
    from s3fs.utils import FileExpired

    url = storage.join(s3_bucket, "part", "a.bin")
    storage.write_bytes_atomic(url, b"0123456789")
    fs, path = storage.filesystem(url)
    entry = fs.find(posixpath.dirname(path), detail=True)[path]
    fs.invalidate_cache()  # as a write into the folder leaves it
    s3_requests.clear()
    with storage.open_listed(fs, path, entry) as f:
        assert f.read() == b"0123456789"
    assert s3_requests == ["get_object"]  # no head_object
    storage.write_bytes_atomic(url, b"other bytes, other size")
    with storage.open_listed(fs, path, entry) as f, pytest.raises(FileExpired):
        f.read()
    with storage.open_listed(fs, path, None) as f:  # no entry: an ordinary open
        assert f.read() == b"other bytes, other size"


@pytest.mark.s3
def test_s3_missing_object(s3_bucket):
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(s3_bucket, "nope.bin"))


def test_relative_paths_and_file_urls(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage.write_bytes_atomic("rel.bin", b"relative")
    assert (tmp_path / "rel.bin").read_bytes() == b"relative"
    url = f"file://{tmp_path}/sub/t.parquet"
    storage.write_parquet_atomic(_table(2), url)
    assert storage.read_parquet(url).num_rows == 2
    assert sorted(os.listdir(tmp_path / "sub")) == ["t.parquet"]


def test_file_version_reads_each_backends_info(tmp_path):
    """One reading of ``fs.info`` for every "has this file changed" question (listing, scorer,
    checkpoint cache, runs): local files by size, mtime and inode, object stores by ETag."""
    import datetime as dt

    path = tmp_path / "f.bin"
    path.write_bytes(b"abc")
    local = storage.stat(str(path))
    st = os.stat(path)
    assert (local.size, local.etag, local.inode) == (3, None, st.st_ino)
    assert local.mtime == pytest.approx(st.st_mtime) and local.fingerprint == f"size:3|mtime:{local.mtime!r}"
    when = dt.datetime(2026, 1, 2, 3, 4, 5)
    s3 = storage.file_version({"size": 3, "ETag": '"d41d8"', "LastModified": when})
    assert (s3.etag, s3.fingerprint) == ("d41d8", "etag:d41d8")
    assert s3.mtime == when.replace(tzinfo=dt.timezone.utc).timestamp()  # naive times are UTC
    gcs = storage.file_version({"size": "3", "md5Hash": "q1", "updated": "2026-01-02T03:04:05Z"})
    assert (gcs.size, gcs.etag, gcs.mtime) == (3, "q1", s3.mtime)
    assert storage.file_version({}).fingerprint == "size:None|mtime:None"
    with pytest.raises(FileNotFoundError):
        storage.stat(str(tmp_path / "missing"))


@pytest.mark.s3
def test_file_version_of_an_s3_object_changes_with_its_content(s3_bucket):
    url = f"{s3_bucket}/versioned.bin"
    storage.write_bytes_atomic(url, b"one")
    first = storage.stat(url)
    storage.write_bytes_atomic(url, b"two")
    second = storage.stat(url)
    assert first.etag and second.etag and first.fingerprint != second.fingerprint


# ---- a process that read Parquet from an object store ends cleanly ---------------------------------

_READ_AND_EXIT = {  # the read is the process's last act: the race is with the interpreter's end
    "read_parquet": "import sys; from tasks.core import storage; storage.read_parquet(sys.argv[1])",
    "list_source": "import sys; from tasks.scoring.listing import list_source; list_source(sys.argv[1])",  # a manifest
}


def test_processes_that_read_parquet_from_s3_and_exit_end_cleanly():
    """pyarrow reading through a Python filesystem (or an fsspec file) calls back into Python from its own
    IO threads; one still letting go of the file while the interpreter ended aborted the process (-6,
    "terminate called without an active exception": 17 of 40 such processes, and `mpemd ingest --root
    s3://...` right after its last read). Six, one after another, each reads and exits at once: all end 0.
    The S3 API is a server in its own process, as a real one is (with moto in this process the race did
    not show)."""
    import subprocess
    import sys
    from pathlib import Path

    import s3fs

    from benchmarks.s3_moto import MotoServer

    with MotoServer() as server:
        s3fs.S3FileSystem(endpoint_url=server.endpoint, skip_instance_cache=True, key="testing",
                          secret="testing").mkdir("exits")
        env = {**os.environ, **server.env}
        fs = s3fs.S3FileSystem(endpoint_url=server.endpoint, skip_instance_cache=True, key="testing", secret="testing")
        url = "s3://exits/manifest.parquet"
        buffer = pa.BufferOutputStream()
        pq.write_table(_table(1000), buffer)
        fs.pipe("exits/manifest.parquet", buffer.getvalue().to_pybytes())
        ended = [(done.returncode, done.stderr[-300:]) for code in _READ_AND_EXIT.values() for _ in range(3)
                 if (done := subprocess.run([sys.executable, "-c", code, url], cwd=Path(__file__).resolve().parents[1],
                                            env=env, capture_output=True, text=True, timeout=120))]
    assert [code for code, _ in ended] == [0] * 6, ended


def test_a_parquet_read_from_a_store_leaves_pyarrow_no_python_memory(monkeypatch):
    """pyarrow's worker threads let go of a read's input, and letting go of Python memory (a Python file,
    or the bytes fsspec returned) takes the GIL: a worker that asks for it once the interpreter has begun
    to end is stopped inside a C++ destructor, exit 134 "terminate called without an active exception"
    (docs/performance.md). A bytearray cannot be resized while anything holds its memory: resizing the
    fetched bytes while pyarrow reads them shows that pyarrow holds none of them."""
    sink = pa.BufferOutputStream()
    pq.write_table(_table(1000), sink, row_group_size=100)
    fetched = bytearray(sink.getvalue().to_pybytes())

    class Store:  # what read_parquet_file asks of a non-local filesystem
        def cat_file(self, path: str) -> bytearray:
            return fetched

    read_table = pq.read_table

    def read_while_resizing(source, **kwargs):
        fetched.extend(b"\0")  # BufferError here if the source holds the fetched bytes' memory
        del fetched[-1:]
        return read_table(source, **kwargs)

    monkeypatch.setattr(pq, "read_table", read_while_resizing)
    assert storage.read_parquet_file(Store(), "bucket/t.parquet").equals(_table(1000))


def test_open_parquet_reads_a_small_listed_store_file_from_arrow_memory(monkeypatch):
    """A remote file of at most WHOLE_PARQUET_BYTES (its listing entry says) is read whole into Arrow
    memory, so pyarrow's threads get no Python file to call back into (the exit abort above); a bigger
    one through a Python file, whose columns are fetched by ranges."""
    import fsspec

    fs = fsspec.filesystem("memory")
    sink = pa.BufferOutputStream()
    pq.write_table(_table(1000), sink, row_group_size=100)
    data = sink.getvalue().to_pybytes()
    fs.pipe("/store/t.parquet", data)
    sources: list[type] = []
    real = pq.ParquetFile
    monkeypatch.setattr(pq, "ParquetFile", lambda source, *a, **k: sources.append(type(source)) or real(source, *a, **k))
    for limit in (len(data), len(data) - 1):
        monkeypatch.setattr(storage, "WHOLE_PARQUET_BYTES", limit)
        with storage.open_parquet(fs, "/store/t.parquet", fs.info("/store/t.parquet")) as part:
            assert part.read().equals(_table(1000))
    assert sources[0] is pa.BufferReader and not issubclass(sources[1], pa.NativeFile), sources


@pytest.mark.s3
def test_a_write_into_a_bucket_that_does_not_exist_names_the_url(s3_bucket):
    """s3fs says only "The specified bucket does not exist": the error names the URL written, so the
    command line's one line says which (``mpemd ingest --root s3://nobucket/root``)."""
    url = f"{s3_bucket}-gone/root/ava/AVA.txt"
    with pytest.raises(FileNotFoundError) as error:
        storage.write_bytes_atomic(url, b"x")
    assert error.value.filename == url and "bucket does not exist" in error.value.strerror, error.value

