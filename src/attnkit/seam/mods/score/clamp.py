"""Hard clamp of the logits to [-limit, limit].

    with attach(model, score_mods=[clamp(30.0)]):
        model(ids)
"""

from __future__ import annotations

from torch import Tensor


def clamp(limit: float):
    if not limit > 0:
        raise ValueError("the clamp limit must be positive")

    def clamped(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return score.clamp(-limit, limit)

    return clamped
