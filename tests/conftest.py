"""Shared fixtures. Prefect runs against one ephemeral, session-scoped test API."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

DATA_DIR = Path(__file__).parent / "data"

# Never reach for the network in tests; pretrained loaders must fail fast instead.
os.environ.setdefault("MPEMD_OFFLINE", "1")


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect API for the whole session (use in tests that run flows)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA_DIR
