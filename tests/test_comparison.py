"""The printed NIMA-vs-MPEMD summary: pooled decreases and ratios from hand-made comparison rows."""

import math

import pytest

from tasks.comparison import comparison_markdown, headline_stats, overall_rows, pooled_decrease

ROWS = [
    {"bin": "0.0-0.4", "n": 10, "nima_mae": 0.5, "mpemd_mae": 0.3, "mae_decrease": 0.2, "relative_decrease": 0.4,
     "decrease_vs_typical": 4.0},
    {"bin": "0.4-0.6", "n": 30, "nima_mae": 0.4, "mpemd_mae": 0.4, "mae_decrease": 0.0, "relative_decrease": 0.0,
     "decrease_vs_typical": 0.0},
    {"bin": "0.6-0.8", "n": 100, "nima_mae": 0.35, "mpemd_mae": 0.30, "mae_decrease": 0.05,
     "relative_decrease": 0.05 / 0.35, "decrease_vs_typical": 1.0},
    {"bin": "1.0-1.2", "n": 5, "nima_mae": 0.9, "mpemd_mae": 0.1, "mae_decrease": 0.8, "relative_decrease": 0.89,
     "decrease_vs_typical": 16.0},
    {"bin": "1.6-inf", "n": 0, "nima_mae": None, "mpemd_mae": None, "mae_decrease": None,
     "relative_decrease": None, "decrease_vs_typical": None},
    {"bin": "all", "n": 145, "nima_mae": 0.4, "mpemd_mae": 0.3, "mae_decrease": 0.1, "relative_decrease": 0.25,
     "decrease_vs_typical": 2.0},
]


def test_pooled_decrease_is_the_n_weighted_mean():
    assert pooled_decrease(ROWS, ["0.0-0.4", "0.4-0.6"]) == pytest.approx((10 * 0.2 + 30 * 0.0) / 40)
    assert math.isnan(pooled_decrease(ROWS, ["1.6-inf"]))  # an empty bin pools to undefined


def test_headline_stats_skip_tiny_bins_for_the_largest_ratio():
    stats = headline_stats(ROWS)
    assert stats["typical_decrease"] == pytest.approx(0.05)
    unusual = (10 * 0.2 + 30 * 0.0 + 5 * 0.8) / 45
    assert stats["unusual_decrease"] == pytest.approx(unusual)
    assert stats["unusual_ratio"] == pytest.approx(unusual / 0.05)
    assert stats["extreme_ratio"] == pytest.approx(((10 * 0.2) / 40) / 0.05)
    # 1.0-1.2 has the largest ratio (16x) but only 5 images: 0.0-0.4 (4x, 10 images) is reported
    assert (stats["max_ratio"], stats["max_ratio_bin"]) == (4.0, "0.0-0.4")


def test_markdown_lists_every_bin_and_both_models():
    errors = {"NIMA": [{"bin": "all", "n": 145, "mse": 0.2, "mae": 0.4, "lcc": 0.7, "srcc": 0.7, "accuracy": 0.8}],
              "MPEMD": [{"bin": "all", "n": 145, "mse": 0.1, "mae": 0.3, "lcc": 0.8, "srcc": 0.8, "accuracy": 0.9}]}
    text = comparison_markdown(ROWS, overall_rows(errors), report="r.md")
    for row in ROWS:
        assert f"| {row['bin']} |" in text
    assert "| NIMA | 145 | 0.200 |" in text and "| MPEMD | 145 | 0.100 |" in text
    assert "4.00× in 0.0-0.4" in text
