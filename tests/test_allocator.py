"""The allocator setting of model/allocator.py: freed tensor buffers are reused, not re-faulted."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Allocate and free a 64 MiB tensor 10 times (the heap settles), then 10 more; print the minor
# page faults of the last 10.
PROBE = """
import resource, sys
import {package}
import torch
from model.allocator import keep_freed_memory
for _ in range(10):
    x = torch.ones(16 * 1024 * 1024)  # 64 MiB, written
    del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    x = torch.ones(16 * 1024 * 1024)
    del x
after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(keep_freed_memory(), after - before)
"""
PAGES_PER_BUFFER = 64 * 1024 * 1024 // 4096


def _probe(package: str, **env: str) -> tuple[str, int]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", PROBE.format(package=package)], env={**environ, **env},
                         capture_output=True, text=True, check=True, timeout=120).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.parametrize("package", ["model", "tasks"])
def test_importing_the_package_keeps_freed_buffers(package: str) -> None:
    mode, faults = _probe(package)
    assert mode in ("mmap-threshold", "no-mmap")
    # Once the heap has settled, reusing a buffer faults in (almost) no page.
    assert faults < PAGES_PER_BUFFER, faults


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_opting_out_restores_the_fault_per_buffer_cost() -> None:
    # Proves the probe can fail: with glibc's defaults every buffer is faulted in again.
    mode, faults = _probe("model", MPEMD_MALLOC="system")
    assert mode == "skipped"
    assert faults > 8 * PAGES_PER_BUFFER, faults


# A peak above 1 GiB (20 buffers of 64 MiB alive at once, as an MPEMD step's activations are), freed,
# twice (the heap settles), then once more: the third peak reuses the heap instead of faulting it in.
PEAK_PROBE = """
import resource
import model
import torch
def peak():
    held = [torch.ones(16 * 1024 * 1024) for _ in range(20)]
    del held
peak()
peak()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
peak()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_peak_above_a_gigabyte_is_kept_for_the_next_step() -> None:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", PEAK_PROBE], env=environ, capture_output=True, text=True,
                         check=True, timeout=120).stdout
    assert int(out) < 2 * PAGES_PER_BUFFER, out  # trimmed after the first peak: 20 buffers' pages again


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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_release_gives_a_finished_runs_heap_back() -> None:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    released, freed = subprocess.run([sys.executable, "-c", RELEASE_PROBE], env=environ, capture_output=True,
                                     text=True, check=True, timeout=120).stdout.split()
    assert released == "True" and int(freed) > 15 * 64 * 1024 * 1024, freed  # most of the 1.25 GiB peak
