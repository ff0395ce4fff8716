"""Mask modifiers in FlexAttention's signature: ``mask_mod(b, h, q_idx, kv_idx) -> bool``.

True where a query may see a key. A mask modifier only ever takes keys away: it is combined
with the model's own mask (causal, padding, sliding window) by AND. They compose with
``and_masks`` / ``or_masks`` and run densely on broadcast index tensors or inside FlexAttention.
``q_idx`` is the query's position among the keys (FlexAttention's index plus the KV-cache offset).

    from attnkit.seam.mods.mask import and_masks, causal, local_window
    with attach(model, mask_mods=[local_window(64)]):
        model(ids)
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from attnkit.seam.mods.mask.causal import causal
from attnkit.seam.mods.mask.combine import and_masks, or_masks
from attnkit.seam.mods.mask.window import key_distance, local_window, sink_window

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]

MASK_MODS: dict[str, Callable[..., MaskMod]] = {
    "local_window": local_window,
    "sink_window": sink_window,
}

__all__ = ["MASK_MODS", "MaskMod", "and_masks", "causal", "key_distance", "local_window", "or_masks", "sink_window"]
