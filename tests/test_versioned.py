"""tasks/core/versioned.py: create, replace and remove act only on the state they were given, on a
local disk and on S3 (moto, which answers If-None-Match and If-Match as S3 does)."""

from __future__ import annotations

import os

import pytest

from tasks.core import storage, versioned


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def url(request, tmp_path) -> str:
    root = request.getfixturevalue("s3_bucket") if request.param == "s3" else str(tmp_path)
    return storage.join(root, "out", "_thing.lock")


def test_create_only_where_nothing_is(url):
    first = versioned.create(url, b"one")
    assert first and versioned.read(url) == (b"one", first)
    assert versioned.create(url, b"two") is None
    assert versioned.read(url) == (b"one", first)


def test_replace_and_remove_need_the_version_now_there(url):
    v1 = versioned.create(url, b"holder A")
    v2 = versioned.replace(url, b"holder A, later", v1)
    assert v2 and v2 != v1 and versioned.read(url) == (b"holder A, later", v2)
    # Someone holding the first version (a stalled writer) changes nothing any more.
    assert versioned.replace(url, b"stale write", v1) is None
    assert not versioned.remove(url, v1)
    assert versioned.read(url) == (b"holder A, later", v2)
    assert versioned.remove(url, v2)
    assert versioned.read(url) is None
    # Gone: a replace or remove of any version does nothing, and creates nothing.
    assert versioned.replace(url, b"resurrected", v2) is None
    assert not versioned.remove(url, v2)
    assert versioned.read(url) is None


def test_a_new_object_with_the_same_name_is_another_version(url):
    """Removed and created again by someone else: the old version must not match the new object
    (on a local disk the freed inode may be reused). Identical bytes would be the same version (an S3
    ETag is their MD5): callers write a token of their own in them, as the output lock its owner."""
    old = versioned.create(url, b"first owner")
    assert versioned.remove(url, old)
    new = versioned.create(url, b"other owner")
    assert not versioned.remove(url, old) and versioned.replace(url, b"x", old) is None
    assert versioned.read(url) == (b"other owner", new)


def test_local_writes_leave_no_private_files(tmp_path):
    url = str(tmp_path / "_thing.lock")
    v = versioned.create(url, b"a")
    assert versioned.create(url, b"b") is None
    v = versioned.replace(url, b"c", v)
    assert versioned.replace(url, b"d", "0-stale") is None
    assert os.listdir(tmp_path) == ["_thing.lock"]
    assert versioned.remove(url, v) and os.listdir(tmp_path) == []
