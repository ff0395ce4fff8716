"""Constant scores: with every logit equal, softmax gives each visible key 1/n (uniform attention).

    with attach(model, score_mods=[constant_scores]):             # uniform everywhere
        model(ids)
    with attach(model, score_mods=[constant_scores], mask_mods=[local_window(5)]):
        model(ids)                                              # uniform over a 5-token window
"""

from __future__ import annotations

import torch
from torch import Tensor


def constant_scores(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    return torch.zeros_like(score)
