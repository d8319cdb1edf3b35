"""An S3 prefix, ``**`` glob or folder listed a page at a time: what ``fs.find`` / ``fs.glob(detail=True)``
/ ``fs.ls(detail=True)`` list.

s3fs's ``find(path, detail=True)`` returns one dict of every key's info dict (~1-2 KB each) and also
files each of them in its directory cache, which the cached filesystem keeps for the life of the
process: a nightly no-op over 10^5 objects held ~2 KB per object at its peak. Here the same
ListObjectsV2 requests (one per 1,000 keys, through s3fs's own page iterator and its retries) are read
``_PAGE`` entries at a time and handed on, so the caller decides how many info dicts live at once.

The entries are those ``find`` gives: every key under ``path/`` (a ``folder/`` placeholder key
included, as a file), in S3's key order; a path that is no prefix is its own listing when it is a
key. A glob with ``**`` is ``find`` of its root filtered by fsspec's own pattern (as ``fs.glob``
does); other globs list one folder per level (``find`` with a depth), which is left to ``fs.glob``.
One folder's level (``folder_pages``: what ``ls`` lists, ingest's image source) is read the same way.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import fsspec
from fsspec.asyn import sync
from fsspec.utils import glob_translate

from tasks.core import storage

_PAGE = 1_000  # S3's page: entries taken from the iterator per round trip to fsspec's event loop

Entry = tuple[str, dict[str, Any]]


def lists_by_page(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether ``fs`` is an S3 filesystem (the store whose flat listing this module pages)."""
    try:
        from s3fs import S3FileSystem
    except ImportError:  # no S3 support installed: nothing to page
        return False
    return isinstance(fs, S3FileSystem)


def find_entries(fs: Any, path: str) -> Iterator[Entry]:
    """``fs.find(path, detail=True).items()`` on S3, one page of info dicts at a time."""
    path = fs._strip_protocol(path)
    bucket, key, _ = fs.split_path(path)
    listed = False
    for entry in _pages(fs, bucket, f"{key}/" if key else ""):
        listed = True
        yield entry
    if not listed and key:  # as find does: a key that is no prefix is its own listing
        try:
            info = fs.info(path)
        except FileNotFoundError:
            return
        yield info["name"], info


def glob_entries(fs: Any, pattern: str) -> Iterator[Entry] | None:
    """The files of ``fs.glob(pattern, detail=True)`` on S3 a page at a time, for a pattern with
    ``**`` (one flat listing of its root, as fsspec's glob makes); None for other patterns."""
    path = fs._strip_protocol(pattern)
    first = min((i for i in (path.find(c) for c in storage.GLOB_CHARS) if i >= 0), default=len(path))
    if "**" not in path or "/" not in path[:first] or path.startswith("*"):
        return None
    cut = path[:first].rindex("/")
    bucket, key, _ = fs.split_path(path[:cut])
    matches = re.compile(glob_translate(path + ("/" if pattern.endswith("/") else ""))).match
    stem = path[cut + 1:first]  # the name's start before the first wildcard: filtered by S3 (a prefix)
    return ((name, info) for name, info in _pages(fs, bucket, f"{key}/{stem}" if key else stem) if matches(name))


def folder_pages(fs: Any, path: str) -> Iterator[list[dict[str, Any]]]:
    """``fs.ls(path, detail=True)`` of an S3 folder as pages of at most ``_PAGE`` info dicts, without
    filing them in s3fs's directory cache: its files in key order (a ``folder/`` placeholder key
    included), its subfolders (``type`` ``directory``) too, though not sorted among the files as ``ls``
    sorts them. Nothing when the folder holds nothing (``ls`` then looks for a key ``path``)."""
    bucket, key, _ = fs.split_path(fs._strip_protocol(path).rstrip("/"))
    entries = fs._iterdir(bucket, delimiter="/", prefix=f"{key}/" if key else "")
    try:
        while page := sync(fs.loop, _take, entries, _PAGE):
            yield page
    finally:
        sync(fs.loop, entries.aclose)  # a consumer that stopped early leaves no request pending


def _pages(fs: Any, bucket: str, prefix: str) -> Iterator[Entry]:
    """Every key of ``bucket`` under ``prefix`` (no delimiter: nested keys too) with its info dict."""
    entries = fs._iterdir(bucket, delimiter="", prefix=prefix)
    try:
        while page := sync(fs.loop, _take, entries, _PAGE):
            for info in page:
                yield info["name"], info
    finally:
        sync(fs.loop, entries.aclose)  # a consumer that stopped early leaves no request pending


async def _take(entries: AsyncIterator[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    page = []
    async for info in entries:
        page.append(info)
        if len(page) == n:
            break
    return page
