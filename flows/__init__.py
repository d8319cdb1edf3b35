"""Prefect flows and the ``mpemd`` CLI. The only package that imports Prefect."""

import os

# Route the project's own logger (progress lines, warnings from tasks/) into Prefect's run logs;
# outside a flow run (plain function calls, tests) those lines stay local instead of warning.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "mpemd")
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
# The ephemeral API's telemetry only fails (and logs an ERROR) on air-gapped machines and CI.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
