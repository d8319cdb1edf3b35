"""The loopback S3 server fixture works with the project's storage helpers."""

import pyarrow as pa

from tasks.core import storage


def test_roundtrip_through_s3(s3_bucket):
    url = storage.join(s3_bucket, "a/b/t.parquet")
    storage.write_parquet_atomic(pa.table({"x": [1, 2, 3]}), url)
    assert storage.exists(url)
    assert storage.read_parquet(url).column("x").to_pylist() == [1, 2, 3]
    storage.write_bytes_atomic(storage.join(s3_bucket, "raw.bin"), b"abc")
    assert storage.read_bytes(storage.join(s3_bucket, "raw.bin")) == b"abc"


def test_a_small_read_after_a_listing_does_not_look_the_size_up(s3_bucket):
    """s3fs looks an object's size up before a cat_file (to choose a ranged parallel download), and
    once the folder is listed that lookup scans the cached listing: O(objects in the folder) a read."""
    for i in range(3):
        storage.write_bytes_atomic(storage.join(s3_bucket, f"images/{i}.jpg"), b"jpeg%d" % i)
    fs, folder = storage.filesystem(storage.join(s3_bucket, "images"))
    assert len(fs.ls(folder)) == 3  # the listing is now in s3fs's cache, as after ingest's listing

    def no_lookup(*args, **kwargs):
        raise AssertionError("the size was looked up")

    fs._info, saved = no_lookup, fs._info
    try:
        assert storage.read_bytes(storage.join(s3_bucket, "images/2.jpg"), small=True) == b"jpeg2"
    finally:
        fs._info = saved
    assert storage.read_bytes(storage.join(s3_bucket, "images/1.jpg")) == b"jpeg1"
