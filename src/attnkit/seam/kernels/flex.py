"""FlexAttention: the same score/mask modifiers in one fused kernel (compiled where it trains: CUDA).

Chosen automatically on CUDA, where it has a backward. On CPU, PyTorch runs FlexAttention's
forward only (no backward: pytorch #148752); attnkit uses it there only when asked for
(``kernel="flex"``) and without gradients. The model's own soft-cap and bias become part of the
score modifier; its mask becomes the mask modifier (a block mask where it is causal).
Learned sinks are not expressible here: such calls go to the dense kernel.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from attnkit.seam.call import AttentionCall
    from attnkit.seam.plan import Mods


# Eager flex_attention materialises every score (B, H, Q, K); torch.compile makes it the fused kernel.
# Compiled where FlexAttention trains (CUDA). On the CPU, where attnkit runs it only when asked for
# and without gradients, it stays eager: a compile per set of modifiers costs seconds there.
COMPILED_ON = ("cuda",)
_compiled = None


def _flex_attention(device: torch.device):
    """torch's flex_attention, compiled once per process on the devices of ``COMPILED_ON``."""
    global _compiled
    from torch.nn.attention.flex_attention import flex_attention

    if device.type not in COMPILED_ON:
        return flex_attention
    if _compiled is None:
        # dynamic=None: the first shape is specialised, a second one (decoding: one more key a step)
        # compiles a kernel generic in the lengths instead of one per length.
        _compiled = torch.compile(flex_attention)
    return _compiled


def flex_supports(call: AttentionCall, mods: Mods, explicit: bool) -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    if call.sinks is not None or call.dropout_p:
        return False
    if call.query.device.type == "cuda":
        return True
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (call.query, call.key, call.value))
    return explicit and not needs_grad


def flex_attention_call(call: AttentionCall, mods: Mods, chunk_elements: int) -> Tensor:
    from torch.nn.attention.flex_attention import create_block_mask

    B, H, Q, _ = call.query.shape
    K = call.key_length
    offset = K - Q  # flex numbers queries from 0; attnkit's mods see their position among the keys
    allowed = call.allowed_or_causal()
    bias = call.bias
    softcap = call.softcap
    if allowed is not None:
        allowed = allowed.expand(B, H, Q, K)
    if bias is not None:
        bias = bias.expand(B, H, Q, K)

    def score_mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        dtype = score.dtype
        if softcap is not None:
            score = softcap * torch.tanh(score / softcap)
        if bias is not None:
            score = score + bias[b, h, q_idx, kv_idx]
        for mod in mods.score:
            score = mod(score, b, h, q_idx + offset, kv_idx)
        # A modifier that closes over a wider tensor (float64 slopes on a float32 model) promotes the
        # score; compiled FlexAttention then computes garbage (seen on the CPU), so it gets its dtype back.
        return score.to(dtype)

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        keep = allowed[b, h, q_idx, kv_idx] if allowed is not None else kv_idx >= 0
        for mod in mods.mask:
            keep = keep & mod(b, h, q_idx + offset, kv_idx)
        return keep

    block_mask = create_block_mask(mask_mod, B, H, Q, K, device=call.query.device)
    flex_attention = _flex_attention(call.query.device)
    return flex_attention(call.query, call.key, call.value, score_mod=score_mod, block_mask=block_mask, scale=call.scale)
