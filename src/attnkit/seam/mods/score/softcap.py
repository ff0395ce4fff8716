"""Soft-capping (Gemma 2's ``attn_logit_softcapping``): cap * tanh(score / cap).

Logits stay within (-cap, cap) and small ones barely move.

    with attach(model, score_mods=[soft_cap(50.0)]):
        model(ids)
"""

from __future__ import annotations

import torch
from torch import Tensor


def soft_cap(cap: float):
    if not cap > 0:
        raise ValueError("the cap must be positive")

    def capped(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return cap * torch.tanh(score / cap)

    return capped
