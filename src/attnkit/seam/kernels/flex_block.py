"""FlexAttention over the same block selection: ``BlockMask.from_kv_blocks`` + a mask/score mod.

The kept blocks become the block mask's KV blocks (the heads of a KV group share them, and
``enable_gqa`` keeps K/V unexpanded); inside a kept block the mask modifier applies causality,
the last block's padding and the model's own mask; the gate's log-probability of a block is a
score modifier, as in the portable kernel. Compiled (``torch.compile``) on every device: eager
FlexAttention materialises the full score matrix. Where it runs: CUDA (forward and backward),
and CPU inference (PyTorch has no CPU backward for FlexAttention).
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit.seam.kernels.blocks import BlockSelection

_compiled = None


def flex_available() -> bool:
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def _flex():
    global _compiled
    if _compiled is None:
        from torch.nn.attention.flex_attention import flex_attention

        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


def flex_block_attention(
    q: Tensor, k: Tensor, v: Tensor, sel: BlockSelection, *, scale: float,
    block_log_probs: Tensor | None = None, allowed: Tensor | None = None, bias: Tensor | None = None,
    softcap: float | None = None,
) -> Tensor:
    """(B, H, Q, Dv): the portable kernel's result through FlexAttention. Requires queries aligned
    to blocks (``sel.geometry.front == 0``). block_log_probs: (B, Hkv, nQb, nKb)."""
    from torch.nn.attention.flex_attention import BlockMask

    geo = sel.geometry
    if geo.front:
        raise ValueError("FlexAttention needs the queries aligned to the blocks (front padding 0)")
    B, H, Q, _ = q.shape
    Hk, K = k.shape[1], k.shape[2]
    G = H // Hk
    bs, offset = geo.block_size, geo.offset
    nQ, nK = geo.n_query_blocks, geo.n_key_blocks
    counts = sel.valid.expand_as(sel.indices).sum(-1).to(torch.int32)  # (B, Hkv, nQb): valid slots come first
    indices = torch.zeros(B, Hk, nQ, nK, dtype=torch.int32, device=q.device)
    indices[..., : sel.slots] = sel.indices.to(torch.int32)
    counts, indices = counts.repeat_interleave(G, 1), indices.repeat_interleave(G, 1)  # per query head
    allowed = None if allowed is None else allowed[..., :K].expand(B, H, Q, K)
    bias = None if bias is None else bias[..., :K].expand(B, H, Q, K)
    causal = geo.causal

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        keep = kv_idx < K
        if causal:
            keep = keep & (kv_idx <= q_idx + offset)
        if allowed is not None:  # indices clamped: a last partial block's padding must not read past the mask
            keep = keep & allowed[b, h, q_idx.clamp(max=Q - 1), kv_idx.clamp(max=K - 1)]
        return keep

    def score_mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        dtype = score.dtype  # a wider bias or gate term must not promote it (compiled flex miscomputes then)
        if softcap is not None:
            score = softcap * torch.tanh(score / softcap)
        if bias is not None:
            score = score + bias[b, h, q_idx.clamp(max=Q - 1), kv_idx.clamp(max=K - 1)]
        if block_log_probs is not None:
            score = score + block_log_probs[b, h // G, q_idx // bs, kv_idx // bs]
        return score.to(dtype)

    block_mask = BlockMask.from_kv_blocks(counts, indices, BLOCK_SIZE=bs, mask_mod=mask_mod, seq_lengths=(Q, K))
    return _flex()(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=G > 1)
