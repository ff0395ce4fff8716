"""StreamingLLM's pattern: the first ``sinks`` keys plus a window of the ``window`` most recent.

    with attach(model, mask_mods=[sink_window(sinks=4, window=256)]):
        model(ids)
"""

from __future__ import annotations

from torch import Tensor


def sink_window(sinks: int = 4, window: int = 256):
    if sinks < 0 or window < 0:
        raise ValueError("sinks and window must be >= 0")

    def sinks_and_recent(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return (kv_idx < sinks) | ((q_idx - kv_idx).abs() <= window)

    sinks_and_recent.__name__ = f"sink_window_{sinks}_{window}"
    return sinks_and_recent
