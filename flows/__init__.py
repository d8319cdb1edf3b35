"""Prefect flows and the ``mpemd`` CLI. The only package that imports Prefect."""

import os

# Route the project's own logger (progress lines, warnings from tasks/) into Prefect's run logs.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "mpemd")
