"""The allocator setting of model/allocator.py: freed tensor buffers are reused, not re-faulted.

Fault counts are compared with the faults of one buffer touched for the first time in the same
process (``unit``), not with a number of 4 KiB pages: with transparent huge pages ("always", or
glibc's ``glibc.malloc.hugetlb`` tunable) a 64 MiB buffer faults in 2 MiB pages, hundreds of times
fewer faults. The tests need glibc's ``mallopt`` and skip where it is absent (musl, macOS)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import subprocess
import sys

import pytest


def _glibc_mallopt() -> bool:
    """glibc (not musl, whose ``mallopt`` is a no-op stub, nor macOS) with ``mallopt`` and ``malloc_trim``."""
    try:
        if not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc"):
            return False
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except (AttributeError, ValueError, OSError):
        return False
    return hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim")


pytestmark = pytest.mark.skipif(not _glibc_mallopt(), reason="needs glibc's mallopt and malloc_trim")

# The faults of one fresh 64 MiB buffer (the unit); then allocate and free one 10 times (the heap
# settles), then 10 more; print the minor page faults of the last 10.
UNIT = """
import resource
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
start = faults()
first = torch.ones(16 * 1024 * 1024)  # 64 MiB, written: faulted in for the first time
unit = faults() - start
del first
"""
PROBE = """
import resource, sys
import {package}
import torch
from model.allocator import keep_freed_memory
""" + UNIT + """
for _ in range(10):
    x = torch.ones(16 * 1024 * 1024)  # 64 MiB, written
    del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    x = torch.ones(16 * 1024 * 1024)
    del x
after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(keep_freed_memory(), unit, after - before)
"""


def _probe(package: str, **env: str) -> tuple[str, int, int]:
    """(allocator mode, faults of one fresh buffer, faults of the last 10 buffers)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", PROBE.format(package=package)], env={**environ, **env},
                         capture_output=True, text=True, check=True, timeout=120).stdout.split()
    return out[0], int(out[1]), int(out[2])


@pytest.mark.parametrize("package", ["model", "tasks"])
def test_importing_the_package_keeps_freed_buffers(package: str) -> None:
    mode, unit, faults = _probe(package)
    assert mode in ("mmap-threshold", "no-mmap")
    # Once the heap has settled, ten buffers fault in less than one fresh buffer does.
    assert unit > 0 and faults < unit, (unit, faults)


def test_opting_out_restores_the_fault_per_buffer_cost() -> None:
    # Proves the probe can fail: with glibc's defaults every buffer is faulted in again.
    mode, unit, faults = _probe("model", MPEMD_MALLOC="system")
    assert mode == "skipped"
    assert faults > 8 * unit, (unit, faults)


# A peak above 1 GiB (20 buffers of 64 MiB alive at once, as an MPEMD step's activations are), freed,
# twice (the heap settles), then once more: the third peak reuses the heap instead of faulting it in.
PEAK_PROBE = """
import resource
import model
import torch
""" + UNIT + """
def peak():
    held = [torch.ones(16 * 1024 * 1024) for _ in range(20)]
    del held
peak()
peak()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
peak()
print(unit, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_a_peak_above_a_gigabyte_is_kept_for_the_next_step() -> None:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    unit, faults = map(int, subprocess.run([sys.executable, "-c", PEAK_PROBE], env=environ, capture_output=True,
                                           text=True, check=True, timeout=120).stdout.split())
    assert faults < 2 * unit, (unit, faults)  # trimmed after the first peak: 20 buffers' faults again


RELEASE_PROBE = """
import model
import torch
from model.allocator import release_free_memory
def rss():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS")) * 1024
held = [torch.ones(16 * 1024 * 1024) for _ in range(20)]
del held
kept = rss()
released = release_free_memory()
print(released, kept - rss())
"""


def test_release_gives_a_finished_runs_heap_back() -> None:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    released, freed = subprocess.run([sys.executable, "-c", RELEASE_PROBE], env=environ, capture_output=True,
                                     text=True, check=True, timeout=120).stdout.split()
    assert released == "True" and int(freed) > 15 * 64 * 1024 * 1024, freed  # most of the 1.25 GiB peak


NO_CHILD_PROBE = """
import subprocess
started = []
popen_init = subprocess.Popen.__init__
def record(self, args, *rest, **keywords):
    started.append(args)
    popen_init(self, args, *rest, **keywords)
subprocess.Popen.__init__ = record
from model.allocator import keep_freed_memory
print(keep_freed_memory(), started)
"""


def test_the_setting_starts_no_process() -> None:
    """Every command imports ``model``: finding libc must not run ``ldconfig -p`` (ctypes.util.find_library)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", NO_CHILD_PROBE], env=environ, capture_output=True, text=True,
                         check=True, timeout=120).stdout.strip()
    assert out in ("mmap-threshold []", "no-mmap []"), out


# DuckDB's allocator (the jemalloc in its wheel) as the process sees it once DuckDB is loaded the way
# `mpemd sql` and the analysis flows load it (model or tasks first): its muzzy_decay_ms, or "absent"
# where the wheel has no jemalloc (macOS, Windows).
DUCKDB_PROBE = """
import ctypes
import flows.sql_cli
from tasks.analysis import sql
import _duckdb
try:
    mallctl = ctypes.CDLL(_duckdb.__file__).duckdb_je_mallctl
except AttributeError:
    print("absent")
else:
    value, size = ctypes.c_ssize_t(), ctypes.c_size_t(ctypes.sizeof(ctypes.c_ssize_t))
    assert mallctl(b"opt.muzzy_decay_ms", ctypes.byref(value), ctypes.byref(size), None, ctypes.c_size_t(0)) == 0
    print(value.value)
"""


def _duckdb_muzzy_decay(**env: str) -> str:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "DUCKDB_JE_MALLOC_CONF"}
    return subprocess.run([sys.executable, "-c", DUCKDB_PROBE], env={**environ, **env}, capture_output=True,
                          text=True, check=True, timeout=120).stdout.strip()


def test_duckdb_keeps_the_pages_a_query_freed() -> None:
    from model.allocator import DUCKDB_ALLOCATOR_CONF

    decay = _duckdb_muzzy_decay()
    if decay == "absent":
        pytest.skip("this DuckDB wheel brings no jemalloc")
    assert decay == DUCKDB_ALLOCATOR_CONF.removeprefix("muzzy_decay_ms:") == "10000"
    # DuckDB's own setting (0: purged at once) where the user opts out, and the user's own wherever given
    assert _duckdb_muzzy_decay(MPEMD_MALLOC="system") == "0"
    assert _duckdb_muzzy_decay(DUCKDB_JE_MALLOC_CONF="muzzy_decay_ms:2500") == "2500"
