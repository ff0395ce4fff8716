"""Small statistics the sections need, in plain Python (no scipy dependency).

``t_sf`` is Student's t upper tail through the regularised incomplete beta function (a
continued fraction, Numerical Recipes' ``betacf``); the tests compare it with scipy when scipy
is installed.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _betacf(a: float, b: float, x: float, iterations: int = 300, eps: float = 3e-16) -> float:
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, iterations + 1):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(log_front)
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_sf(t: float, df: float) -> float:
    """P(T > t) for Student's t with ``df`` degrees of freedom."""
    if math.isnan(t):
        return math.nan
    if math.isinf(t):
        return 0.0 if t > 0 else 1.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return tail if t > 0 else 1.0 - tail


def lag1_autocorrelation(x: Tensor) -> float:
    """Pooled lag-1 autocorrelation of the rows of ``x`` (S, N) along N, NaNs skipped."""
    x = x.double()
    valid = ~torch.isnan(x)
    if valid.sum() < 3:
        return 0.0
    mean = x[valid].mean()
    c = torch.where(valid, x - mean, torch.zeros_like(x))
    pair = valid[:, 1:] & valid[:, :-1]
    num = (c[:, 1:] * c[:, :-1])[pair].sum()
    den = (c * c)[valid].sum()
    return float(num / den) if den > 0 else 0.0


def one_sided_t_test(x: Tensor, margin: float) -> dict:
    """H0: mean(x) <= margin against H1: mean(x) > margin, for x (S, N): S sequences of N ordered rows.

    Neighbouring rows of a sequence are correlated, so the sample size is the AR(1) effective
    one, n (1 - rho) / (1 + rho) with rho the pooled lag-1 autocorrelation (clamped to [0, 0.95]).
    """
    flat = x.double()[~torch.isnan(x)]
    n = flat.numel()
    if n < 2:
        return {"mean": math.nan, "t": math.nan, "p_value": math.nan, "n": n, "n_eff": 0.0, "rho": math.nan}
    mean = float(flat.mean())
    sd = float(flat.std())
    rho = min(max(lag1_autocorrelation(x), 0.0), 0.95)
    n_eff = max(2.0, n * (1 - rho) / (1 + rho))
    if sd == 0.0 or not math.isfinite(sd):
        t = math.inf if mean > margin else -math.inf
    else:
        t = (mean - margin) / (sd / math.sqrt(n_eff))
    return {"mean": mean, "t": t, "p_value": t_sf(t, n_eff - 1.0), "n": n, "n_eff": n_eff, "rho": rho}


def pearson(x: Tensor, y: Tensor) -> float:
    """Pearson correlation of two 1-D tensors (NaN pairs dropped); NaN when either is constant."""
    x, y = x.double().flatten(), y.double().flatten()
    keep = ~(torch.isnan(x) | torch.isnan(y))
    x, y = x[keep], y[keep]
    if x.numel() < 3:
        return math.nan
    x, y = x - x.mean(), y - y.mean()
    den = float((x.square().sum() * y.square().sum()).sqrt())
    return float((x * y).sum()) / den if den > 0 else math.nan


def nanmean(x: Tensor) -> float:
    x = x.double()
    keep = ~torch.isnan(x)
    return float(x[keep].mean()) if keep.any() else math.nan
