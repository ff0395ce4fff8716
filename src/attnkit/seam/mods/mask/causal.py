"""Causal: a query sees itself and the keys before it.

    dense = causal(b, h, torch.arange(4)[:, None], torch.arange(4)[None, :])   # lower triangle
"""

from __future__ import annotations

from torch import Tensor


def causal(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    return q_idx >= kv_idx
