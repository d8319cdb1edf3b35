"""Prefect artifacts for results people would rather look at: Markdown summaries and tables.

Artifacts need a ``key`` to show on the Artifacts page (lowercase letters, digits and dashes).
Outside a flow run these calls are skipped quietly, so flows stay callable as plain functions.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import FlowRunContext, TaskRunContext

from tasks.core.records import json_rows

logger = logging.getLogger("mpemd")


def artifact_key(name: str) -> str:
    """A valid artifact key from any name: lowercase, dashes, no other characters."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9-]", "-", name.lower())).strip("-") or "mpemd"


def _in_run() -> bool:
    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def publish_markdown(name: str, markdown: str, description: str | None = None) -> None:
    if _in_run():
        create_markdown_artifact(markdown=markdown, key=artifact_key(name), description=description)


def publish_table(name: str, rows: list[dict[str, Any]], description: str | None = None) -> None:
    if _in_run():
        create_table_artifact(table=json_rows(rows), key=artifact_key(name), description=description)
