"""Intervals for reproductions over seeds (science.md, "Statistics").

Means get Student-t 95% intervals; proportions (how many seeds grokked) get Wilson intervals.
Kept here, without scipy, because every protocol table and the seed summaries need them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

__all__ = ["t_quantile", "mean_ci", "interval", "wilson"]

# Two-sided 95% quantiles t_{0.975, df} for df = 1..30 (standard tables, 3 decimals).
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)


def t_quantile(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` degrees of freedom (two-sided 95%).

    Exact to three decimals up to df = 30; beyond, the Cornish-Fisher expansion around the
    normal quantile 1.95996 (error below 1e-4 there)."""
    if df < 1:
        raise ValueError(f"a t interval needs at least 1 degree of freedom, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_ci(values: Iterable[float | int]) -> tuple[float, float, int]:
    """``(mean, half-width of its Student-t 95% interval, n)``; the half-width is nan below
    two values (one seed carries no spread)."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        return math.nan, math.nan, 0
    mean = sum(xs) / n
    if n < 2:
        return mean, math.nan, n
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    return mean, t_quantile(n - 1) * sd / math.sqrt(n), n


def interval(values: Iterable[float | int]) -> dict[str, float | int | None]:
    """:func:`mean_ci` as a JSON-ready dict ``{"mean", "ci95", "n"}``: the mean None without
    values, the half-width None below two (one seed carries no spread)."""
    mean, half, n = mean_ci(values)
    return {"mean": mean if n else None, "ci95": half if n > 1 else None, "n": n}


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score 95% interval ``(low, high)`` of a proportion k / n (Wilson 1927)."""
    if n <= 0:
        return math.nan, math.nan
    phat = k / n
    denom = 1 + z * z / n
    centre = (phat + z * z / (2 * n)) / denom
    half = z * math.sqrt(phat * (1 - phat) / n + z * z / (4 * n * n)) / denom
    if k == 0:
        return 0.0, min(1.0, centre + half)
    if k == n:
        return max(0.0, centre - half), 1.0
    return max(0.0, centre - half), min(1.0, centre + half)
