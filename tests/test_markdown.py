"""The one Markdown table renderer (tasks.core.markdown)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from tasks.core.markdown import cell, table


def test_cells_show_undefined_as_a_dash_and_round_floats() -> None:
    assert [cell(v) for v in (None, math.nan, np.float32("nan"), pd.NA)] == ["-"] * 4
    assert cell(np.float32(0.5), 2) == "0.50" and cell(1 / 3) == "0.3333"
    assert (cell(math.inf), cell(-math.inf)) == ("inf", "-inf")
    assert (cell(7), cell(np.int64(7)), cell("a|b")) == ("7", "7", "a\\|b")


def test_table_has_a_header_a_rule_and_one_line_per_row() -> None:
    text = table(["bin", "images"], [("0.6-0.8", 12), ("all", None)], align="lr")
    assert text.splitlines() == ["| bin | images |", "| --- | ---: |", "| 0.6-0.8 | 12 |", "| all | - |"]
    with pytest.raises(ValueError, match="align"):
        table(["a", "b"], [], align="l")
