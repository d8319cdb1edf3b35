"""How the ``mpemd`` CLI runs a flow: as a Prefect flow run when a Prefect API is configured, else as
the same flow function called in this process ("direct"), without starting a temporary server.

The flow bodies are one code path for both: they call their tasks and subflows through ``run_step``,
which inside a Prefect run is the plain Prefect call (with Prefect's retries, ``TASK_OPTIONS``), and
in a direct run calls the task's function once. A deployment run, ``prefect deployment run`` and any
run with ``PREFECT_API_URL`` set (environment or profile) are full Prefect runs, unchanged. A direct
run has no flow-run record, artifacts, retries or flow timeout: nothing would keep them once the
temporary server stopped; a failed direct run is rerun as a whole, and resumes (shards, fetched
images and checkpoints already committed are skipped).
"""

from __future__ import annotations

import logging
from contextvars import ContextVar
from typing import Any

from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from tasks.core.errors import retry_condition

logger = logging.getLogger("mpemd")

# Every task's options. Retries are for storage hiccups: ``retry_condition`` never retries what
# cannot succeed (a missing file, permission denied, a user error). No result caching: tasks take
# listings, configs and tables, whose hashing would fail or cost more than the work.
TASK_OPTIONS: dict[str, Any] = {"retries": 2, "retry_delay_seconds": 5, "retry_condition_fn": retry_condition,
                                "cache_policy": NO_CACHE}

_DIRECT: ContextVar[bool] = ContextVar("mpemd_direct_run", default=False)


def route_logs_to_prefect() -> None:
    """Send the ``mpemd`` logger's records (epochs, progress, warnings) to the flow run's logs.

    ``PREFECT_LOGGING_EXTRA_LOGGERS`` (set in ``flows/__init__``) only works when it is set before
    Prefect configures logging; a worker's flow-run process configures it before it imports a flow,
    so there the API handler is attached here, and the level lowered to Prefect's logging level (the
    root's WARNING would drop every progress line)."""
    from prefect.logging.configuration import ensure_logging_setup
    from prefect.logging.handlers import APILogHandler

    ensure_logging_setup()
    extra = logging.getLogger("prefect.extra")  # Prefect's template for extra loggers
    if not any(isinstance(h, APILogHandler) for h in logger.handlers):
        for handler in extra.handlers:
            logger.addHandler(handler)
    wanted = extra.level or logging.INFO
    if logger.getEffectiveLevel() > wanted:
        logger.setLevel(wanted)


def api_configured() -> bool:
    """Whether Prefect has an API to talk to (``PREFECT_API_URL`` in the environment or profile)."""
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value())


def in_direct_run() -> bool:
    return _DIRECT.get()


def run_flow(flow: Any, params: BaseModel, needs_engine: bool = False) -> Any:
    """Run ``flow`` with the values of ``params``: through Prefect when an API is configured (or the
    flow needs Prefect's engine, e.g. a Dask task runner), else directly in this process."""
    from prefect.context import FlowRunContext

    values = params.model_dump()
    if needs_engine or api_configured() or FlowRunContext.get() is not None:
        return flow(**values)
    token = _DIRECT.set(True)
    try:
        logger.debug("no Prefect API configured: running %s in this process", flow.name)
        return flow.fn(**values)
    finally:
        _DIRECT.reset(token)


def run_step(work: Any, *args: Any, **kwargs: Any) -> Any:
    """Call a Prefect task or subflow: itself in a Prefect run, its function in a direct run.

    Wrap a large argument in ``prefect.utilities.annotations.quote`` (a listing of 10^4-10^5 objects):
    Prefect then passes it through without visiting every element for upstream futures, a cost that
    grows with the listing (docs/performance.md); a direct run unwraps it the same way."""
    if not _DIRECT.get():
        return work(*args, **kwargs)
    from prefect.utilities.annotations import quote

    args = tuple(a.unquote() if isinstance(a, quote) else a for a in args)
    kwargs = {k: v.unquote() if isinstance(v, quote) else v for k, v in kwargs.items()}
    return work.fn(*args, **kwargs)


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a Prefect run, the ``mpemd`` logger otherwise."""
    from prefect.context import FlowRunContext, TaskRunContext

    if _DIRECT.get() or (FlowRunContext.get() is None and TaskRunContext.get() is None):
        return logger
    from prefect import get_run_logger

    return get_run_logger()


# Imported by every flow module (and so by a worker's flow-run process), after Prefect itself.
route_logs_to_prefect()

__all__: list[str] = ["TASK_OPTIONS", "api_configured", "in_direct_run", "route_logs_to_prefect", "run_flow", "run_logger", "run_step"]
