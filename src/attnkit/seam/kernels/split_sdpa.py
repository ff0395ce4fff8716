"""Causal block-sparse attention in two parts merged by their log-sum-exp: the own block, and the rest gathered.

A causal query block always keeps its own (diagonal) key block, and that block is the only one it
masks. ``gather_sdpa`` gathers it with the others and pays for an additive mask over *every* kept
key. Here the call splits in two:

    own     every query block against its own key block, one causal SDPA call over all of them
            (the KV group's G heads share the block's keys: SDPA's grouped-query form, no copy of
            them per head);
    others  the other kept blocks, gathered: rows bucketed by how many they keep, one SDPA call
            per bucket, no mask at all (none of them is partly in the future); the G query heads
            of a KV group are one head of G·rows query rows (one key matrix).

The two softmaxes merge exactly by their log-sum-exps (as in FlashAttention's split-KV and ring
attention): with l = logaddexp(l₁, l₂), out = e^(l₁−l)·o₁ + e^(l₂−l)·o₂, bucket by bucket into
the own part's output (in place: no zero-filled buffers for the rows that keep their own block
only). The backward needs no merge: SDPA's fused backward recomputes each part's probabilities
from the *merged* log-sum-exp and takes rowsum(dO ∘ O) from the merged output, which is exactly
the merged softmax's gradient restricted to that part's keys; the parts' query gradients add up,
their key gradients go to their blocks. A gate term without gradient (``block_bias``, a constant
per kept block) is an additive mask of the gathered part; on the own block it only shifts that
part's log-sum-exp.

Rows are (query block, batch, KV head), query block outermost: a bucket is then a slice of rows
(the budget of a pattern grows with the query block, the same for every head), so queries,
outputs and log-sum-exps are taken by slicing, not gathered and scattered row by row. Autograd
keeps the model's own k and v (no padded or concatenated copy of them), the queries in row order,
the output and one log-sum-exp per row: what dense SDPA keeps.

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
    """Rows that keep ``c`` blocks besides their own, run as one SDPA call: a slice of the rows."""

    start: int  # its rows are start: start + m (in the plan's order)
    m: int
    blocks: Tensor  # (m·c,) long: their other kept key blocks among B·Hkv·nKb
    mask: Tensor | None  # (m, 1, 1, c·bs) the gate's term of each kept block, or None


@dataclass
class SplitPlan:
    """Where each row's own key block lies, and the buckets of the other kept blocks.

    Rows are numbered (query block, batch, KV head), N = nQb·B·Hkv of them, and taken in
    ``order`` (by how many other blocks they keep; None: already so, the usual case), so that a
    bucket's rows are a slice.
    """

    own: Tensor  # (N,) long: each row's own key block among B·Hkv·nKb, in the plan's order
    own_bias: Tensor | None  # (N,) the gate's term of the own block, or None, in the plan's order
    order: Tensor | None  # (N,) long: the rows, bucket by bucket, or None for 0..N-1
    buckets: list[_Bucket]

    @property
    def widest(self) -> int:
        """The most key blocks one bucket gathers (the gather buffers' size)."""
        return max((b.blocks.shape[0] for b in self.buckets), default=0)


def split_sdpa_plan(indices: Tensor, valid: Tensor, geo: BlockGeometry, dtype: torch.dtype,
                    block_bias: Tensor | None = None) -> SplitPlan | None:
    """The plan of a selection (B, Hk, nQb, S), or None where this kernel cannot run it: not causal,
    a single query block, or a row that does not keep its own block."""
    B, Hk, nQ, S = indices.shape
    if not geo.causal or nQ == 1:
        return None
    bs, nK = geo.block_size, geo.n_key_blocks

    def rows(t: Tensor) -> Tensor:  # (B, Hk, nQb, ...) -> (N, ...) rows numbered (query block, batch, KV head)
        return t.movedim(2, 0).reshape(B * Hk * nQ, *t.shape[3:])

    valid = valid.expand(B, Hk, nQ, S)
    count = rows(valid.sum(-1))  # (N,) kept blocks of each row
    # sorted kept blocks, the unused slots (numbered nK) last: the own block is a causal row's largest
    blocks, slot = indices.masked_fill(~valid, nK).sort(-1)
    blocks, slot = rows(blocks), rows(slot)
    last = blocks.gather(1, (count - 1).clamp(min=0)[:, None])[:, 0]  # (N,)
    diagonal = geo.query_block_ids.to(indices.device).repeat_interleave(B * Hk)
    if not bool(((count > 0) & (last == diagonal)).all()):
        return None
    base = torch.arange(B * Hk, device=indices.device).repeat(nQ) * nK  # (N,) first block of the row's head
    others = count - 1
    order = None
    if not bool((others[1:] >= others[:-1]).all()):
        order = others.argsort(stable=True)
    ordered = (lambda t: t) if order is None else (lambda t: t.index_select(0, order))
    kinds, sizes = ordered(others).unique_consecutive(return_counts=True)
    blocks = ordered(blocks + base[:, None])  # rows in bucket order
    bias = own_bias = None
    if block_bias is not None:
        bias = rows(block_bias.detach().expand(B, Hk, nQ, S)).gather(1, slot)
        own_bias = ordered(bias.gather(1, (count - 1)[:, None])[:, 0])
        bias = ordered(bias)
    buckets, start = [], 0
    for c, m in zip(kinds.tolist(), sizes.tolist()):
        if c > 0:  # (rows keeping their own block only need no bucket)
            mask = None
            if bias is not None:  # (m, 1, 1, c·bs): the gate's term on every key of the slot's block
                mask = bias[start: start + m, :c].to(dtype).repeat_interleave(bs, -1)[:, None, None, :]
            buckets.append(_Bucket(start, m, blocks[start: start + m, :c].reshape(-1), mask))
        start += m
    return SplitPlan(ordered(last + base), own_bias, order, buckets)


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
    Hk = k.shape[1]
    G = H // Hk
    bs, nQ = geo.block_size, geo.n_query_blocks
    plan = split_sdpa_plan(indices, valid, geo, q.dtype, block_bias)
    if plan is None:
        raise ValueError("not causal, a single query block, or a row without its own block")
    front = geo.front
    # the queries as rows (query block, batch, KV head) of G heads × bs: (N, G, bs, D), one copy
    if front or nQ * bs != Q:
        q = F.pad(q, (0, 0, front, nQ * bs - front - Q))
    qs = q.view(B, Hk, G, nQ, bs, D).permute(3, 0, 1, 2, 4, 5).reshape(-1, G, bs, D)
    if plan.order is not None:
        qs = qs.index_select(0, plan.order)
    out = _SplitAttention.apply(qs, k, v, plan, scale, geo)  # (B, H, nQb·bs, Dv)
    return out[:, :, front: front + Q]


def _key_blocks(t: Tensor, geo: BlockGeometry) -> Tensor:
    """(B·Hkv·nKb, bs, D) every key (value) block: a view of t (B, Hkv, K, D), a copy only to pad a partial last block."""
    if geo.padded_keys != t.shape[2]:
        t = F.pad(t, (0, 0, 0, geo.padded_keys - t.shape[2]))
    return t.reshape(-1, geo.block_size, t.shape[-1])


def _to_rows(t: Tensor, Hk: int, order: Tensor | None, bs: int) -> Tensor:
    """(B, H, nQb·bs, Dv) -> (N, G, bs, Dv) in the plan's row order (a copy)."""
    B, H, L, Dv = t.shape
    t = t.reshape(B, Hk, H // Hk, L // bs, bs, Dv).permute(3, 0, 1, 2, 4, 5).reshape(-1, H // Hk, bs, Dv)
    return t if order is None else t.index_select(0, order)


class _SplitAttention(torch.autograd.Function):
    """Own blocks (causal) + gathered other blocks (no mask), merged by log-sum-exp; the backward
    runs SDPA's fused backward on each part with the merged output and log-sum-exp. Rows are in
    the plan's order throughout; one buffer each for keys and values holds every bucket's
    gathered blocks in turn (fresh large allocations cost page faults on every call)."""

    @staticmethod
    def forward(ctx, qs: Tensor, k: Tensor, v: Tensor, plan: SplitPlan, scale: float, geo: BlockGeometry) -> Tensor:
        N, G, bs, D = qs.shape
        B, Hk = k.shape[:2]
        Dv = v.shape[-1]
        nQ = geo.n_query_blocks
        kb, vb = _key_blocks(k, geo), _key_blocks(v, geo)  # (B·Hkv·nKb, bs, D|Dv)
        k_own, v_own = kb.index_select(0, plan.own)[:, None], vb.index_select(0, plan.own)[:, None]  # (N, 1, bs, D)
        # o: (N, G, bs, Dv) laid out (N, bs, G, Dv); lse: (N, G, bs)
        o, lse = _forward(qs, k_own, v_own, 0.0, True, scale=scale)
        lse = lse.contiguous()  # (it may lie as (N, bs, G)); rows of it are viewed as (m, 1, G·bs) below
        del k_own, v_own
        if plan.own_bias is not None:  # a constant on every score of the part shifts its log-sum-exp
            lse = lse + plan.own_bias.to(lse.dtype)[:, None, None]
        kbuf, vbuf = kb.new_empty(plan.widest, bs, D), vb.new_empty(plan.widest, bs, Dv)
        for b in plan.buckets:
            m, rows, n = b.m, slice(b.start, b.start + b.m), b.blocks.shape[0]
            kg = torch.index_select(kb, 0, b.blocks, out=kbuf[:n]).view(m, 1, -1, D)
            vg = torch.index_select(vb, 0, b.blocks, out=vbuf[:n]).view(m, 1, -1, Dv)
            o2, l2 = _forward(qs[rows].view(m, 1, G * bs, D), kg, vg, 0.0, False, attn_mask=b.mask, scale=scale)
            # merge into the own part's rows: l = logaddexp(l1, l2), o = e^(l1-l)·o1 + e^(l2-l)·o2
            o1, l1, l2 = o[rows], lse[rows], l2.view(m, G, bs)
            merged = torch.logaddexp(l1, l2)
            w1, w2 = (l1 - merged).exp_()[..., None], (l2 - merged).exp_()[..., None]
            o1.copy_(o1.to(w1.dtype) * w1 + o2.view(m, G, bs, Dv).to(w1.dtype) * w2)  # in float32 at least
            lse[rows] = merged
        # The output lies as (B, tokens, H, Dv), as SDPA's own does: the model's transpose +
        # reshape for its output projection is then a view of it, not a second copy.
        out = qs.new_empty(B, nQ, bs, Hk, G, Dv)
        natural = o if plan.order is None else torch.empty_like(o).index_copy_(0, plan.order, o)
        out.permute(1, 0, 3, 4, 2, 5).copy_(natural.view(nQ, B, Hk, G, bs, Dv))
        out = out.view(B, nQ * bs, Hk * G, Dv).transpose(1, 2)  # (B, H, nQb·bs, Dv)
        ctx.save_for_backward(qs, k, v, out, lse)
        ctx.plan, ctx.scale, ctx.geo = plan, scale, geo
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        qs, k, v, out, lse = ctx.saved_tensors
        plan, scale, geo = ctx.plan, ctx.scale, ctx.geo
        N, G, bs, D = qs.shape
        Hk, K = k.shape[1], k.shape[2]
        Dv = v.shape[-1]
        grad_s, out_s = _to_rows(grad_out, Hk, plan.order, bs), _to_rows(out, Hk, plan.order, bs)  # (N, G, bs, Dv)
        kb, vb = _key_blocks(k, geo), _key_blocks(v, geo)
        # a key block's gradient adds up over every row keeping it: in float32 at least
        acc_dtype = torch.promote_types(k.dtype, torch.float32)
        dk = kb.new_zeros(kb.shape, dtype=acc_dtype)
        dv = vb.new_zeros(vb.shape, dtype=acc_dtype)
        k_own, v_own = kb.index_select(0, plan.own)[:, None], vb.index_select(0, plan.own)[:, None]
        lse_own = lse if plan.own_bias is None else lse - plan.own_bias.to(lse.dtype)[:, None, None]
        dqs, gk, gv = _backward(grad_s, qs, k_own, v_own, out_s, lse_own, 0.0, True, scale=scale)
        dk.index_add_(0, plan.own, gk[:, 0].to(acc_dtype))
        dv.index_add_(0, plan.own, gv[:, 0].to(acc_dtype))
        del gk, gv, k_own, v_own, lse_own
        kbuf, vbuf = kb.new_empty(plan.widest, bs, D), vb.new_empty(plan.widest, bs, Dv)
        for b in plan.buckets:
            # The G heads of a group as G·bs query rows of one head: the keys' gradient comes back
            # summed over the group.
            m, rows, n = b.m, slice(b.start, b.start + b.m), b.blocks.shape[0]
            kg = torch.index_select(kb, 0, b.blocks, out=kbuf[:n]).view(m, 1, -1, D)
            vg = torch.index_select(vb, 0, b.blocks, out=vbuf[:n]).view(m, 1, -1, Dv)
            gq, gk, gv = _backward(
                grad_s[rows].view(m, 1, G * bs, Dv), qs[rows].view(m, 1, G * bs, D), kg, vg,
                out_s[rows].view(m, 1, G * bs, Dv), lse[rows].view(m, 1, G * bs), 0.0, False,
                attn_mask=b.mask, scale=scale)
            dqs[rows] += gq.view(m, G, bs, D)
            dk.index_add_(0, b.blocks, gk.view(n, bs, D).to(acc_dtype))
            dv.index_add_(0, b.blocks, gv.view(n, bs, Dv).to(acc_dtype))
        B = k.shape[0]
        dk = dk.view(B, Hk, -1, D)[:, :, :K].to(k.dtype)
        dv = dv.view(B, Hk, -1, Dv)[:, :, :K].to(v.dtype)
        return dqs, dk, dv, None, None, None
