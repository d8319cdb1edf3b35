"""Keep freed tensor memory in the process instead of handing it back to the kernel.

glibc serves large requests (every activation and gradient buffer) with ``mmap`` and returns them
with ``munmap`` when freed, so each training or scoring step faults in and zeroes the same pages
again (docs/performance.md: sys time near user time, millions of minor faults per epoch). Raising
the mmap and trim thresholds makes those buffers come from, and go back to, the heap, which the
next step reuses. Called at import of ``model`` (and so of ``tasks``, which every flow module
imports; ``mpemd --help`` loads neither): every entry point that does work (a CLI command, a Prefect
worker's flow run, ``python -m tasks.training`` under torchrun) gets it, and
forked DataLoader/decoder workers inherit it. The environment variables carry it to processes that
start before importing us. ``MPEMD_MALLOC=system`` leaves glibc's defaults alone.

DuckDB brings its own allocator (jemalloc, inside its wheel), which reads ``DUCKDB_JE_MALLOC_CONF``
when DuckDB is imported: set here too, so it must come before ``import duckdb`` (every flow and
``mpemd sql`` import ``model`` or ``tasks`` first). ``MPEMD_MALLOC=system`` leaves it alone as well.
"""

from __future__ import annotations

import ctypes
import os

# mallopt(3) parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_MMAP_MAX = -4
KEEP_BYTES = 1 << 30  # requests up to 1 GiB come from the heap (mmap threshold)
# The heap is never trimmed: a trim threshold below a training step's peak gives the heap back after
# every step, and the next step faults it in again (docs/performance.md). The process keeps its peak
# heap until it exits (``release_free_memory`` gives it back on request).
NEVER_TRIM = -1  # mallopt(3): "-1 disables trimming completely"
NEVER_TRIM_ENV = str(1 << 62)  # the same for child processes (the tunable is unsigned)
# DuckDB's jemalloc hands pages a query freed back to the kernel at once (DuckDB sets muzzy_decay_ms:0),
# and the query's next operator faults them in again. Kept 10 s as lazily freed (MADV_FREE: the kernel
# still takes them under memory pressure), they are reused without a fault. bench_sql's 5 M rows,
# 8 alternations: minor faults 315k -> 200k, sys 0.81 -> 0.48 s, CPU -9% (docs/performance.md).
DUCKDB_ALLOCATOR_ENV = "DUCKDB_JE_MALLOC_CONF"
DUCKDB_ALLOCATOR_CONF = "muzzy_decay_ms:10000"

_applied: str | None = None


def keep_freed_memory() -> str:
    """Tell glibc's malloc (and DuckDB's jemalloc) to keep freed buffers; returns what was done (``mmap-threshold``,
    ``no-mmap``, ``skipped`` or ``unavailable``). Idempotent and cheap."""
    global _applied
    if _applied is not None:
        return _applied
    if os.environ.get("MPEMD_MALLOC", "").lower() == "system":
        _applied = "skipped"
        return _applied
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(KEEP_BYTES))
    os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", NEVER_TRIM_ENV)
    # Idle OpenMP threads sleep instead of spinning (read when torch loads libgomp, so it applies when
    # model/ or tasks/ is imported before torch, and in every child process). Spinning burns the
    # cores that decoding workers and neighbours need (docs/performance.md).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault(DUCKDB_ALLOCATOR_ENV, DUCKDB_ALLOCATOR_CONF)
    _applied = _mallopt()
    return _applied


def _libc() -> ctypes.CDLL:
    """The C library this process runs on: its own symbols (dlopen(NULL)), not a search for libc by
    ``ctypes.util.find_library``, which runs ``ldconfig -p`` in a child process at every command's start."""
    return ctypes.CDLL(None)


def _mallopt() -> str:
    try:
        mallopt = _libc().mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        return "unavailable"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    mallopt(M_TRIM_THRESHOLD, NEVER_TRIM)
    if mallopt(M_MMAP_THRESHOLD, KEEP_BYTES):
        return "mmap-threshold"
    # Older glibc caps the threshold at 32 MiB; then serve everything from the heap.
    return "no-mmap" if mallopt(M_MMAP_MAX, 0) else "unavailable"


def release_free_memory() -> bool:
    """Give the heap's free pages back to the kernel now (glibc ``malloc_trim(0)``): the heap is never
    trimmed by itself, so a process that goes on after a training run (``mpemd reproduce`` scores
    next, a Prefect worker waits for the next flow) calls this rather than keep the run's peak
    (docs/performance.md). False where unavailable."""
    try:
        return bool(_libc().malloc_trim(0))
    except (OSError, AttributeError):
        return False
