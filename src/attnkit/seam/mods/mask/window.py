"""The window: a query sees the keys near it, and (StreamingLLM) the first keys as attention sinks.

Written once, as mask modifiers (``mask_mod(b, h, q_idx, kv_idx) -> bool``), and used wherever
attnkit needs a window: as masks on a model (``attach(model, mask_mods=[local_window(64)])``),
in ``validate``'s local-attention ablation, and by sparse block selection, which evaluates the
same functions on block numbers instead of positions (its ``window`` and ``sinks_window``
patterns rank key blocks by ``key_distance`` and always keep ``sink_window(sink_blocks,
local_blocks - 1)`` of them).

    local_window(5)                  |i - j| <= 5: the 11 keys around the query (6 with a causal mask)
    sink_window(sinks=4, window=256)  the first 4 keys as well (Xiao et al. 2023)
"""

from __future__ import annotations

from torch import Tensor


def key_distance(q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """|q_idx - kv_idx|: how far a key is from the query (0 for the query's own position)."""
    return (q_idx - kv_idx).abs()


def local_window(window: int):
    """A query sees the keys within ``window`` positions of itself, on both sides (AND-ed with a
    causal model's own mask, that is the last window + 1 keys)."""
    if window < 0:
        raise ValueError("the window must be >= 0")

    def within_window(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return key_distance(q_idx, kv_idx) <= window

    within_window.__name__ = f"local_window_{window}"
    return within_window


def sink_window(sinks: int = 4, window: int = 256):
    """StreamingLLM's pattern: the first ``sinks`` keys plus ``local_window(window)``. Without the
    first tokens a window loses the attention sinks trained models rely on (perplexity 5158 vs
    5.40 with 4 sink tokens in Xiao et al.)."""
    if sinks < 0 or window < 0:
        raise ValueError("sinks and window must be >= 0")

    def sinks_and_recent(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (kv_idx < sinks) | (key_distance(q_idx, kv_idx) <= window)

    sinks_and_recent.__name__ = f"sink_window_{sinks}_{window}"
    return sinks_and_recent
