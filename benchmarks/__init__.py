"""Benchmarks (``python -m benchmarks.<name>``). Importing ``model`` here, before any benchmark imports
torch, applies model/allocator.py's process settings (malloc thresholds, sleeping idle OpenMP
threads) to the measured process as they apply to the CLI and the flows."""

import model  # noqa: F401
