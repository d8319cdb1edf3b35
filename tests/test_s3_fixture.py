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
