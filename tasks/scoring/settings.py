"""How images are scored, beyond which model: declared once, in a module that imports nothing heavy.

``ScoringKnobs`` is both the ``score-bucket`` flow's scoring parameters (``flows/params.py``'s
``ScoreBucketParams`` inherits it, so ``mpemd score`` and the Prefect form show them) and the base of
``tasks.scoring.scorer.ScoringConfig``, which the flow builds from the same values.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.ingest.settings import DEFAULT_MAX_BYTES


class ScoringKnobs(BaseModel):
    """Throughput knobs (which never change results beyond float tolerance, except ``amp``), where
    JPEGs are decoded, and the size cap."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(32, ge=1, description="images per forward pass")
    num_workers: int = Field(0, ge=0, description="decoding processes per shard (0: decode in-process)")
    device: str = Field("auto", description="torch device: auto, cpu, cuda, cuda:1, ...")
    amp: bool = Field(True, description="bfloat16/float16 autocast on CUDA")
    compile: bool = Field(False, description="torch.compile the model")
    decode: Literal["cpu", "gpu"] = Field(
        "cpu", description="where JPEGs are decoded: cpu (worker processes) or gpu (batched nvJPEG on the "
        "CUDA device; other files and failures on the CPU; without CUDA: a warning, then cpu)")
    max_bytes: int = Field(DEFAULT_MAX_BYTES, ge=1, description="larger files are error rows, never fetched")

    def knobs(self) -> dict[str, object]:
        """These settings alone, as keyword arguments (a subclass's other fields left out)."""
        return self.model_dump(include=set(ScoringKnobs.model_fields))
