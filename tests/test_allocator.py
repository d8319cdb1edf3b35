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
