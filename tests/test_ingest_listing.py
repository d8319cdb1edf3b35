"""tasks/ingest/state.py's ``list_files`` of an S3 folder (the image source, the copies) read a list page
at a time (``store_pages.folder_pages``) lists what ``fs.ls`` lists, with the same requests, and leaves
no info dict in s3fs's listing cache."""

from __future__ import annotations

import pyarrow as pa
import pytest

from tasks.core import storage, store_pages
from tasks.ingest import state

N_FILES = 2_100  # three list pages of 1,000 keys in one folder


@pytest.fixture
def folder(s3_bucket) -> str:
    """``imgs/`` of ``s3_bucket``: 2,100 images, a ``folder/`` placeholder key of its own, a subfolder and
    keys beside it (``imgs2/``) that its listing must not take; put straight into the in-process moto
    server (2,100 PUTs over HTTP would take the test's time)."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    name = s3_bucket.removeprefix("s3://")
    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    for i in range(N_FILES):
        backend.put_object(name, f"imgs/{i + 1}.jpg", b"jpeg-%d" % i)
    for key, data in {"imgs/": b"", "imgs/sub/9.jpg": b"nested", "imgs/notes.txt": b"text",
                      "imgs2/1.jpg": b"beside"}.items():
        backend.put_object(name, key, data)
    return storage.join(s3_bucket, "imgs")


def _flat(folder: str, monkeypatch) -> pa.Table:
    """What ``list_files`` gave before paging: s3fs's ``ls`` of the whole folder."""
    with monkeypatch.context() as patch:
        patch.setattr(store_pages, "lists_by_page", lambda fs: False)
        return state.list_files(folder)


def test_an_s3_folder_is_listed_page_by_page_as_ls_lists_it(folder, monkeypatch, s3_list_requests):
    requests = s3_list_requests
    sizes: list[int] = []
    real_batch = state._listing_batch
    monkeypatch.setattr(state, "_listing_batch", lambda infos: sizes.append(len(infos)) or real_batch(infos))

    paged = state.list_files(folder)
    paged_requests = len(requests)
    fs, path = storage.filesystem(folder)
    assert path not in fs.dircache  # no info dict kept for the process's life
    assert len([n for n in sizes if n]) == 3 and max(sizes) <= store_pages._PAGE

    flat = _flat(folder, monkeypatch)
    assert paged.equals(flat)  # names and sizes, in order
    assert len(requests) - paged_requests == paged_requests  # as many list requests as ls made
    names = paged.column("name").to_pylist()
    assert len(names) == N_FILES + 2  # the notes and the placeholder key (as ls has them); no subfolder
    assert {"1.jpg", f"{N_FILES}.jpg", "notes.txt"} <= set(names) and "sub" not in names
    assert paged.column("size").to_pylist()[names.index("1.jpg")] == len(b"jpeg-0")


def test_a_missing_folder_and_a_key_list_as_before(folder, monkeypatch):
    for where in (storage.join(folder, "nothing-here"), storage.join(folder, "7.jpg")):
        assert state.list_files(where).equals(_flat(where, monkeypatch))
    assert state.list_files(storage.join(folder, "7.jpg")).column("name").to_pylist() == ["7.jpg"]
