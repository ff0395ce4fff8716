"""Causal block-sparse attention in two parts merged by their log-sum-exp: the own block in place, the rest gathered.

A causal query block always keeps its own (diagonal) key block, and that block is the only one it
masks. ``gather_sdpa`` gathers it with the others and pays for an additive mask over *every* kept
key. Here the call splits in two:

    own     every query block against its own key block, one SDPA call with ``is_causal=True``
            over all of them, the keys read in place (a strided view of K/V, no copy, no mask);
    others  the other kept blocks, gathered as in ``gather_sdpa``: rows bucketed by how many they
            keep, one SDPA call per bucket, no mask at all (none of them is partly in the future);
            the G query heads of a KV group are one head of G·rows query rows (one key matrix).

The two softmaxes merge exactly by their log-sum-exps (as in FlashAttention's split-KV and ring
attention): with l = logaddexp(l₁, l₂), out = e^(l₁−l)·o₁ + e^(l₂−l)·o₂. The backward needs no
merge: SDPA's fused backward recomputes each part's probabilities from the *merged* log-sum-exp and
takes rowsum(dO ∘ O) from the merged output, which is exactly the merged softmax's gradient
restricted to that part's keys; the parts' query gradients add up, their key gradients go to their
blocks. A gate term without gradient (``block_bias``, a constant per kept block) is an additive
mask of the gathered part; on the own block it only shifts that part's log-sum-exp.

What it computes is what ``block_attention.block_sparse_attention`` computes for the calls it
takes (``split_sdpa_supports``): causal, more than one query block (a decoding step's lone query
block runs on ``gather_sdpa``), every row keeping its own block, and what ``gather_sdpa`` takes
besides (no model mask, bias, soft-cap, sinks, dropout or modifiers; a gate term without gradient).

    out = split_sdpa_attention(q, k, v, sel.indices, sel.valid, geo, scale=D ** -0.5)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from attnkit.seam.kernels.blocks import BlockGeometry

_forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


@dataclass
class _Bucket:
    """Rows that keep ``c`` blocks besides their own, run as one SDPA call: a slice of the plan's row order."""

    start: int  # its rows are order[start: start + m]
    m: int
    blocks: Tensor  # (m·c,) long: their other kept key blocks among B·Hkv·nKb
    mask: Tensor | None  # (m, 1, 1, c·bs) the gate's term of each kept block, or None


@dataclass
class SplitPlan:
    """Where each row's own key block lies, and the buckets of the other kept blocks.

    Rows are taken in ``order`` (by how many other blocks they keep), so that a bucket's rows are a
    slice: its queries, outputs and log-sum-exps are views, never gathered or scattered one by one.
    """

    own: Tensor  # (N,) long: each row's own key block among B·Hkv·nKb, N = B·Hkv·nQb
    own_bias: Tensor | None  # (N,) the gate's term of the own block, or None
    order: Tensor  # (N,) long: the rows, bucket by bucket (rows keeping only their own block first)
    buckets: list[_Bucket]

    @property
    def widest(self) -> int:
        """The most key blocks one bucket gathers (the gather buffer's size)."""
        return max((b.blocks.shape[0] for b in self.buckets), default=0)


def split_sdpa_plan(indices: Tensor, valid: Tensor, geo: BlockGeometry, dtype: torch.dtype,
                    block_bias: Tensor | None = None) -> SplitPlan | None:
    """The plan of a selection (B, Hkv, nQb, S), or None where this kernel cannot run it: not causal,
    a single query block, or a row that does not keep its own block."""
    B, Hk, nQ, S = indices.shape
    if not geo.causal or nQ == 1:
        return None
    bs, nK = geo.block_size, geo.n_key_blocks
    valid = valid.expand(B, Hk, nQ, S)
    count = valid.sum(-1).flatten()  # (N,) kept blocks of each row
    # sorted kept blocks, the unused slots (numbered nK) last: the own block is a causal row's largest
    blocks, slot = indices.masked_fill(~valid, nK).sort(-1)
    blocks, slot = blocks.reshape(-1, S), slot.reshape(-1, S)
    last = blocks.gather(1, (count - 1).clamp(min=0)[:, None])[:, 0]  # (N,)
    diagonal = geo.query_block_ids.to(indices.device).repeat(B * Hk)
    if not bool(((count > 0) & (last == diagonal)).all()):
        return None
    base = torch.arange(B * Hk, device=indices.device).repeat_interleave(nQ) * nK  # (N,) first block of the row's head
    others = count - 1
    order = others.argsort(stable=True)
    kinds, sizes = others[order].unique_consecutive(return_counts=True)
    blocks = (blocks + base[:, None])[order]  # rows in bucket order
    bias = own_bias = None
    if block_bias is not None:
        bias = block_bias.detach().expand(B, Hk, nQ, S).reshape(-1, S).gather(1, slot)
        own_bias = bias.gather(1, (count - 1)[:, None])[:, 0]
        bias = bias[order]
    buckets, start = [], 0
    for c, m in zip(kinds.tolist(), sizes.tolist()):
        if c > 0:  # (rows keeping their own block only need no bucket)
            rows = slice(start, start + m)
            mask = None
            if bias is not None:  # (m, 1, 1, c·bs): the gate's term on every key of the slot's block
                mask = bias[rows, :c].to(dtype).repeat_interleave(bs, -1)[:, None, None, :]
            buckets.append(_Bucket(start, m, blocks[rows, :c].flatten(), mask))
        start += m
    return SplitPlan(last + base, own_bias, order, buckets)


def split_sdpa_attention(
    q: Tensor, k: Tensor, v: Tensor, indices: Tensor, valid: Tensor, geo: BlockGeometry, *,
    scale: float, block_bias: Tensor | None = None,
) -> Tensor:
    """(B, H, Q, Dv) attention of q over the kept key blocks (see the module's docstring).

    q: (B, H, Q, D); k: (B, Hkv, K, D); v: (B, Hkv, K, Dv), H a multiple of Hkv.
    indices: (B, Hkv, nQb, S) long kept key blocks; valid: bool broadcastable to it (valid first).
    block_bias: (B, Hkv, nQb, S) added to every score of the slot's block, without gradient.
    Raises ValueError for a selection it cannot run (``split_sdpa_plan`` returns None).
    """
    B, H, Q, D = q.shape
    Hk, K = k.shape[1], k.shape[2]
    G = H // Hk
    bs, nQ, nK = geo.block_size, geo.n_query_blocks, geo.n_key_blocks
    plan = split_sdpa_plan(indices, valid, geo, q.dtype, block_bias)
    if plan is None:
        raise ValueError("not causal, a single query block, or a row without its own block")
    front = geo.front
    # one SDPA batch row per (batch, KV head, query block): (N, G, bs, D), N = B·Hkv·nQb
    qb = F.pad(q, (0, 0, front, nQ * bs - front - Q)).view(B, Hk, G, nQ, bs, D)
    qb = qb.transpose(2, 3).reshape(B * Hk * nQ, G, bs, D)
    # every key block, keys and values side by side so that one gather fetches both: (B·Hkv·nKb, bs, D + Dv)
    kvb = F.pad(torch.cat([k, v], -1), (0, 0, 0, geo.padded_keys - K)).reshape(B * Hk * nK, bs, -1)
    out = _SplitAttention.apply(qb, kvb, D, plan, scale, (B, Hk, nQ))  # (B, Hkv, nQb, G, bs, Dv)
    # a view: the output lies as (B, tokens, H, Dv), see _SplitAttention.forward
    out = out.permute(0, 1, 3, 2, 4, 5).reshape(B, H, nQ * bs, -1)
    return out[:, :, front: front + Q]


def _own_blocks(kvb: Tensor, own: Tensor, D: int, G: int) -> tuple[Tensor, Tensor]:
    """(N, G, bs, D|Dv) each row's own keys and values, expanded over the group: a strided view of
    ``kvb`` when the own blocks are consecutive (no KV cache in front, or one of whole blocks)."""
    N = own.shape[0]
    first = int(own[0])
    if bool((own == torch.arange(first, first + N, device=own.device)).all()):
        kv = kvb[first: first + N]
    else:
        kv = kvb.index_select(0, own)
    kv = kv[:, None].expand(-1, G, -1, -1)
    return kv[..., :D], kv[..., D:]


class _SplitAttention(torch.autograd.Function):
    """Own blocks (causal, in place) + gathered other blocks (no mask), merged by log-sum-exp; the
    backward runs SDPA's fused backward on each part with the merged output and log-sum-exp.
    Rows are in the plan's order throughout; one buffer holds every bucket's gathered blocks in turn
    (fresh large allocations cost page faults on every call)."""

    @staticmethod
    def forward(ctx, qb: Tensor, kvb: Tensor, D: int, plan: SplitPlan, scale: float,
                layout: tuple[int, int, int]) -> Tensor:
        N, G, bs, _ = qb.shape
        B, Hk, nQ = layout
        Dv = kvb.shape[-1] - D
        k_own, v_own = _own_blocks(kvb, plan.own, D, G)
        o_own, lse_own = _forward(qb, k_own, v_own, 0.0, True, scale=scale)  # (N, G, bs, Dv), (N, G, bs)
        if plan.own_bias is not None:  # a constant on every score of the part shifts its log-sum-exp
            lse_own = lse_own + plan.own_bias.to(lse_own.dtype)[:, None, None]
        order = plan.order
        qs = qb.index_select(0, order)  # (N, G, bs, D) rows in bucket order
        # the other blocks' part of every row, bucket by bucket into slices (a row keeping only its
        # own block: log-sum-exp -inf, weight 0), then one merge for all rows
        o_others = qb.new_zeros(N, G * bs, Dv)
        lse_others = lse_own.new_full((N, G * bs), float("-inf"))
        buf = kvb.new_empty(plan.widest, *kvb.shape[1:])
        for b in plan.buckets:
            m, rows = b.m, slice(b.start, b.start + b.m)
            kv = torch.index_select(kvb, 0, b.blocks, out=buf[: b.blocks.shape[0]]).view(m, 1, -1, kvb.shape[-1])
            o, lse_b = _forward(qs[rows].view(m, 1, G * bs, D), kv[..., :D], kv[..., D:], 0.0, False,
                                attn_mask=b.mask, scale=scale)  # (m, 1, G·bs, Dv), (m, 1, G·bs)
            o_others[rows] = o.view(m, G * bs, Dv)
            lse_others[rows] = lse_b.view(m, G * bs)
        l1 = lse_own.index_select(0, order).view(N, G * bs)
        lse = torch.logaddexp(l1, lse_others)  # (N, G·bs) the merged log-sum-exp
        acc = o_own.index_select(0, order).view(N, G * bs, Dv).to(lse.dtype)  # merged in float32 at least
        acc.mul_((l1 - lse).exp_()[..., None]).add_(o_others * (lse_others - lse).exp_()[..., None])
        acc, lse = acc.view(N, G, bs, Dv), lse.view(N, G, bs)
        # The output lies as (B, tokens, H, Dv), as SDPA's own does: the model's transpose + reshape
        # for its output projection is then a view of it, not a second copy kept for backward.
        out = qb.new_empty(B, nQ, bs, Hk, G, Dv).permute(0, 3, 1, 4, 2, 5)  # (B, Hkv, nQb, G, bs, Dv)
        out[_where(order, Hk, nQ)] = acc.to(out.dtype)
        ctx.save_for_backward(qs, kvb, out, lse)
        ctx.D, ctx.plan, ctx.scale = D, plan, scale
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        qs, kvb, out, lse = ctx.saved_tensors
        plan, D, scale = ctx.plan, ctx.D, ctx.scale
        N, G, bs, Dq = qs.shape
        Hk, nQ = out.shape[1], out.shape[2]
        Dv = kvb.shape[-1] - D
        order = plan.order
        where = _where(order, Hk, nQ)
        grad_s, out_s = grad_out[where].contiguous(), out[where].contiguous()  # (N, G, bs, Dv) in bucket order
        # a key block's gradient adds up over every row keeping it: in float32 at least (keys and
        # values apart, so that no part's gradients are concatenated first)
        acc_dtype = torch.promote_types(kvb.dtype, torch.float32)
        dk = kvb.new_zeros(*kvb.shape[:-1], D, dtype=acc_dtype)
        dv = kvb.new_zeros(*kvb.shape[:-1], Dv, dtype=acc_dtype)
        own = plan.own.index_select(0, order)
        k_own, v_own = _own_blocks(kvb, own, D, G)
        lse_own = lse if plan.own_bias is None else lse - plan.own_bias.index_select(0, order).to(lse.dtype)[:, None, None]
        dqs, gk, gv = _backward(grad_s, qs, k_own, v_own, out_s, lse_own, 0.0, True, scale=scale)
        dk.index_add_(0, own, gk.sum(1).to(acc_dtype))
        dv.index_add_(0, own, gv.sum(1).to(acc_dtype))
        del gk, gv, k_own, v_own
        buf = kvb.new_empty(plan.widest, *kvb.shape[1:])
        for b in plan.buckets:
            # The G heads of a group as G·bs query rows of one head: the keys' gradient comes back
            # summed over the group.
            m, rows = b.m, slice(b.start, b.start + b.m)
            kv = torch.index_select(kvb, 0, b.blocks, out=buf[: b.blocks.shape[0]]).view(m, 1, -1, kvb.shape[-1])
            gq, gk, gv = _backward(
                grad_s[rows].view(m, 1, G * bs, Dv), qs[rows].view(m, 1, G * bs, Dq), kv[..., :D], kv[..., D:],
                out_s[rows].view(m, 1, G * bs, Dv), lse[rows].view(m, 1, G * bs), 0.0, False,
                attn_mask=b.mask, scale=scale)
            dqs[rows] += gq.view(m, G, bs, Dq)
            dk.index_add_(0, b.blocks, gk.reshape(-1, bs, D).to(acc_dtype))
            dv.index_add_(0, b.blocks, gv.reshape(-1, bs, Dv).to(acc_dtype))
        dq = torch.empty_like(dqs)
        dq[order] = dqs
        return dq, torch.cat([dk, dv], -1).to(kvb.dtype), None, None, None, None


def _where(order: Tensor, Hk: int, nQ: int) -> tuple[Tensor, Tensor, Tensor]:
    """Rows (among B·Hkv·nQb) as (batch, KV head, query block) indices."""
    return order // (Hk * nQ), order // nQ % Hk, order % nQ
