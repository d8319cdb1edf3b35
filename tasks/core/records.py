"""Rows that JSON, Prefect artifacts and flow results accept: NaN and missing values as None, numpy
scalars as Python numbers. One rule for every table a flow returns or publishes."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pandas only where a caller already has a frame
    import pandas as pd


def json_value(value: Any) -> Any:
    """One cell: a numpy scalar as its Python value, NaN as None, anything else unchanged."""
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def json_rows(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [{k: json_value(v) for k, v in row.items()} for row in rows]


def frame_rows(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """A DataFrame's records, JSON-safe (pandas' own missing values, NA and NaT, as None too)."""
    return json_rows(frame.astype(object).where(frame.notna(), None).to_dict("records"))
