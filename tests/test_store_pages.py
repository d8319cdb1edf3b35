"""tasks/core/store_pages.py: an S3 prefix or ``**`` glob listed a page at a time lists what
``fs.find`` / ``fs.glob`` list, with the same requests, and never the whole bucket's info dicts at once."""

from __future__ import annotations

import pytest

from tasks.core import storage, store_pages
from tasks.scoring import listing

N_IMAGES = 2_500  # three list pages of 1,000 keys


@pytest.fixture
def bucket(s3_bucket) -> str:
    """``s3_bucket`` with 2,500 images under nested prefixes of ``imgs/``, a text file, a ``folder/``
    placeholder key, and keys beside the prefix (``imgs2/``, ``other/``) that a listing of it must not
    take; put straight into the in-process moto server (2,500 PUTs over HTTP would take the test's time)."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    name = s3_bucket.removeprefix("s3://")
    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    for i in range(N_IMAGES):
        backend.put_object(name, f"imgs/{i % 3}/{i // 100:02d}/{i}.jpg", b"jpeg-%d" % i)
    for key, data in {"imgs/notes.txt": b"text", "imgs/folder/": b"", "imgs2/9.jpg": b"x", "other/8.jpg": b"y",
                      "imgs/1/raw.png": b"\x89PNG\r\n\x1a\n....", "imgs/1/IMG_0001": b"\xff\xd8\xff\xe0...."}.items():
        backend.put_object(name, key, data)
    return s3_bucket


@pytest.fixture
def pages(monkeypatch) -> list[int]:
    """The number of info dicts in each page ``store_pages`` hands on (empty: it was not used)."""
    taken: list[int] = []
    real_take = store_pages._take

    async def counted(entries, n):
        page = await real_take(entries, n)
        taken.append(len(page))
        return page

    monkeypatch.setattr(store_pages, "_take", counted)
    return taken


def _flat(source: str, monkeypatch) -> listing.Listing:
    """What ``list_source`` gave before paging: s3fs's own find / glob of the whole source."""
    with monkeypatch.context() as patch:
        patch.setattr(store_pages, "lists_by_page", lambda fs: False)
        return listing.list_source(source)


def _same(paged: listing.Listing, flat: listing.Listing) -> None:
    assert list(paged.objects) == list(flat.objects)  # URIs, size, ETag, mtime, image_id, in order
    assert (paged.skipped_non_image, paged.skipped_examples, paged.by_content) == (
        flat.skipped_non_image, flat.skipped_examples, flat.by_content)


def test_a_prefix_is_listed_page_by_page_as_find_lists_it(bucket, pages, monkeypatch, s3_list_requests):
    import s3fs

    source = storage.join(bucket, "imgs")
    requests = s3_list_requests
    flat = _flat(source, monkeypatch)
    flat_requests = len(requests)

    real_find = s3fs.S3FileSystem._find

    async def no_find(self, path, *args, **kwargs):
        raise AssertionError(f"the whole listing of {path} was built at once (find)")

    monkeypatch.setattr(s3fs.S3FileSystem, "_find", no_find)
    paged = listing.list_source(source)
    monkeypatch.setattr(s3fs.S3FileSystem, "_find", real_find)

    assert max(pages) <= store_pages._PAGE and len([n for n in pages if n]) == 3  # 2,505 keys: 3 pages
    assert len(requests) - flat_requests == flat_requests  # as many list requests as find made
    _same(paged, flat)
    uris = [o.uri for o in paged.objects]
    assert len(uris) == N_IMAGES + 2  # and raw.png, IMG_0001 (by content); not the folder/ placeholder
    assert storage.join(bucket, "imgs/1/IMG_0001") in uris and paged.by_content == 1
    assert paged.skipped_examples == [storage.join(bucket, "imgs/notes.txt")]
    assert not any("imgs2/" in u or "other/" in u for u in uris)
    assert all(o.etag and o.size and o.mtime for o in paged.objects if o.uri.endswith(".jpg"))


@pytest.mark.parametrize("pattern", ["imgs/**/*.jpg", "imgs/1/**", "im*/**/*.jpg", "imgs/[01]/**/0*.jpg"])
def test_a_double_star_glob_is_listed_page_by_page_as_glob_lists_it(bucket, pages, pattern, monkeypatch):
    source = storage.join(bucket, pattern)
    flat = _flat(source, monkeypatch)
    pages.clear()
    paged = listing.list_source(source)
    assert pages and max(pages) <= store_pages._PAGE
    _same(paged, flat)
    assert paged.objects


def test_other_globs_and_a_single_key_keep_s3fs_own_listing(bucket, pages, monkeypatch):
    source = storage.join(bucket, "imgs/1/0?/*.jpg")  # no **: fs.glob lists one folder per level
    flat = _flat(source, monkeypatch)
    pages.clear()
    paged = listing.list_source(source)
    assert not pages
    _same(paged, flat)
    assert len(paged.objects) == len([i for i in range(N_IMAGES) if i % 3 == 1 and i < 1_000])

    one = listing.list_source(storage.join(bucket, "imgs/0/00/0.jpg"))  # a key, no prefix: its own listing
    assert [o.uri for o in one.objects] == [storage.join(bucket, "imgs/0/00/0.jpg")] and one.objects[0].etag


def test_a_store_other_than_s3_keeps_its_find(pages):
    import fsspec

    fs = fsspec.filesystem("memory")
    for name in ("paged/a/1.jpg", "paged/b/2.png", "paged/c.txt"):
        fs.pipe(f"/{name}", b"x")
    try:
        got = listing.list_source("memory://paged")
        assert [o.uri for o in got.objects] == ["memory:///paged/a/1.jpg", "memory:///paged/b/2.png"]
        assert got.skipped_non_image == 1 and not pages
    finally:
        fs.rm("/paged", recursive=True)
