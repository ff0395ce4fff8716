"""Portable block-sparse attention: exact softmax over the kept key blocks, gathered, with a backward.

For every (batch, KV head, query block) the kept K/V blocks are gathered once (the query heads
of a KV group share them) and each query row takes an exact softmax over the kept keys —
causal inside the diagonal block, the padding of a last partial block masked, the model's own
mask (padding, sliding window) and additive bias honoured, rows that see nothing all zero.
Nothing of size T×T per head exists in the forward or the backward: a query chunk of ``n``
blocks holds (B, H, n·bs, S·bs) scores, S the kept blocks, so the whole call's scores are
O(T · S · bs) per head, and with ``checkpoint`` (the default in training) autograd keeps only
each chunk's inputs and recomputes its scores in backward. The backward is autograd's
(``torch.gather``'s backward scatters into the K/V blocks): it runs on any device.

**The learned gate's gradient.** Block selection (top-k) has no gradient. To let a next-token
loss train the gate, the gate's log-probability of a kept block, log p(j | i) (a log-softmax
over the query block's candidate blocks), is added to every score of that block:

    softmax_j∈kept(s_ij + log p_j) ∝ p_j · exp(s_ij)

The gate becomes a prior over the kept blocks. At a uniform gate log p is the same for every
block of a row and cancels: the output is exactly attention restricted to the kept blocks (and at
density 1 dense attention). A trained gate may also reweight the kept blocks, which distillation
against the dense model penalises unless it helps. What this gradient cannot do is raise a block
that was *not* kept (it only sees the kept ones, and the rest through the normalisation):
SeerAttention's pooled-attention-map target (``handle.gate_log_probs``) is what teaches the gate
about those. ``SparseConfig.gate_bias`` scales the term (0: selection only).

    out = block_sparse_attention(q, k, v, sel.indices, sel.valid, geo, scale=D ** -0.5)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint as checkpointed

from attnkit.seam.kernels.blocks import BlockGeometry
from attnkit.seam.kernels.modifiers import apply_mods


@dataclass
class _Extras:
    """Everything of the call besides q/k/v and the selection, read by each chunk."""

    geo: BlockGeometry
    scale: float
    allowed: Tensor | None  # (B, H, Q, K) bool view, or None
    bias: Tensor | None  # (B, H, Q, K) float view, or None
    softcap: float | None
    sinks: Tensor | None  # (B, H, Q, 1) view, or None
    dropout_p: float
    mods: object | None  # attnkit.seam.plan.Mods of other sessions, or None
    q_positions: Tensor  # (nQb, rows) each padded query row's position among the keys


def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    indices: Tensor,
    valid: Tensor,
    geo: BlockGeometry,
    *,
    scale: float,
    block_bias: Tensor | None = None,
    allowed: Tensor | None = None,
    bias: Tensor | None = None,
    softcap: float | None = None,
    sinks: Tensor | None = None,
    dropout_p: float = 0.0,
    mods=None,
    chunk_elements: int = 1 << 21,
    checkpoint: bool = True,
) -> Tensor:
    """(B, H, Q, Dv) attention of q over the kept key blocks.

    q: (B, H, Q, D); k: (B, Hkv, K, D); v: (B, Hkv, K, Dv), H a multiple of Hkv.
    indices: (B, Hkv, nQb, S) long kept key blocks; valid: bool broadcastable to it.
    block_bias: (B, Hkv, nQb, S) added to every score of the slot's block (the gate's log-prob).
    allowed / bias / sinks: the call's own mask (True = may attend), additive bias and learned
        sink logits, broadcastable to (B, H, Q, K) / (B, H, Q, 1); softcap: the model's own.
    mods: score/mask modifiers (FlexAttention signature) of other sessions on the call.
    """
    B, H, Q, D = q.shape
    Hk, K = k.shape[1], k.shape[2]
    G = H // Hk
    bs, nQ, nK, S = geo.block_size, geo.n_query_blocks, geo.n_key_blocks, indices.shape[-1]
    Dv = v.shape[-1]
    # Rows per query block: the block size, or all of the queries when they fit one block (a
    # decoding step's single query is not padded to a whole block).
    rows, front = (Q, 0) if nQ == 1 else (bs, geo.front)
    qb = F.pad(q, (0, 0, front, nQ * rows - front - Q)).view(B, Hk, G, nQ, rows, D)
    q_positions = (geo.offset - front + torch.arange(nQ * rows, device=q.device)).view(nQ, rows)
    kb = F.pad(k, (0, 0, 0, geo.padded_keys - K)).view(B, Hk, nK, bs, D)
    vb = F.pad(v, (0, 0, 0, geo.padded_keys - K)).view(B, Hk, nK, bs, Dv)
    valid = valid.expand(B, Hk, nQ, S)
    extras = _Extras(
        geo, scale,
        None if allowed is None else allowed[..., :K].expand(B, H, Q, K),
        None if bias is None else bias[..., :K].expand(B, H, Q, K),
        softcap,
        None if sinks is None else sinks.expand(B, H, Q, 1),
        dropout_p, mods if mods else None, q_positions,
    )
    tensors = (q, k, v, block_bias, bias, sinks)
    keep_graph = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    outs = []
    for c0, c1, slots in _chunks(valid, B * H * rows * bs, chunk_elements):
        args = (qb[:, :, :, c0:c1], kb, vb, indices[:, :, c0:c1, :slots], valid[:, :, c0:c1, :slots],
                None if block_bias is None else block_bias[:, :, c0:c1, :slots], bias, sinks)
        if keep_graph and checkpoint:
            out = checkpointed(_chunk, c0, extras, *args, use_reentrant=False)
        else:
            out = _chunk(c0, extras, *args)
        outs.append(out)
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)  # (B, Hkv, nQb, G, rows, Dv)
    return out.permute(0, 1, 3, 2, 4, 5).reshape(B, H, nQ * rows, Dv)[:, :, front: front + Q]


def _chunks(valid: Tensor, per_slot: int, chunk_elements: int):
    """(first block, end block, slots) of each query chunk: consecutive query blocks whose scores
    (``per_slot`` per kept block and query block) fit ``chunk_elements``. A chunk computes only as
    many slots as its rows use (valid slots come first): a causal row i keeps ~density·(i+1)
    blocks, so early rows are not padded to the last row's count."""
    used = valid.flatten(0, 1).sum(-1).amax(0).clamp(min=1).tolist()  # (nQb,) slots each query block uses
    c0 = 0
    while c0 < len(used):
        c1, slots = c0 + 1, used[c0]
        while c1 < len(used) and (c1 + 1 - c0) * max(slots, used[c1]) * per_slot <= chunk_elements:
            slots = max(slots, used[c1])
            c1 += 1
        yield c0, c1, slots
        c0 = c1


def _chunk(
    c0: int, x: _Extras, q: Tensor, kb: Tensor, vb: Tensor, idx: Tensor, valid: Tensor,
    block_bias: Tensor | None, _bias: Tensor | None, _sinks: Tensor | None,
) -> Tensor:
    """(B, Hkv, n, G, rb, Dv) output of ``n`` query blocks of ``rb`` rows. (``_bias``/``_sinks``
    are passed so that a checkpoint sees them as inputs; ``x`` holds the views the chunk indexes.)

    Layout (B, Hkv, n, G, rb, S·bs): the G query heads of a KV group and the rows of a query
    block share one matrix product with the group's gathered keys, and the scores stay contiguous.
    """
    B, Hk, G, n, rb, D = q.shape
    bs = x.geo.block_size
    S = idx.shape[-1]
    geo = x.geo
    K, Q = geo.key_length, geo.query_length
    H = Hk * G
    Dv = vb.shape[-1]
    # gather the kept K/V blocks once per KV group: (B, Hkv, n, S·bs, D)
    flat = idx.reshape(B, Hk, n * S, 1, 1)
    kg = torch.gather(kb, 2, flat.expand(B, Hk, n * S, bs, D)).view(B, Hk, n, S * bs, D)
    vg = torch.gather(vb, 2, flat.expand(B, Hk, n * S, bs, Dv)).view(B, Hk, n, S * bs, Dv)
    compute = torch.promote_types(q.dtype, torch.float32)
    qg = q.permute(0, 1, 3, 2, 4, 5).reshape(B, Hk, n, G * rb, D)
    # Scores in float32 at least (half-precision models too, as fused SDPA kernels accumulate);
    # the scale folds into the (small) queries rather than the scores.
    scores = torch.matmul(qg.to(compute) * x.scale, kg.to(compute).transpose(-1, -2)).view(B, Hk, n, G, rb, S * bs)
    if x.softcap is not None:
        scores = x.softcap * torch.tanh(scores / x.softcap)

    # positions among the keys: of each query row (n, rb) and each gathered key (B, Hkv, n, S·bs)
    q_pos = x.q_positions[c0: c0 + n]
    k_pos = (idx[..., None] * bs + torch.arange(bs, device=idx.device)).reshape(B, Hk, n, S * bs)
    # what a row may see, shared by the G heads: kept slot, a real key, not in the future.
    # Padding query rows (outside the call) are left unmasked: they always see their own block,
    # so they stay finite, and they are cut from the output.
    keep = (valid[..., None].expand(B, Hk, n, S, bs).reshape(B, Hk, n, S * bs) & (k_pos < K))[:, :, :, None, None, :]
    if geo.causal:
        keep = keep & (k_pos[:, :, :, None, None, :] <= q_pos[None, None, :, None, :, None])
    # broadcast index grids (FlexAttention's b, h, q_idx, kv_idx) over (B, Hkv, n, G, bs, S·bs)
    b_i = torch.arange(B, device=idx.device).view(B, 1, 1, 1, 1, 1)
    h_i = torch.arange(H, device=idx.device).view(1, Hk, 1, G, 1, 1)
    r_i = (q_pos - geo.offset).clamp(0, Q - 1).view(1, 1, n, 1, rb, 1)  # the query's row in the call
    k_i = k_pos.clamp(max=K - 1).view(B, Hk, n, 1, 1, S * bs) if (x.allowed is not None or x.bias is not None
                                                                  or x.mods is not None) else None
    may_be_empty = x.allowed is not None
    if x.allowed is not None:
        keep = keep & x.allowed[b_i, h_i, r_i, k_i]
    if x.bias is not None:
        scores = scores + x.bias[b_i, h_i, r_i, k_i].to(compute)
    if x.mods is not None:  # evaluated as FlexAttention defines them; a score modifier's -inf hides the key
        q_i = q_pos.view(1, 1, n, 1, rb, 1)
        scores, extra = apply_mods(x.mods, scores, b_i, h_i, q_i, k_i)
        if extra is not None:
            keep, may_be_empty = keep & extra, True
    if block_bias is not None:  # the gate's log-prob of each kept block, on all its scores
        scores = (scores.view(B, Hk, n, G, rb, S, bs) + block_bias.to(compute).view(B, Hk, n, 1, 1, S, 1)).view_as(scores)
    # In place where autograd keeps nothing of ``scores`` (matmul, add and scalar mul save their
    # inputs, not their output); a user's modifier might, so then out of place.
    scores = scores.masked_fill(~keep, -math.inf) if x.mods is not None else scores.masked_fill_(~keep, -math.inf)
    if x.sinks is not None:  # a key without a value in every row's denominator
        sink = x.sinks[b_i[..., 0], h_i[..., 0], r_i[..., 0], 0].to(compute)  # (B, Hkv, n, G, rb)
        probs = torch.softmax(torch.cat([scores, sink.expand(B, Hk, n, G, rb)[..., None]], dim=-1), dim=-1)[..., :-1]
    elif may_be_empty:
        sees = keep.any(-1, keepdim=True)
        probs = torch.softmax(torch.where(sees, scores, 0.0), dim=-1)
        probs = torch.where(sees, probs, 0.0)  # a row that sees nothing (all padding) is zero, not NaN
    else:
        probs = torch.softmax(scores, dim=-1)
    if x.dropout_p:
        probs = F.dropout(probs, p=x.dropout_p, training=True)
    out = torch.matmul(probs.view(B, Hk, n, G * rb, S * bs), vg.to(compute))  # (B, Hkv, n, G·rb, Dv)
    return out.view(B, Hk, n, G, rb, Dv).to(vb.dtype)


def dense_reference(
    q: Tensor, k: Tensor, v: Tensor, block_mask: Tensor, geo: BlockGeometry, *, scale: float,
    block_log_probs: Tensor | None = None, allowed: Tensor | None = None,
) -> Tensor:
    """Dense attention restricted to the kept blocks, T×T per head: the reference the tests (and
    anyone checking the kernel) compare against. block_mask: (B, Hkv, nQb, nKb) bool;
    block_log_probs: (B, Hkv, nQb, nKb) added to the scores of each block."""
    B, H, Q, D = q.shape
    Hk, K = k.shape[1], k.shape[2]
    G = H // Hk
    bs = geo.block_size
    qpos = torch.arange(Q, device=q.device) + geo.offset
    kpos = torch.arange(K, device=q.device)
    qblk = (qpos + geo.front - geo.offset) // bs  # row of the selection
    kblk = kpos // bs
    token_mask = block_mask[:, :, qblk][..., kblk].repeat_interleave(G, dim=1)  # (B, H, Q, K)
    if geo.causal:
        token_mask = token_mask & (kpos[None, :] <= qpos[:, None])
    if allowed is not None:
        token_mask = token_mask & allowed
    scores = torch.matmul(q, k.repeat_interleave(G, 1).transpose(-1, -2)) * scale
    if block_log_probs is not None:
        scores = scores + block_log_probs[:, :, qblk][..., kblk].repeat_interleave(G, dim=1)
    scores = scores.masked_fill(~token_mask, -math.inf)
    sees = token_mask.any(-1, keepdim=True)
    probs = torch.where(sees, torch.softmax(torch.where(sees, scores, 0.0), -1), 0.0)
    return torch.matmul(probs, v.repeat_interleave(G, 1))
