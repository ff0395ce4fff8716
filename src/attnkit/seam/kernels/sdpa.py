"""The model's own kernel, and plain SDPA: the fast paths, used whenever nothing needs more.

A temperature is a pure rescaling of the logits: it folds into the softmax scale and runs here
at SDPA's speed and memory. Anything else (soft-caps, patterns, masks) needs the dense or flex kernel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from attnkit.seam.call import AttentionCall
    from attnkit.seam.plan import Mods


def _foldable(call: AttentionCall, mods: Mods) -> bool:
    if not mods:
        return True
    # (s * scale + bias) / t is not (s * scale / t) + bias: only a plain call folds a temperature.
    return mods.scale_factor is not None and call.softcap is None and call.bias is None and call.sinks is None


def native_supports(call: AttentionCall, mods: Mods, explicit: bool) -> bool:
    return call.native is not None and _foldable(call, mods)


def native_attention(call: AttentionCall, mods: Mods, chunk_elements: int) -> Tensor:
    return call.native(call.scale * (mods.scale_factor or 1.0))


def sdpa_supports(call: AttentionCall, mods: Mods, explicit: bool) -> bool:
    return call.softcap is None and call.sinks is None and _foldable(call, mods)


def sdpa_attention(call: AttentionCall, mods: Mods, chunk_elements: int) -> Tensor:
    # SDPA's own is_causal aligns the triangle top-left; attnkit's calls put queries at the end of
    # the keys (KV cache), so the flag is only used where the two agree (a square call).
    square = call.query_length == call.key_length
    use_flag = call.is_causal and call.allowed is None and call.bias is None and square
    mask = None if use_flag else additive_mask(call)
    return F.scaled_dot_product_attention(
        call.query, call.key, call.value, attn_mask=mask, is_causal=use_flag,
        dropout_p=call.dropout_p, scale=call.scale * (mods.scale_factor or 1.0),
    )


def additive_mask(call: AttentionCall) -> Tensor | None:
    """The call's mask and bias as one float additive mask for SDPA (-inf where not allowed)."""
    allowed = call.allowed_or_causal()
    if call.bias is None:
        return allowed
    if allowed is None:
        return call.bias
    return torch.where(allowed, call.bias, float("-inf"))
