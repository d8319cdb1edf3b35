"""The suite runs the same on any host: it pins the CPU (tests/conftest.py) unless a GPU session asks
for the GPUs (``MPEMD_TEST_GPU=1``)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tasks.core.devices import autocast_dtype, resolve_device

PROBE = """
import torch
from tasks.core.devices import autocast_dtype, resolve_device
device = resolve_device("auto")
print(torch.cuda.is_available(), device, autocast_dtype("auto", device))
"""


@pytest.mark.skipif(os.environ.get("MPEMD_TEST_GPU") == "1", reason="a GPU session keeps the GPUs")
def test_tests_and_their_subprocesses_run_on_the_cpu():
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == ""  # the pin, set before any test touches CUDA
    assert not torch.cuda.is_available()
    device = resolve_device("auto")
    assert device == torch.device("cpu") and autocast_dtype("auto", device) is None
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}).stdout.split()
    assert out == ["False", "cpu", "None"], out  # training children, mpemd processes: the same
