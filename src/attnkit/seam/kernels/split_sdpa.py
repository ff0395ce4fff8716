"""Causal block-sparse attention in two parts merged by their log-sum-exp: the own block, and the rest gathered.

A causal query block always keeps its own (diagonal) key block, and that block is the only one it
masks. ``gather_sdpa`` gathers it with the others and pays for an additive mask over *every* kept
key. Here the call splits in two:

    own     every query block against its own key block, one causal SDPA call over all of them
            that reads queries, keys and values in place (strided views: the query blocks are the
            call's batch, the KV group's G heads share their block's keys in SDPA's grouped-query
            form), no copy, no mask;
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

A bucket is a run of consecutive query blocks (every pattern's budget is the same for every batch
row and KV head of a query block and grows with it), so its queries, outputs and log-sum-exps are
slices, merged in place; only a bucket's queries (and in backward its output and the output's
gradient) are copied, into the (rows, G·bs) layout of its call, one bucket at a time. The output is
SDPA's own (B, tokens, H, Dv) layout. Autograd keeps what dense SDPA keeps: the model's own q, k and
v (no copy of them when they fill whole blocks), the output and one log-sum-exp per row; and of the
plan only its list of kept blocks, 2 bytes a block below 32,768 blocks (``SplitPlan.saved``).

What it computes is what ``block_attention.block_sparse_attention`` computes for the calls it
takes (``split_sdpa_plan``): causal, more than one query block (a decoding step's lone query
block runs on ``gather_sdpa``), every row keeping its own block, the rows of a query block keeping
as many blocks as each other and no fewer than the query block before (what ``select_blocks``
gives every pattern; other selections run on ``gather_sdpa``), and what ``gather_sdpa`` takes
besides (no model mask, bias, soft-cap, sinks, dropout or modifiers; a gate term without gradient).

    out = split_sdpa_attention(q, k, v, sel.indices, sel.valid, geo, scale=D ** -0.5)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from attnkit.seam.kernels.blocks import BlockGeometry, block_number_dtype
from attnkit.seam.kernels.workspace import Workspace, take_or_new

_forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


@dataclass(frozen=True, slots=True)
class _Bucket:
    """Query blocks i0..i1-1 keep ``c`` blocks besides their own (every batch row and KV head): one SDPA call."""

    i0: int
    i1: int
    at: int  # their other kept key blocks are ``SplitPlan.others[at: at + n]``
    n: int  # m·c, m = (i1 - i0)·B·Hkv rows
    c: int


@dataclass
class SplitPlan:
    """The buckets of the other kept blocks (each row's own block is its diagonal one), the ones
    keeping the most blocks first: SDPA's working buffers (and the bucket's temporaries) then shrink
    call after call, each fitting in the memory the call before freed; growing, each would take
    fresh heap that stays resident after the call.

    What autograd keeps of it for the backward is ``saved()``: the kept blocks (block numbers in
    int16 where they fit, half of the int32 the kernels index with, which a bucket makes of its part
    when it runs) and the gate's terms of them (or None); the backward rebuilds the plan from these
    and the selection's ``valid`` (the buckets' bounds: ``from_saved``). A bucket's additive mask of
    the gate's term is made when its SDPA call runs, forward or backward, never kept."""

    own_bias: Tensor | None  # (nQb, B·Hkv) the gate's term of each row's own block, or None
    buckets: tuple[_Bucket, ...]
    # (Σ kept - N,) every row's other kept key blocks among B·Hkv·nKb, row after row (rows numbered
    # (query block, batch, KV head)), int16 below 32,768 blocks, int32 above: one small tensor, the
    # buckets' parts of it sliced when used
    others: Tensor
    others_bias: Tensor | None  # (Σ kept - N,) the gate's term of each of ``others``, or None
    block_size: int

    @property
    def widest(self) -> int:
        """The most key blocks one bucket gathers (the gather buffers' size)."""
        return max((b.n for b in self.buckets), default=0)

    def kept_blocks(self) -> Tensor:
        """(Σ kept - N,) int32 every row's other kept key blocks (``others``, widened once a call):
        bucket ``b``'s are ``[b.at: b.at + b.n]``."""
        return self.others.to(torch.int32)

    def mask(self, b: _Bucket, dtype: torch.dtype) -> Tensor | None:
        """(m, 1, 1, c·bs) the gate's term on every key of each kept slot's block of bucket ``b``, in
        ``dtype`` (an additive mask of its SDPA call), or None; made when used, not kept."""
        if self.others_bias is None:
            return None
        bias = self.others_bias[b.at: b.at + b.n].view(-1, b.c)
        return bias.to(dtype).repeat_interleave(self.block_size, -1)[:, None, None, :]

    def saved(self) -> tuple[Tensor | None, ...]:
        """Its tensors, for ``save_for_backward``: with the selection's ``valid`` they rebuild the
        plan (``from_saved``)."""
        return self.others, self.others_bias, self.own_bias

    @classmethod
    def from_saved(cls, tensors: tuple[Tensor | None, ...], valid: Tensor, rows: int, block_size: int) -> SplitPlan:
        """The plan whose ``saved()`` are ``tensors``, of a selection with ``valid`` (B|1, Hkv|1, nQb, S)
        over ``rows`` = B·Hkv rows per query block."""
        others, others_bias, own_bias = tensors
        return cls(own_bias, _buckets(kept_per_query_block(valid), rows), others, others_bias, block_size)


def _buckets(per_block: Tensor, rows: int) -> tuple[_Bucket, ...]:
    """The buckets of query blocks keeping ``per_block`` (nQb,) blocks each (``rows`` rows a query
    block), widest first; their other kept blocks lie one bucket after another, narrowest first."""
    kinds, sizes = (per_block - 1).unique_consecutive(return_counts=True)
    buckets, i0, at = [], 0, 0
    for c, n in zip(kinds.tolist(), sizes.tolist()):
        if c > 0:  # (query blocks keeping their own block only need no bucket)
            buckets.append(_Bucket(i0, i0 + n, at, n * rows * c, c))
            at += n * rows * c
        i0 += n
    return tuple(buckets[::-1])  # a query block keeps no fewer than the one before: the widest is the last


def kept_per_query_block(valid: Tensor) -> Tensor | None:
    """(nQb,) how many blocks the rows of each query block keep, from ``valid`` (B|1, Hkv|1, nQb, S);
    None when the rows of a query block differ, or a query block keeps fewer than the one before."""
    count = valid.sum(-1)  # (B|1, Hkv|1, nQb)
    per_block = count[0, 0]
    if not bool((count == per_block).all() and (per_block[1:] >= per_block[:-1]).all()):
        return None
    return per_block


def split_sdpa_plan(indices: Tensor, valid: Tensor, geo: BlockGeometry, block_bias: Tensor | None = None,
                    workspace: Workspace | None = None) -> SplitPlan | None:
    """The plan of a selection (B, Hkv, nQb, S), or None where this kernel cannot run it: not causal,
    a single query block, a row that does not keep its own block, or the rows of a query block
    keeping different numbers of blocks, or fewer than those of the query block before.
    ``workspace``: where its temporaries are written (fresh tensors without one); the plan itself
    is always fresh."""
    B, Hk, nQ, S = indices.shape
    if not geo.causal or nQ == 1:
        return None
    bs, nK, R = geo.block_size, geo.n_key_blocks, B * Hk
    device = indices.device

    def rows(t: Tensor, dtype: torch.dtype) -> Tensor:
        """(B, Hk, nQb, S) -> (N, S) in ``dtype``, rows numbered (query block, batch, KV head)."""
        return take_or_new(workspace, (nQ, B, Hk, S), dtype, device).copy_(t.permute(2, 0, 1, 3)).view(R * nQ, S)

    valid = valid.expand(B, Hk, nQ, S)
    per_block = kept_per_query_block(valid)  # (nQb,)
    if per_block is None:
        return None
    count = per_block.repeat_interleave(R)  # (N,) kept blocks of each row
    # sorted kept blocks, the unused slots (numbered nK) last: the own block is a causal row's largest
    unsorted = take_or_new(workspace, (B, Hk, nQ, S), indices.dtype, device)
    unsorted.copy_(indices).masked_fill_(~valid, nK)
    slot = take_or_new(workspace, (B, Hk, nQ, S), torch.long, device)
    blocks, slot = torch.sort(unsorted, -1, out=(unsorted, slot))
    blocks = rows(blocks, torch.int32)  # (N, S); block numbers below 2^31 (they index a tensor of blocks)
    last = blocks.gather(1, (count - 1).clamp(min=0)[:, None])[:, 0]  # (N,)
    diagonal = (torch.arange(nQ, device=device) + geo.first_block).repeat_interleave(R)
    if not bool(((count > 0) & (last == diagonal)).all()):
        return None
    # block numbers among B·Hkv·nKb: plus the first block of the row's head
    blocks.add_((torch.arange(R, device=device, dtype=torch.int32) * nK).repeat(nQ)[:, None])
    bias = own_bias = None
    if block_bias is not None:
        # (N, S) in sorted order
        bias = rows(block_bias.detach().expand(B, Hk, nQ, S), block_bias.dtype).gather(1, rows(slot, torch.long))
        own_bias = bias.gather(1, (count - 1)[:, None])[:, 0].view(nQ, R)
    buckets = _buckets(per_block, R)
    # every row's other blocks, row after row, in one tensor: each bucket's are a slice of it (one
    # allocation kept for the backward rather than one per bucket); a bucket's rows keep c blocks
    # besides their own, the first c of their sorted row
    small = block_number_dtype(R * nK)
    total = sum(b.n for b in buckets)
    others = torch.empty(total, dtype=small, device=device)  # (Σ kept - N,)
    others_bias = None if bias is None else torch.empty(total, dtype=bias.dtype, device=device)
    for b in buckets:
        rows_of_bucket = slice(b.i0 * R, b.i1 * R)
        others[b.at: b.at + b.n].view(-1, b.c).copy_(blocks[rows_of_bucket, :b.c])
        if bias is not None:  # the gate's term of each of them, in the same order
            others_bias[b.at: b.at + b.n].view(-1, b.c).copy_(bias[rows_of_bucket, :b.c])
    return SplitPlan(own_bias, buckets, others, others_bias, bs)


def split_sdpa_attention(
    q: Tensor, k: Tensor, v: Tensor, indices: Tensor, valid: Tensor, geo: BlockGeometry, *,
    scale: float, block_bias: Tensor | None = None, workspace: Workspace | None = None,
) -> Tensor:
    """(B, H, Q, Dv) attention of q over the kept key blocks (see the module's docstring).

    q: (B, H, Q, D); k: (B, Hkv, K, D); v: (B, Hkv, K, Dv), H a multiple of Hkv.
    indices: (B, Hkv, nQb, S) long kept key blocks; valid: bool broadcastable to it (valid first).
    block_bias: (B, Hkv, nQb, S) added to every score of the slot's block, without gradient.
    workspace: where the plan's temporaries are written (``split_sdpa_plan``).
    Raises ValueError for a selection it cannot run (``split_sdpa_plan`` returns None).
    """
    Q = q.shape[2]
    nQ, bs, front = geo.n_query_blocks, geo.block_size, geo.front
    plan = split_sdpa_plan(indices, valid, geo, block_bias, workspace)
    if workspace is not None:
        workspace.release()  # the plan's temporaries are done: the attention runs without them
    if plan is None:
        raise ValueError("not causal, a single query block, a row without its own block, or rows of a query "
                         "block keeping different numbers of blocks")
    if front or nQ * bs != Q:  # queries aligned to whole blocks
        q = F.pad(q, (0, 0, front, nQ * bs - front - Q))
    out = _SplitAttention.apply(q, k, v, plan, valid, scale, geo)  # (B, H, nQb·bs, Dv)
    return out[:, :, front: front + Q]


def _blocks(t: Tensor, geo: BlockGeometry) -> Tensor:
    """(B·Hkv, nKb, bs, D) every key (value) block of t (B, Hkv, K, D): a view (also of the written
    first K slots of a longer buffer), a copy only to pad a partial last block (or of keys not laid
    out (B, Hkv, K, D))."""
    if geo.padded_keys != t.shape[2]:
        t = F.pad(t, (0, 0, 0, geo.padded_keys - t.shape[2]))
    return t.reshape(-1, geo.n_key_blocks, geo.block_size, t.shape[-1])


def _flat_blocks(blocks: Tensor) -> tuple[Tensor, int]:
    """(N, bs, D) a view in which key block j of row r of ``blocks`` (B·Hkv, nKb, bs, D) is block
    r·P + j, and that P: nKb for keys laid out whole, more for the written keys of a longer buffer
    (a preallocated cache's first slots) whose rows lie whole blocks apart; a copy (P = nKb) where
    neither holds."""
    R, nK, bs, D = blocks.shape
    try:
        return blocks.view(-1, bs, D), nK
    except RuntimeError:
        pass
    row, size = blocks.stride(0), bs * D
    if blocks.stride()[1:] == (size, D, 1) and row % size == 0:
        P = row // size
        end = blocks.storage_offset() + R * P * size
        if end * blocks.element_size() <= blocks.untyped_storage().nbytes():
            return blocks.as_strided((R * P, bs, D), (size, D, 1)), P
    return blocks.reshape(-1, bs, D), nK


def _in_flat(blocks: Tensor, n_key_blocks: int, P: int) -> Tensor:
    """Block numbers r·nKb + j as r·P + j (``_flat_blocks``)."""
    return blocks if P == n_key_blocks else blocks + blocks.div(n_key_blocks, rounding_mode="floor") * (P - n_key_blocks)


def _diagonal(blocks: Tensor, geo: BlockGeometry) -> Tensor:
    """(nQb, B·Hkv, bs, D) each query block's own key block, a strided view of ``blocks``."""
    return blocks[:, geo.first_block: geo.first_block + geo.n_query_blocks].transpose(0, 1)


def _by_block(t: Tensor, bs: int) -> Tensor:
    """(B, H, nQb·bs, D) -> (nQb, B·H, bs, D): the query blocks as the batch, a view when the
    tensor lies as (B, tokens, H, D) or (B, H, tokens, D) with B = 1 (a copy otherwise)."""
    B, H, L, D = t.shape
    return t.reshape(B * H, L // bs, bs, D).transpose(0, 1)


def _bucket_inputs(b: _Bucket, qv: Tensor, kept: Tensor, keys: tuple, values: tuple, n_key_blocks: int,
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A bucket's queries (m, 1, G·bs, D), the G heads of a KV group as G·bs rows of one head (qv:
    (B, Hkv, G, nQb, bs, D)); its kept key blocks' keys and values gathered into the buffers,
    (m, 1, S·bs, D|Dv); and the kept block numbers (in the flat (B·Hkv·nKb) numbering). keys /
    values: (flat blocks, their strides, the buffer) of ``_flat_blocks`` and the call's buffer."""
    (kflat, kP, kbuf), (vflat, vP, vbuf) = keys, values
    G, bs, D = qv.shape[2], qv.shape[4], qv.shape[5]
    blocks = kept[b.at: b.at + b.n]
    qb = qv[:, :, :, b.i0: b.i1].permute(3, 0, 1, 2, 4, 5).reshape(-1, 1, G * bs, D)
    m = qb.shape[0]
    kg = torch.index_select(kflat, 0, _in_flat(blocks, n_key_blocks, kP), out=kbuf[:b.n]).view(m, 1, -1, D)
    vg = torch.index_select(vflat, 0, _in_flat(blocks, n_key_blocks, vP), out=vbuf[:b.n]).view(m, 1, -1, vbuf.shape[-1])
    return qb, kg, vg, blocks


class _SplitAttention(torch.autograd.Function):
    """Own blocks (causal, in place) + gathered other blocks (no mask), merged by log-sum-exp; the
    backward runs SDPA's fused backward on each part with the merged output and log-sum-exp.
    One buffer each for keys and values holds every bucket's gathered blocks in turn (fresh large
    allocations cost page faults on every call)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, plan: SplitPlan, valid: Tensor, scale: float,
                geo: BlockGeometry) -> Tensor:
        B, H, L, D = q.shape
        Hk, Dv = k.shape[1], v.shape[-1]
        G, bs, nQ, nK = H // Hk, geo.block_size, geo.n_query_blocks, geo.n_key_blocks
        kb, vb = _blocks(k, geo), _blocks(v, geo)  # (B·Hkv, nKb, bs, D|Dv)
        # every query block against its own key block: o (nQb, B·H, bs, Dv) laid out (nQb, bs, B·H, Dv)
        # lse (nQb, B·H, bs) laid out (nQb, bs, B·H), SDPA's own layout: kept so (no copy), read by views
        o, lse = _forward(_by_block(q, bs), _diagonal(kb, geo), _diagonal(vb, geo), 0.0, True, scale=scale)
        o5, lse5 = o.view(nQ, B * Hk, G, bs, Dv), lse.unflatten(1, (B * Hk, G))
        if plan.own_bias is not None:  # a constant on every score of the part shifts its log-sum-exp
            lse5.add_(plan.own_bias.to(lse.dtype)[:, :, None, None])
        (kflat, kP), (vflat, vP) = _flat_blocks(kb), _flat_blocks(vb)
        kbuf, vbuf = kb.new_empty(plan.widest, bs, D), vb.new_empty(plan.widest, bs, Dv)
        qv = q.view(B, Hk, G, nQ, bs, D)
        kept = plan.kept_blocks()
        for b in plan.buckets:
            qb, kg, vg, _ = _bucket_inputs(b, qv, kept, (kflat, kP, kbuf), (vflat, vP, vbuf), nK)
            o2, l2 = _forward(qb, kg, vg, 0.0, False, attn_mask=plan.mask(b, q.dtype), scale=scale)
            # merge into the own part's rows: with l = logaddexp(l1, l2) the gathered part's share of
            # the softmax is w = e^(l2-l) = sigmoid(l2 - l1), and o = o1 + w·(o2 - o1): four ops a
            # bucket (a lerp, not two scalings and a sum)
            o1, l1 = o5[b.i0: b.i1], lse5[b.i0: b.i1]
            l2 = l2.view(l1.shape)
            w = torch.sub(l2, l1).sigmoid_()[..., None]
            torch.logaddexp(l1, l2, out=l1)
            o2 = o2.view(o1.shape)
            if o1.dtype == w.dtype:
                o1.lerp_(o2, w)
            else:  # half precision: merged in float32 (the log-sum-exp's dtype), then rounded once
                o1.copy_(torch.lerp(o1.to(w.dtype), o2.to(w.dtype), w))
        # The output lies as (B, tokens, H, Dv), as SDPA's own does (already so when B = 1): the
        # model's transpose + reshape for its output projection is then a view of it.
        out = o.view(nQ, B, H, bs, Dv).permute(1, 0, 3, 2, 4).contiguous().view(B, L, H, Dv).transpose(1, 2)
        # the plan is not kept: its tensors (the kept blocks in int16, a few KiB a call) and the
        # selection's valid slots (a geometry's shared table) rebuild it in the backward
        ctx.save_for_backward(q, k, v, out, lse, *plan.saved())
        ctx.valid, ctx.scale, ctx.geo = valid, scale, geo
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        q, k, v, out, lse, *tensors = ctx.saved_tensors
        scale, geo = ctx.scale, ctx.geo
        B, H, L, D = q.shape
        Hk, K, Dv = k.shape[1], k.shape[2], v.shape[-1]
        plan = SplitPlan.from_saved(tuple(tensors), ctx.valid, B * Hk, geo.block_size)
        G, bs, nQ, nK = H // Hk, geo.block_size, geo.n_query_blocks, geo.n_key_blocks
        kb, vb = _blocks(k, geo), _blocks(v, geo)
        g_own, o_own = _by_block(grad_out, bs), _by_block(out, bs)  # (nQb, B·H, bs, Dv)
        lse_own = lse
        if plan.own_bias is not None:
            lse_own = (lse.unflatten(1, (B * Hk, G)) - plan.own_bias.to(lse.dtype)[:, :, None, None]).flatten(1, 2)
        dq, dk_own, dv_own = _backward(g_own, _by_block(q, bs), _diagonal(kb, geo), _diagonal(vb, geo), o_own,
                                       lse_own, 0.0, True, scale=scale)  # (nQb, B·H|B·Hkv, bs, D|Dv)
        del lse_own
        # a key block's gradient adds up over every row keeping it: in float32 at least
        acc_dtype = torch.promote_types(k.dtype, torch.float32)
        dk = kb.new_zeros(kb.shape, dtype=acc_dtype)
        dv = vb.new_zeros(vb.shape, dtype=acc_dtype)
        _diagonal(dk, geo).add_(dk_own)
        _diagonal(dv, geo).add_(dv_own)
        del dk_own, dv_own
        dq5 = dq.view(nQ, B * Hk, G, bs, D)
        lse5 = lse.unflatten(1, (B * Hk, G))
        (kflat, kP), (vflat, vP) = _flat_blocks(kb), _flat_blocks(vb)
        kbuf, vbuf = kb.new_empty(plan.widest, bs, D), vb.new_empty(plan.widest, bs, Dv)
        qv = q.view(B, Hk, G, nQ, bs, D)
        g5, o5 = g_own.view(nQ, B * Hk, G, bs, Dv), o_own.view(nQ, B * Hk, G, bs, Dv)
        kept = plan.kept_blocks()
        for b in plan.buckets:
            # the keys' gradient comes back summed over the group's G heads (rows of one head here)
            n, r = b.n, slice(b.i0, b.i1)
            qb, kg, vg, blocks = _bucket_inputs(b, qv, kept, (kflat, kP, kbuf), (vflat, vP, vbuf), nK)
            m = qb.shape[0]
            gq, gk, gv = _backward(
                g5[r].reshape(m, 1, G * bs, Dv), qb, kg, vg, o5[r].reshape(m, 1, G * bs, Dv),
                lse5[r].reshape(m, 1, G * bs), 0.0, False, attn_mask=plan.mask(b, q.dtype), scale=scale)
            dq5[r] += gq.view(dq5[r].shape)
            dk.view(-1, bs, D).index_add_(0, blocks, gk.view(n, bs, D).to(acc_dtype))
            dv.view(-1, bs, Dv).index_add_(0, blocks, gv.view(n, bs, Dv).to(acc_dtype))
        dq = dq.view(nQ, B, H, bs, D).permute(1, 2, 0, 3, 4).reshape(B, H, L, D)
        dk = dk.view(B, Hk, -1, D)[:, :, :K].to(k.dtype)
        dv = dv.view(B, Hk, -1, Dv)[:, :, :K].to(v.dtype)
        return dq, dk, dv, None, None, None, None
