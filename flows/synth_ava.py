"""Flow ``synth-ava``: a synthetic AVA-format dataset (``tasks/ingest/synth.py`` documents the rule).

    mpemd synth-ava --out ./data/synth --n 2000 --seed 0
"""

from __future__ import annotations

import json
from typing import Any

from prefect import flow

from flows.params import SynthAvaParams, one_parameter_per_field
from flows.runtime import run_flow
from tasks.ingest.synth import synthesize_ava


@flow(name="synth-ava", log_prints=True)
@one_parameter_per_field(SynthAvaParams)
def synth_ava_flow(params: SynthAvaParams) -> dict[str, Any]:
    """Write a synthetic AVA (labels, JPEGs, generative parameters)."""
    result = synthesize_ava(params.out, params.n, params.seed, workers=params.workers)
    print(f"synth-ava: {result['n']} images in {result['seconds']:.1f}s -> {params.out}")
    return result


def cli_run(params: SynthAvaParams) -> int:
    """``mpemd synth-ava``."""
    print(json.dumps(run_flow(synth_ava_flow, params), indent=2))
    return 0
