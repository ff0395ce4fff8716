"""Local window: a query sees the keys within ``window`` positions of itself, on both sides.

(AND-ed with a causal model's own mask, that is the last window + 1 keys.)

    with attach(model, mask_mods=[local_window(5)]):
        model(ids)
"""

from __future__ import annotations

from torch import Tensor


def local_window(window: int):
    if window < 0:
        raise ValueError("the window must be >= 0")

    def within_window(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (q_idx - kv_idx).abs() <= window

    within_window.__name__ = f"local_window_{window}"
    return within_window
