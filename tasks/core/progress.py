"""Progress for long jobs: rate and ETA in the terminal (tqdm) and in the logs (Prefect's, when a
flow runs, since flows route the ``mpemd`` logger into Prefect).

One class, used by every long loop, so that ingest, training and scoring all report the same way.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

try:
    from tqdm.auto import tqdm
except ImportError:  # a bare GPU host without tqdm: no bar, the log lines below still report
    tqdm = None

logger = logging.getLogger("mpemd")


class Progress:
    """Counts work items; shows a bar and logs ``done/total, items/s, ETA`` every ``log_every`` s."""

    def __init__(self, total: int | None, desc: str, unit: str = "img", log_every: float = 10.0,
                 disable: bool | None = None) -> None:
        self.total = total
        self.desc = desc
        self.unit = unit
        self.log_every = log_every
        self.done = 0
        self.start = time.perf_counter()
        self._last_log = self.start
        if disable is None:
            disable = not sys.stderr.isatty()
        self._bar = (tqdm(total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True)
                     if tqdm is not None else _NoBar())
        self.postfix: dict[str, Any] = {}

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    @property
    def rate(self) -> float:
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    def eta(self) -> float | None:
        if not self.total or self.rate <= 0:
            return None
        return max(self.total - self.done, 0) / self.rate

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.done += n
        self._bar.update(n)
        if postfix:
            self.postfix.update(postfix)
            self._bar.set_postfix(
                {k: f"{v:.4g}" if isinstance(v, float) else v for k, v in postfix.items()}, refresh=False
            )
        now = time.perf_counter()
        if now - self._last_log >= self.log_every:
            self._last_log = now
            logger.info(self.summary())

    def summary(self) -> str:
        eta = self.eta()
        total = f"/{self.total}" if self.total is not None else ""
        extra = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.postfix.items())
        eta_s = f", ETA {eta:.0f}s" if eta is not None else ""
        return f"{self.desc}: {self.done}{total} {self.unit}, {self.rate:.1f} {self.unit}/s{eta_s} {extra}".rstrip()

    def close(self) -> None:
        self._bar.close()
        if self.total is not None and self.done < self.total:  # never a "done" line short of its total
            logger.info(self.summary() + f" (stopped after {self.elapsed:.1f}s with "
                        f"{self.total - self.done} {self.unit} not done)")
        else:
            logger.info(self.summary() + f" (done in {self.elapsed:.1f}s)")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _NoBar:
    """Stands in for a tqdm bar where tqdm is not installed."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass
