"""All attention on the key just before the query (the first row: itself).

The target key scores 0 and every other key -1e9: softmax puts exactly all mass on the target
when the row can see it, and spreads it uniformly over the visible keys when it cannot.

    with attach(model, score_mods=[previous_key]):
        model(ids)
"""

from __future__ import annotations

import torch
from torch import Tensor

OFF_TARGET = -1e9


def previous_key(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    target = (q_idx - 1).clamp_min(0)
    return torch.where(kv_idx == target, 0.0, OFF_TARGET).to(score.dtype).expand_as(score)
