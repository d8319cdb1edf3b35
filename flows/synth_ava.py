"""Flow ``synth-ava``: a synthetic AVA-format dataset (``tasks/synth.py`` documents the rule).

    mpemd synth-ava --out ./data/synth --n 2000 --seed 0
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from prefect import flow
from pydantic import BaseModel, Field

from tasks.synth import synthesize_ava


class SynthAvaParams(BaseModel):
    out: str = Field(description="output URL: {out}/AVA.txt, {out}/images/<id>.jpg, {out}/synth_params.parquet")
    n: int = Field(2000, ge=1, description="number of images")
    seed: int = Field(0, description="seed: the same seed gives the same dataset")
    workers: int | None = Field(None, ge=1, description="render processes (default: CPU count, at most 8)")


@flow(name="synth-ava", log_prints=True)
def synth_ava_flow(params: SynthAvaParams) -> dict[str, Any]:
    """Write a synthetic AVA (labels, JPEGs, generative parameters)."""
    result = synthesize_ava(params.out, params.n, params.seed, workers=params.workers)
    print(f"synth-ava: {result['n']} images in {result['seconds']:.1f}s -> {params.out}")
    return result


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("synth-ava", help="write a synthetic AVA-format dataset (labels + JPEGs)")
    p.add_argument("--out", required=True, help="output folder URL")
    p.add_argument("--n", type=int, default=2000, help="number of images (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="render processes")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    result = synth_ava_flow(SynthAvaParams(out=args.out, n=args.n, seed=args.seed, workers=args.workers))
    print(json.dumps(result, indent=2))
    return 0
