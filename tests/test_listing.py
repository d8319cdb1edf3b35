"""tasks/scoring/listing.py: folders, globs, manifests and S3 prefixes; facts from the listing only."""

from __future__ import annotations

import hashlib
import io
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.core import storage
from tasks.scoring.listing import (
    SourceObject,
    cut_into_shards,
    image_format_of,
    image_id_from_name,
    is_image_name,
    list_source,
)

NAMES = {
    "12.jpg": True, "b/13.JPG": True, "b/c/x.jpeg": True, "y.PNG": True, "z.webp": True, "Q.JpEg": True,
    "notes.txt": False, "anim.gif": True, "README": False, "b/raw.tiff": True, "jpg": False, "c.BMP": True,
    "d.tga": True, "e.jp2": True, "f.pgm": True,
}


def _populate(folder) -> None:
    for i, name in enumerate(sorted(NAMES)):
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * (i + 1))


def test_folder_lists_images_with_facts_and_counts_the_rest(tmp_path):
    _populate(tmp_path)
    listing = list_source(str(tmp_path))
    expected = sorted(str(tmp_path / n) for n, is_image in NAMES.items() if is_image)
    assert [o.uri for o in listing.objects] == expected
    assert listing.skipped_non_image == sum(not v for v in NAMES.values())
    for obj in listing.objects:
        st = os.stat(obj.uri)
        assert obj.size == st.st_size and obj.mtime == pytest.approx(st.st_mtime, abs=1e-6)
        assert obj.etag is None
    ids = {os.path.basename(o.uri): o.image_id for o in listing.objects}
    assert ids["12.jpg"] == 12 and ids["13.JPG"] == 13 and ids["x.jpeg"] is None


def test_glob_and_missing_source(tmp_path):
    _populate(tmp_path)
    listing = list_source(str(tmp_path / "b" / "*"))
    assert [os.path.basename(o.uri) for o in listing.objects] == ["13.JPG", "raw.tiff"]
    assert listing.skipped_non_image == 0  # folder c is not a file
    with pytest.raises(FileNotFoundError):
        list_source(str(tmp_path / "nope"))


def test_manifest_takes_ids_from_it_and_facts_from_the_folder_listing(tmp_path):
    _populate(tmp_path)
    uris = [str(tmp_path / "y.PNG"), str(tmp_path / "b" / "13.JPG"), str(tmp_path / "gone.jpg"),
            str(tmp_path / "notes.txt")]
    manifest = tmp_path / "m.parquet"
    pq.write_table(pa.table({"uri": uris, "image_id": pa.array([7, 8, 9, 10], pa.int64())}), manifest)
    listing = list_source(str(manifest))
    by_name = {os.path.basename(o.uri): o for o in listing.objects}
    assert sorted(by_name) == ["13.JPG", "gone.jpg", "y.PNG"]
    assert by_name["y.PNG"].image_id == 7 and by_name["13.JPG"].image_id == 8  # the manifest's ids win
    assert by_name["y.PNG"].size == os.stat(tmp_path / "y.PNG").st_size
    assert by_name["gone.jpg"].size is None  # kept: scoring turns it into a fetch error row
    assert listing.skipped_non_image == 1


@pytest.mark.s3
def test_s3_prefix_gets_etags_from_the_listing_without_one_request_per_object(s3_bucket, monkeypatch):
    import s3fs

    payloads = {f"imgs/{i}.jpg": os.urandom(100 + i) for i in range(5)}
    payloads["imgs/sub/a.webp"] = b"webp-bytes"
    payloads["imgs/skip.json"] = b"{}"
    for key, data in payloads.items():
        storage.write_bytes_atomic(storage.join(s3_bucket, key), data)

    real_info = s3fs.S3FileSystem._info

    async def info_of_the_source_only(self, path, *args, **kwargs):
        # One look at the source prefix is fine; a HEAD per listed object is what must not happen.
        assert not path.rstrip("/").endswith(tuple(payloads)), f"per-object HEAD of {path}"
        return await real_info(self, path, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_info", info_of_the_source_only)
    listing = list_source(storage.join(s3_bucket, "imgs"))
    assert [o.uri for o in listing.objects] == sorted(storage.join(s3_bucket, k) for k in payloads if "json" not in k)
    assert listing.skipped_non_image == 1
    for obj in listing.objects:
        data = payloads[obj.uri.split("/", 3)[3]]
        assert obj.size == len(data)
        assert obj.etag == hashlib.md5(data).hexdigest()  # single-part upload: ETag is the MD5
        assert obj.mtime is not None


def test_fingerprint_follows_content_facts():
    base = SourceObject("s3://b/1.jpg", size=10, etag="abc", mtime=1.0)
    assert base.fingerprint == SourceObject("s3://b/1.jpg", size=10, etag="abc", mtime=99.0).fingerprint
    assert base.fingerprint != SourceObject("s3://b/1.jpg", size=10, etag="abd", mtime=1.0).fingerprint
    local = SourceObject("/x/1.jpg", size=10, mtime=1.0)
    assert local.fingerprint != SourceObject("/x/1.jpg", size=10, mtime=1.5).fingerprint
    assert local.fingerprint != SourceObject("/x/1.jpg", size=11, mtime=1.0).fingerprint


def test_cut_into_shards_keeps_order_and_the_short_tail():
    objects = [SourceObject(f"/{i}.jpg") for i in range(7)]
    shards = cut_into_shards(objects, 3)
    assert [len(s) for s in shards] == [3, 3, 1]
    assert [o for s in shards for o in s] == objects
    assert cut_into_shards([], 3) == []
    with pytest.raises(ValueError):
        cut_into_shards(objects, 0)


def test_names():
    assert is_image_name("a/B.WebP") and not is_image_name("a.jpg.txt")
    for name in ("a.gif", "a.bmp", "a.tif", "a.TIFF", "a.ppm", "a.tga", "a.ico", "a.pcx", "a.qoi", "a.jfif"):
        assert is_image_name(name), name
    for name in ("a.eps", "a.pdf", "a.wmf", "a.h5", "a.txt", "a.json", "a"):  # not decoded, or not images
        assert not is_image_name(name), name


def _encoded(fmt: str, mode: str = "RGB") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, (8, 6), 90).save(buf, fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "PCX", "QOI", "SGI"])
def test_magic_numbers_name_the_format(fmt):
    assert image_format_of(_encoded(fmt)[:64]) == fmt
    assert image_format_of(b"") is None and image_format_of(b"{}") is None


def test_files_without_an_image_extension_are_decided_by_content(tmp_path):
    (tmp_path / "IMG_0001").write_bytes(_encoded("JPEG"))
    (tmp_path / "scan.dat").write_bytes(_encoded("TIFF"))
    (tmp_path / "anim.txt").write_bytes(_encoded("GIF"))
    (tmp_path / "notes.txt").write_bytes(b"eggs, milk\n")
    (tmp_path / "data.parquet").write_bytes(b"PAR1" + b"\0" * 40)
    (tmp_path / "empty").write_bytes(b"")
    listing = list_source(str(tmp_path))
    assert sorted(os.path.basename(o.uri) for o in listing.objects) == ["IMG_0001", "anim.txt", "scan.dat"]
    assert listing.by_content == 3 and listing.skipped_non_image == 3
    assert image_id_from_name("s3://b/p/953619.jpg") == 953619 and image_id_from_name("/a/1b.jpg") is None
