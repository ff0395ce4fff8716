"""Temperature: divide the logits by t (t > 1 spreads attention, t < 1 sharpens it).

A pure rescaling of the logits, so a kernel may fold it into the softmax scale instead
(``scale_factor``): SDPA and flash then run it at their own speed and memory.

    with attach(model, score_mods=[temperature(2.0)]):
        model(ids)
"""

from __future__ import annotations

from torch import Tensor


def temperature(t: float):
    if not t > 0:
        raise ValueError("temperature must be positive")

    def divide_by_temperature(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return score / t

    divide_by_temperature.scale_factor = 1.0 / t
    return divide_by_temperature
