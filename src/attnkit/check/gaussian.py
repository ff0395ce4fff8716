"""Extremes of Gaussian samples: how large the largest of n roughly Gaussian logits gets.

The largest of n independent N(0, 1) values concentrates near sqrt(2 ln n) (slowly: the
expected value is below that bound for every practical n); here it is computed exactly enough
with Blom's plotting position for the expected maximum and the exact quantile of the maximum,
P(max <= m) = Phi(m)^n. Both work for n up to 1e300 (tail probabilities via erfc, never 1 - p).
"""

from __future__ import annotations

import math
from statistics import NormalDist

_STANDARD = NormalDist()


def normal_isf(p: float) -> float:
    """x with P(Z > x) = p for standard normal Z, accurate for p down to 1e-300."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"tail probability must be in (0, 1), got {p}")
    if p > 1e-10:
        return _STANDARD.inv_cdf(1.0 - p)
    # Asymptotic start, then Newton on log P(Z > x) (erfc keeps the tail exact where 1 - p would round to 1).
    log_p = math.log(p)
    t = -2.0 * log_p
    x = math.sqrt(t - math.log(t) - math.log(2.0 * math.pi))
    for _ in range(4):
        sf = 0.5 * math.erfc(x / math.sqrt(2.0))
        pdf = math.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
        x -= (math.log(sf) - log_p) / (-pdf / sf)
    return x


def expected_max(n: float) -> float:
    """E[max of n standard normals], Blom's approximation Phi^-1((n - 0.375) / (n + 0.25)); 0 for n <= 1."""
    if n <= 1:
        return 0.0
    return normal_isf(0.625 / (n + 0.25))


def quantile_max(n: float, q: float) -> float:
    """The q-quantile of the max of n standard normals: Phi^-1(q^(1/n))."""
    if n <= 1:
        return _STANDARD.inv_cdf(q)
    return normal_isf(-math.expm1(math.log(q) / n))


def expected_range(n: float) -> float:
    """E[max - min] of n standard normals (twice the expected maximum, by symmetry)."""
    return 2.0 * expected_max(n)
