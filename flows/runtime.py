"""How the ``mpemd`` CLI runs a flow: as a Prefect flow run when a Prefect API is configured, else as
the same flow function called in this process ("direct"), without starting a temporary server.

The flow bodies are one code path for both: they call their tasks and subflows through ``call``,
which inside a Prefect run is the plain Prefect call, and in a direct run calls the task's function
with the task's own retries (``retries``, ``retry_delay_seconds``, ``retry_condition_fn``). A
deployment run, ``prefect deployment run`` and any run with ``PREFECT_API_URL`` set (environment or
profile) are full Prefect runs, unchanged. A direct run has no flow-run record, artifacts or flow
timeout: nothing would keep them once the temporary server stopped.
"""

from __future__ import annotations

import logging
import time
from contextvars import ContextVar
from typing import Any

from pydantic import BaseModel

from tasks.core.errors import is_retryable

logger = logging.getLogger("mpemd")

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


def call(work: Any, *args: Any, **kwargs: Any) -> Any:
    """Call a Prefect task or subflow: itself in a Prefect run, its function in a direct run.

    Wrap a large argument in ``prefect.utilities.annotations.quote`` (a listing of 10^4-10^5 objects):
    Prefect then passes it through without visiting every element for upstream futures (0.3 s per
    10,000 listing rows and task); a direct run unwraps it the same way."""
    if not _DIRECT.get():
        return work(*args, **kwargs)
    from prefect import Flow
    from prefect.utilities.annotations import quote

    args = tuple(a.unquote() if isinstance(a, quote) else a for a in args)
    kwargs = {k: v.unquote() if isinstance(v, quote) else v for k, v in kwargs.items()}
    if isinstance(work, Flow):
        return work.fn(*args, **kwargs)
    return _with_retries(work, args, kwargs)


def _delays(task: Any) -> list[float]:
    delay = task.retry_delay_seconds
    if isinstance(delay, list | tuple):
        return [float(d) for d in delay] or [0.0]
    return [float(delay or 0)]


def _should_retry(task: Any, error: BaseException) -> bool:
    if not is_retryable(error):  # a missing file or a user error: a retry cannot succeed
        return False
    if task.retry_condition_fn is None:
        return True
    from prefect.states import Failed

    return bool(task.retry_condition_fn(task, None, Failed(data=error)))


def _with_retries(task: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
    delays = _delays(task)
    for attempt in range(task.retries + 1):
        try:
            return task.fn(*args, **kwargs)
        except Exception as error:
            if attempt == task.retries or not _should_retry(task, error):
                raise
            wait = delays[min(attempt, len(delays) - 1)]
            logger.warning("%s failed (%s: %s); retry %d of %d in %.0f s", task.name, type(error).__name__,
                           error, attempt + 1, task.retries, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a Prefect run, the ``mpemd`` logger otherwise."""
    from prefect.context import FlowRunContext, TaskRunContext

    if _DIRECT.get() or (FlowRunContext.get() is None and TaskRunContext.get() is None):
        return logger
    from prefect import get_run_logger

    return get_run_logger()


# Imported by every flow module (and so by a worker's flow-run process), after Prefect itself.
route_logs_to_prefect()

__all__: list[str] = ["api_configured", "call", "in_direct_run", "route_logs_to_prefect", "run_flow", "run_logger"]
