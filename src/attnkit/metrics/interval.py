"""A 95% confidence interval for a row-weighted mean over sequences, with sequences as the units.

Rows of one sequence are strongly correlated (neighbouring queries attend alike), so the
independent units are sequences, not rows. The statistic reported is the row-weighted mean
``sum_i s_i / sum_i m_i`` (``s_i``: the sequence's sum over its rows, ``m_i``: its row count);
its interval is the ratio estimator's: the linearised (cluster-robust) standard error

    SE = sqrt( sum_i (s_i - mean * m_i)^2 / (n (n - 1)) ) / mean_i(m_i)

with Student's t quantile on n - 1 degrees of freedom. When every sequence has the same number
of rows this is exactly the ordinary t-interval of the per-sequence means. A t-interval, not a
percentile bootstrap: with a handful of sequences the bootstrap's interval is too narrow
(it cannot see tails it has not sampled), while the t quantile widens it as n falls.
Pure Python floats and tensors: no scipy.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor


def t_cdf(x: float, df: int) -> float:
    """P(T <= x) for Student's t with an integer ``df`` >= 1 (Abramowitz & Stegun 26.7.3-4, exact)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    theta = math.atan(x / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 1:  # 1/2 + (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...)) / pi
        total, term = 0.0, 1.0
        for k in range(1, (df - 1) // 2 + 1):
            total += term
            term *= c2 * (2 * k) / (2 * k + 1)
        return 0.5 + (theta + s * math.cos(theta) * total) / math.pi if df > 1 else 0.5 + theta / math.pi
    total, term = 0.0, 1.0  # 1/2 + sin/2 (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...)
    for k in range(1, df // 2 + 1):
        total += term
        term *= c2 * (2 * k - 1) / (2 * k)
    return 0.5 + 0.5 * s * total


@lru_cache(maxsize=256)
def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (0.5 < p < 1) of Student's t with integer ``df``, by bisection on ``t_cdf``."""
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def ratio_mean_ci95(sums: Tensor, counts: Tensor) -> tuple[float, float] | None:
    """95% interval of ``sums.sum() / counts.sum()`` over units (sequences): see the module doc.

    sums, counts: (N,) per unit; units with no rows are left out. None with fewer than two units.
    """
    keep = counts > 0
    s, m = sums[keep].double(), counts[keep].double()
    n = int(s.numel())
    if n < 2:
        return None
    mean = float(s.sum() / m.sum())
    residual = s - mean * m
    se = math.sqrt(float((residual * residual).sum()) / (n * (n - 1))) / float(m.mean())
    half = t_quantile(0.975, n - 1) * se
    return mean - half, mean + half

