"""What a checkpoint file scores as (its ``model_version`` and the prediction settings a run's choices
give), remembered per version of the file, so that a rerun over an unchanged bucket plans without
importing torch or reading the weights: the nightly no-op costs its listing, not a model load.

The key is the checkpoint URL, the file's identity as its filesystem reports it (local: size and
mtime; S3: ETag) and the run's choices; an overwritten checkpoint gets a new key. Entries live under
``$MPEMD_CACHE_DIR`` (default ``~/.cache/mpemd``); a missing or unreadable entry only costs the load.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from tasks.core import storage
from tasks.scoring.predictions import ScoringSettings

logger = logging.getLogger("mpemd")


def cache_dir() -> Path:
    return Path(os.environ.get("MPEMD_CACHE_DIR") or Path.home() / ".cache" / "mpemd") / "checkpoints"


def cache_key(checkpoint_url: str, choices: dict[str, Any]) -> str | None:
    """A key for this version of the file and these choices; None when the file's version is unknown."""
    try:
        version = storage.stat(checkpoint_url)
    except (OSError, ValueError):
        return None  # the load that follows reports it properly
    if version.etag is None and version.mtime is None:  # nothing changes when the file is rewritten
        return None
    blob = json.dumps([checkpoint_url, version.fingerprint, version.inode, choices], sort_keys=True, default=str)
    return hashlib.blake2b(blob.encode(), digest_size=16).hexdigest()


def lookup(key: str | None) -> tuple[str, ScoringSettings] | None:
    if key is None:
        return None
    try:
        entry = json.loads((cache_dir() / f"{key}.json").read_text())
        return entry["model_version"], ScoringSettings(*entry["settings"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def store(key: str | None, model_version: str, settings: ScoringSettings) -> None:
    if key is None:
        return
    entry = {"model_version": model_version,
             "settings": [settings.method, settings.patch_mode, settings.n_patches]}
    try:
        folder = cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=folder, suffix=".tmp", delete=False) as tmp:
            json.dump(entry, tmp)
        os.replace(tmp.name, folder / f"{key}.json")
    except OSError as e:  # a read-only home only loses the shortcut
        logger.debug("checkpoint cache not written: %s", e)
