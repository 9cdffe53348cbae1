"""Intervals for seed tables (science.md, "Statistics"), against textbook values."""

from __future__ import annotations

import math

import pytest

from circuits.stats import interval, mean_ci, t_quantile, wilson


def test_t_quantiles_match_the_tables() -> None:
    assert t_quantile(1) == 12.706 and t_quantile(4) == 2.776 and t_quantile(30) == 2.042
    # Beyond the table the expansion meets the published values to 3 decimals.
    assert t_quantile(40) == pytest.approx(2.021, abs=1e-3)
    assert t_quantile(60) == pytest.approx(2.000, abs=1e-3)
    assert t_quantile(120) == pytest.approx(1.980, abs=1e-3)
    with pytest.raises(ValueError, match="degree of freedom"):
        t_quantile(0)


def test_mean_interval_over_five_seeds() -> None:
    mean, half, n = mean_ci([1, 2, 3, 4, 5])
    assert (mean, n) == (3.0, 5)
    assert half == pytest.approx(2.776 * math.sqrt(2.5) / math.sqrt(5), rel=1e-12)  # 1.963
    one = mean_ci([7.0])
    assert one[0] == 7.0 and math.isnan(one[1]) and one[2] == 1
    assert math.isnan(mean_ci([])[0])


def test_interval_is_mean_ci_ready_for_json() -> None:
    five = interval([1, 2, 3, 4, 5])
    assert five["mean"] == 3.0 and five["n"] == 5 and five["ci95"] == pytest.approx(mean_ci([1, 2, 3, 4, 5])[1])
    assert interval([7.0]) == {"mean": 7.0, "ci95": None, "n": 1}  # one seed: no spread, not NaN
    assert interval([]) == {"mean": None, "ci95": None, "n": 0}


def test_wilson_interval_of_a_proportion() -> None:
    low, high = wilson(5, 10)
    assert low == pytest.approx(0.2366, abs=1e-4) and high == pytest.approx(0.7634, abs=1e-4)
    low, high = wilson(0, 10)  # never 0 wide, never below 0
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    assert wilson(10, 10)[1] == 1.0 and wilson(10, 10)[0] == pytest.approx(0.7225, abs=1e-4)
