"""Block-sparse attention whose cost scales with density: SDPA's fused CPU kernel on the gathered blocks.

Every (batch, KV head, query block) keeps some key blocks. Rows keeping the same number ``c`` of
blocks form a bucket; a bucket is one batched call of PyTorch's fused (flash) CPU attention, its
batch the bucket's rows, its keys the ``c`` kept blocks gathered side by side:

    queries (m, G, rows, D)  ×  gathered keys (m, 1→G, c·bs, D)   one SDPA call per bucket

so the work is the kept blocks' and nothing else: no padding to the longest row, no T×T anywhere.
The G query heads of a KV group share one gather (the keys are expanded, not copied). The kept
blocks of a row are sorted, which puts a causal row's own (diagonal) block last: the only mask is
the causal triangle of that block (and, for a bidirectional call, the padding of a partial last
key block), one small additive mask the whole bucket shares.

The backward is written out (``_GatheredAttention``): the forward keeps only q, k, v, the output
and SDPA's log-sum-exp per row, and the backward gathers the kept blocks again and calls SDPA's
fused CPU backward per bucket, so training memory is O(T · D) per head like dense SDPA's, not
O(T · kept keys) (autograd through the gather would keep every bucket's gathered K/V). There a
KV group's G heads are one head of G·rows query rows, so the keys' gradient comes back summed over
the group.

What it computes is what ``block_attention.block_sparse_attention`` computes for the calls it
takes (``gather_sdpa_supports``): no model mask, bias, soft-cap, learned sinks, dropout or other
modifiers, a gate term only without gradient, and (when causal) every row keeping its own block.
The others run on the portable kernel.

    out = gather_sdpa_attention(q, k, v, sel.indices, sel.valid, geo, scale=D ** -0.5)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from attnkit.seam.kernels.blocks import BlockGeometry


def sdpa_fused_cpu_available() -> bool:
    """Whether this PyTorch has SDPA's fused CPU forward and backward with the log-sum-exp."""
    ops = torch.ops.aten
    return hasattr(ops, "_scaled_dot_product_flash_attention_for_cpu") and hasattr(
        ops, "_scaled_dot_product_flash_attention_for_cpu_backward")


@dataclass
class _Bucket:
    """Rows keeping ``c`` blocks, run as one SDPA call."""

    rows: Tensor  # (m,) long: rows among B·Hkv·nQb
    where: tuple[Tensor, Tensor, Tensor]  # the same rows as (batch, KV head, query block), each (m,)
    blocks: Tensor  # (m·c,) long: their kept key blocks among B·Hkv·nKb, sorted per row
    mask: Tensor | None  # (rows, c·bs) or (m, 1, rows|1, c·bs) additive, or None
    group_mask: Tensor | None  # the mask for the G heads' rows stacked, (G·rows|1, c·bs); None: from ``mask``


def gather_sdpa_attention(
    q: Tensor, k: Tensor, v: Tensor, indices: Tensor, valid: Tensor, geo: BlockGeometry, *,
    scale: float, block_bias: Tensor | None = None,
) -> Tensor:
    """(B, H, Q, Dv) attention of q over the kept key blocks (see the module's docstring).

    q: (B, H, Q, D); k: (B, Hkv, K, D); v: (B, Hkv, K, Dv), H a multiple of Hkv.
    indices: (B, Hkv, nQb, S) long kept key blocks; valid: bool broadcastable to it (valid first).
    block_bias: (B, Hkv, nQb, S) added to every score of the slot's block, without gradient.
    Raises ValueError for a selection it cannot run (``gather_sdpa_plan`` returns None).
    """
    B, H, Q, D = q.shape
    Hk, K = k.shape[1], k.shape[2]
    G, Dv = H // Hk, v.shape[-1]
    bs, nQ, nK = geo.block_size, geo.n_query_blocks, geo.n_key_blocks
    buckets = gather_sdpa_plan(indices, valid, geo, q.dtype, block_bias, groups=G)
    if buckets is None:
        raise ValueError("a causal row does not keep its own block, or a row keeps none")
    # Rows per query block: the block size, or all of the queries when they fit one block (a
    # decoding step's single query is not padded to a whole block).
    rows, front = (Q, 0) if nQ == 1 else (bs, geo.front)
    # one SDPA batch row per (batch, KV head, query block): (B·Hkv·nQb, G, rows, D)
    qb = F.pad(q, (0, 0, front, nQ * rows - front - Q)).view(B, Hk, G, nQ, rows, D)
    qb = qb.transpose(2, 3).reshape(B * Hk * nQ, G, rows, D)
    # every key block, keys and values side by side so that one gather fetches both: (B·Hkv·nKb, bs, D + Dv)
    kvb = F.pad(torch.cat([k, v], -1), (0, 0, 0, geo.padded_keys - K)).reshape(B * Hk * nK, bs, D + Dv)
    out = _GatheredAttention.apply(qb, kvb, D, buckets, scale, (B, Hk, nQ))  # (B, Hkv, nQb, G, rows, Dv)
    # a view: the output lies as (B, tokens, H, Dv), see _GatheredAttention.forward
    out = out.permute(0, 1, 3, 2, 4, 5).reshape(B, H, nQ * rows, Dv)
    return out[:, :, front: front + Q]


def gather_sdpa_plan(indices: Tensor, valid: Tensor, geo: BlockGeometry, dtype: torch.dtype,
                     block_bias: Tensor | None = None, groups: int = 1) -> list[_Bucket] | None:
    """The buckets of a selection, or None where this kernel cannot run it (a causal row without
    its own block, or a row keeping nothing). groups: query heads per KV head."""
    B, Hk, nQ, S = indices.shape
    bs, nK, K = geo.block_size, geo.n_key_blocks, geo.key_length
    valid = valid.expand(B, Hk, nQ, S)
    count = valid.sum(-1).flatten()  # (N,) kept blocks of each row, N = B·Hkv·nQb
    if not bool((count > 0).all()):
        return None
    # sorted kept blocks, the unused slots (numbered nK) last
    blocks, order = indices.masked_fill(~valid, nK).sort(-1)
    blocks, order = blocks.reshape(-1, S), order.reshape(-1, S)
    last = blocks.gather(1, (count - 1)[:, None])[:, 0]  # (N,) each row's last kept block
    if geo.causal:
        diagonal = geo.query_block_ids.to(indices.device).repeat(B * Hk)
        if not bool((last == diagonal).all()):
            return None
        key = count * 2
    else:  # a bidirectional row keeping a partial last key block masks its padding
        key = count * 2 + ((last == nK - 1) & (K % bs != 0)).long()
    bias = None
    if block_bias is not None:
        bias = block_bias.detach().expand(B, Hk, nQ, S).reshape(-1, S).gather(1, order)
    blocks = blocks + torch.arange(B * Hk, device=indices.device).repeat_interleave(nQ)[:, None] * nK  # among B·Hkv·nKb
    # One mask as wide as the widest bucket; a bucket's is a view of its last c·bs columns.
    # Causal: only the diagonal block (the last) is masked, key j seen by row r iff j <= r + shift
    # (a lone query block's rows start at the cache's offset). Bidirectional: a partial last key
    # block's padding.
    rows = geo.query_length if nQ == 1 else bs
    shift = geo.front if nQ == 1 else 0
    width = int(count.max()) * bs
    if geo.causal:
        tri = torch.ones(rows, bs, dtype=torch.bool, device=indices.device).tril(shift)
        full = torch.zeros(rows, width, dtype=dtype, device=indices.device)
        full[:, -bs:].masked_fill_(~tri, -math.inf)
    else:
        full = torch.zeros(1, width, dtype=dtype, device=indices.device)
        full[:, width - (-K % bs):] = -math.inf
    full_group = _over_group(full, groups)
    order_rows = key.argsort(stable=True)
    kinds, sizes = key[order_rows].unique_consecutive(return_counts=True)
    buckets = []
    for kind, rows_of in zip(kinds.tolist(), order_rows.split(sizes.tolist())):
        c, partial = kind // 2, kind % 2
        masked = geo.causal or partial
        mask = full[:, width - c * bs:] if masked else None
        group_mask = full_group[:, width - c * bs:] if masked else None
        if bias is not None:  # the gate's term of each kept block, on all of its keys: (m, 1, 1, c·bs)
            term = bias[rows_of, :c].to(dtype).repeat_interleave(bs, -1)[:, None, None, :]
            mask = term if mask is None else mask + term
            group_mask = None  # stacked in the backward, when there is one
        where = (rows_of // (Hk * nQ), rows_of // nQ % Hk, rows_of % nQ)
        buckets.append(_Bucket(rows_of, where, blocks[rows_of, :c].flatten(), mask, group_mask))
    return buckets


class _GatheredAttention(torch.autograd.Function):
    """Per bucket: gather the kept K/V blocks, SDPA's fused CPU kernel forward; the backward gathers
    again and runs SDPA's fused CPU backward, scattering the K/V gradients back into the blocks."""

    @staticmethod
    def forward(ctx, qb: Tensor, kvb: Tensor, D: int, buckets: list[_Bucket], scale: float,
                layout: tuple[int, int, int]) -> Tensor:
        _, G, rows, _ = qb.shape
        B, Hk, nQ = layout
        # The output lies as (B, tokens, H, Dv), as SDPA's own does: the model's transpose + reshape
        # for its output projection is then a view of it, not a second copy kept for backward.
        out = qb.new_empty(B, nQ, rows, Hk, G, kvb.shape[-1] - D).permute(0, 3, 1, 4, 2, 5)  # (B, Hkv, nQb, G, rows, Dv)
        lses = []
        for b in buckets:
            qg, kg, vg = _gather(qb, kvb, D, b, G)
            o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                qg, kg, vg, 0.0, False, attn_mask=b.mask, scale=scale)
            out[b.where] = o
            lses.append(lse)
        ctx.save_for_backward(qb, kvb, out, *lses)
        ctx.D, ctx.buckets, ctx.scale = D, buckets, scale
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        qb, kvb, out, *lses = ctx.saved_tensors
        _, G, rows, Dq = qb.shape
        D = ctx.D
        # every row is in one bucket: each of dq's rows is written once. A key block's gradient adds
        # up over every row keeping it: in float32 at least (half-precision models too).
        dq, dkv = torch.empty_like(qb), torch.zeros_like(kvb, dtype=torch.promote_types(kvb.dtype, torch.float32))
        for b, lse in zip(ctx.buckets, lses):
            # The G heads of a group as G·rows query rows of one head: the backward then returns the
            # keys' gradient summed over the group, instead of G copies to add up.
            m = b.rows.shape[0]
            kv = kvb.index_select(0, b.blocks).view(m, 1, -1, kvb.shape[-1])
            gq, gk, gv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                grad_out[b.where].reshape(m, 1, G * rows, -1), qb[b.rows].view(m, 1, G * rows, Dq), kv[..., :D],
                kv[..., D:], out[b.where].reshape(m, 1, G * rows, -1), lse.reshape(m, 1, G * rows), 0.0, False,
                attn_mask=b.group_mask if b.group_mask is not None else _over_group(b.mask, G),
                scale=ctx.scale)
            dq[b.rows] = gq.view(m, G, rows, Dq)
            gkv = torch.cat([gk, gv], -1)  # (m, 1, c·bs, D + Dv)
            dkv.index_add_(0, b.blocks, gkv.view(-1, *kvb.shape[1:]).to(dkv.dtype))
        return dq, dkv.to(kvb.dtype), None, None, None, None


def _over_group(mask: Tensor | None, G: int) -> Tensor | None:
    """A bucket's mask over rows (rows|1, S) or (m, 1, rows|1, S), for the G heads' rows stacked."""
    if mask is None or mask.shape[-2] == 1 or G == 1:
        return mask
    return mask.repeat(G, 1) if mask.dim() == 2 else mask.repeat(1, 1, G, 1)


def _gather(qb: Tensor, kvb: Tensor, D: int, b: _Bucket, G: int) -> tuple[Tensor, Tensor, Tensor]:
    """(m, G, rows, D) queries and (m, G, c·bs, D|Dv) keys/values (expanded over the group) of a bucket."""
    m = b.rows.shape[0]
    kv = kvb.index_select(0, b.blocks).view(m, 1, -1, kvb.shape[-1]).expand(-1, G, -1, -1)
    return qb[b.rows], kv[..., :D], kv[..., D:]
