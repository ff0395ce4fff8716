"""Attention patterns that replace the learned probabilities (ablations), attention-gym style.

A pattern is a plain function ``(allowed, query_positions, probs) -> probs``:
allowed (B|1, H|1, R, K) bool, query_positions (R,) key index of each row, probs (B, H, R, K)
the learned probabilities (some patterns ignore them). The result sums to one over the keys
each row may see, so masks (causal, padding, sliding window) are always respected. Rows that
can see nothing stay all-zero. Example::

    with attach(model, pattern=PATTERNS["uniform"]):
        loss_uniform = model(ids, labels=ids).loss
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def _normalise(weights: Tensor) -> Tensor:
    total = weights.sum(-1, keepdim=True)
    return torch.where(total > 0, weights / total.clamp_min(1e-30), 0.0)


def uniform(allowed: Tensor, query_positions: Tensor, probs: Tensor) -> Tensor:
    """Every visible key gets 1/n: attention as plain averaging (seed 002's "beta = 1/N")."""
    return _normalise(allowed.expand(probs.shape).to(probs.dtype))


def local_window(window: int) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """Uniform over the visible keys within ``window`` positions of the query (seed 002: |i-j| <= 5)."""

    def local(allowed: Tensor, query_positions: Tensor, probs: Tensor) -> Tensor:
        keys = torch.arange(probs.shape[-1], device=probs.device)
        near = (query_positions[:, None] - keys[None, :]).abs() <= window  # (R, K)
        return _normalise((allowed & near).expand(probs.shape).to(probs.dtype))

    local.__name__ = f"local_window_{window}"
    return local


def first_token(allowed: Tensor, query_positions: Tensor, probs: Tensor) -> Tensor:
    """All mass on the first visible key: the pure attention-sink pattern."""
    visible = allowed.expand(probs.shape)
    first = visible.to(torch.uint8).argmax(-1, keepdim=True)
    out = torch.zeros_like(probs).scatter_(-1, first, 1.0)
    return torch.where(visible.any(-1, keepdim=True), out, 0.0)


def previous_token(allowed: Tensor, query_positions: Tensor, probs: Tensor) -> Tensor:
    """All mass on the key just before the query (itself for the first row)."""
    K = probs.shape[-1]
    target = (query_positions - 1).clamp(0, K - 1).view(1, 1, -1, 1).expand(*probs.shape[:-1], 1)
    out = torch.zeros_like(probs).scatter_(-1, target, 1.0)
    return torch.where(allowed.expand(probs.shape).gather(-1, target), out, uniform(allowed, query_positions, probs))


PATTERNS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "uniform": uniform,
    "local": local_window(5),
    "first_token": first_token,
    "previous_token": previous_token,
}
