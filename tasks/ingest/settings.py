"""Inputs shared by tasks and the flows' parameter models, in a module that imports nothing heavy.

The ``mpemd`` CLI builds its parser from the flows' pydantic models; their defaults come from here
so that ``mpemd --help`` needs neither pandas nor torch. ``IngestParams`` is the one definition of
an ingest's settings: the ``ingest-ava`` flow's parameters and ``tasks.ingest.pipeline.ingest_ava``'s input.
Its fetch settings are ``FetchConfig``'s, inherited (``tasks.ingest.fetch`` takes a ``FetchConfig``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

DEFAULT_FRACTIONS: tuple[float, float, float] = (0.92, 0.04, 0.04)  # the paper's AVA train/val/test
DEFAULT_MAX_BYTES = 256 * 1024 * 1024  # bigger files are errors before any byte is fetched


class FetchConfig(BaseModel):
    """How images are fetched and verified (``tasks.ingest.fetch``)."""

    model_config = ConfigDict(extra="forbid")  # a misspelt setting is an error, not ignored

    mode: Literal["copy", "reference"] = Field("copy", description="copy into {root}/ava/images, or "
                                               "reference the images in place")
    full_decode: bool = Field(False, description="decode every image fully (slower) instead of the header check")
    max_concurrency: int = Field(16, ge=1, le=256, description="images fetched at once")
    retries: int = Field(3, ge=0, le=20, description="retries per image on transient errors")
    backoff_s: float = Field(0.5, ge=0, description="first retry delay in seconds (doubles each attempt, "
                             "with jitter, capped at 30 s)")
    batch_size: int = Field(256, ge=1, description="images per resume record (the most a crash can lose)")


class IngestParams(FetchConfig):
    """Parse AVA labels, fetch and verify the images, write manifests and the aspect-ratio histogram."""

    labels: str = Field(description="AVA.txt-format labels file (any fsspec URL)")
    images: str = Field(description="image folder URL, or a template with {image_id} "
                        "(e.g. https://host/{image_id}.jpg)")
    root: str = Field("./data", description="output root: {root}/ava, {root}/manifests, {root}/stats")
    split_seed: int = Field(0, description="seed of the id hash that assigns train/val/test")
    split_fractions: tuple[float, float, float] = Field(DEFAULT_FRACTIONS,
                                                        description="train, val, test fractions")
    split_files: dict[str, str] = Field(default_factory=dict,
                                        description="{split: URL of an id list}; unlisted ids go to train "
                                        "unless a train list is given")
    tags: str | None = Field(None, description="optional AVA tags.txt")
    challenges: str | None = Field(None, description="optional AVA challenges.txt")

    def fetch_settings(self) -> FetchConfig:
        """The fetch settings alone (what the fetch task is handed)."""
        return FetchConfig(**self.model_dump(include=set(FetchConfig.model_fields)))

    @field_validator("split_fractions")
    @classmethod
    def _sum_to_one(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(f < 0 for f in v) or abs(sum(v) - 1.0) > 1e-6:
            raise ValueError("split fractions must be non-negative and sum to 1")
        return v
