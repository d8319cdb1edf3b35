"""Hand memory a finished stage freed back to the operating system.

glibc keeps freed heap memory for reuse by later ``malloc`` calls, but Python's small objects
(pymalloc arenas) and Arrow's buffers (mimalloc) never ask glibc for it, so a stage that parsed
10^6 label lines with pandas leaves ~0.4 KB per line of dead heap under the next stage's peak
(docs/performance.md, "ingest memory bounded"). ``malloc_trim`` returns it; elsewhere this is a no-op.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys


@functools.cache
def _malloc_trim() -> ctypes._CFuncPtr | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # musl and other libcs have no malloc_trim
        return None


def release_freed_memory() -> bool:
    """Return freed heap pages (glibc) and Arrow's unused pool memory to the OS; True if trimmed."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
