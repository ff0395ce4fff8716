"""One decoding step's attention over its kept pages: read only those keys and values.

A decoding step has one query per head at the end of a KV cache of K keys. Dense attention reads
all K keys and values; at density d the step keeps about d · K/bs pages (key blocks of ``bs``)
and this kernel reads only them:

    rows = kept pages' token positions, per (batch, KV head)       (B, Hkv, n)   n = kept · bs
    k_kept, v_kept = k.flat.index_select(rows), v.flat...           (B, Hkv, n, D)  the only O(n) copy
    out = SDPA(q_group, k_kept, v_kept, mask)                       the G query heads of a KV group
                                                                    as G query rows of one call

The cache is never copied whole (no concatenation, padding or grouped-query expansion of it). The
query heads of a KV group share its pages (the selection is per KV group). The last page may be
partial: its missing tokens are cut off when every row keeps it last (a decoding step always keeps
its own page), masked otherwise. The model's own mask (a padding mask, one row for every head) and
the learned gate's per-page term go into the additive mask. The whole thing is ordinary autograd
(index_select and SDPA; softmax and matmul where the gate's term needs its gradient), so it also
runs with a gradient and on any device.

Two ways to fetch the kept keys are here (``GATHERS``): ``tokens`` (one ``index_select`` of rows of
the flattened cache, the default) and ``pages`` (advanced indexing of whole pages of the cache
viewed as (B, Hkv, pages, bs, D), then the last page appended); ``bench/bench_decode.py`` times both.

    out = paged_decode_attention(q, k, v, sel.indices, sel.valid, sel.geometry, scale=D ** -0.5)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from attnkit.seam.kernels.blocks import BlockGeometry


def _token_rows(pages: Tensor, bs: int, K: int) -> Tensor:
    """(B, Hkv, S·bs) positions among the K keys of each kept page's tokens (past K clamped to K - 1)."""
    tokens = pages[..., None] * bs + torch.arange(bs, device=pages.device)  # (B, Hkv, S, bs)
    return tokens.flatten(-2).clamp_(max=K - 1)


def gather_tokens(t: Tensor, pages: Tensor, bs: int) -> Tensor:
    """(B, Hkv, S·bs, D) the kept pages' rows of t (B, Hkv, K, D): one index_select on the flat cache."""
    B, Hk, K, D = t.shape
    rows = _token_rows(pages, bs, K) + (torch.arange(B * Hk, device=t.device) * K).view(B, Hk, 1)
    return t.reshape(B * Hk * K, D).index_select(0, rows.flatten()).view(B, Hk, -1, D)


def gather_pages(t: Tensor, pages: Tensor, bs: int) -> Tensor:
    """The same as ``gather_tokens``, page by page: whole pages by advanced indexing of t viewed as
    (B, Hkv, full pages, bs, D), the last (possibly partial) page's rows padded with its last key."""
    B, Hk, K, D = t.shape
    full = K // bs
    if full * bs != K:  # a partial last page: whole pages from a padded copy of it only
        last = t[:, :, full * bs:]
        last = torch.cat([last, last[:, :, -1:].expand(B, Hk, bs - last.shape[2], D)], 2)
    paged = t[:, :, : full * bs].view(B, Hk, full, bs, D)
    b = torch.arange(B, device=t.device).view(B, 1, 1)
    h = torch.arange(Hk, device=t.device).view(1, Hk, 1)
    if full * bs == K:
        return paged[b, h, pages].view(B, Hk, -1, D)
    is_last = pages == full
    out = paged[b, h, pages.clamp(max=max(full - 1, 0))] if full else last.new_empty(B, Hk, pages.shape[-1], bs, D)
    return torch.where(is_last[..., None, None], last[:, :, None], out).view(B, Hk, -1, D)


GATHERS: dict[str, Callable[[Tensor, Tensor, int], Tensor]] = {"tokens": gather_tokens, "pages": gather_pages}


def paged_decode_attention(
    q: Tensor, k: Tensor, v: Tensor, indices: Tensor, valid: Tensor, geo: BlockGeometry, *,
    scale: float, block_bias: Tensor | None = None, allowed: Tensor | None = None, gather: str = "tokens",
) -> Tensor:
    """(B, H, 1, Dv) attention of one query per head over the kept key blocks (pages).

    q: (B, H, 1, D); k: (B, Hkv, K, D); v: (B, Hkv, K, Dv), H a multiple of Hkv.
    indices: (B, Hkv, 1, S) long kept pages; valid: bool broadcastable to it.
    block_bias: (B, Hkv, 1, S) added to every score of the slot's page (with its gradient), or None.
    allowed: the call's own mask, True = may attend, (B|1, 1, 1, K') with K' >= K, or None.
    gather: a name in ``GATHERS``.
    """
    B, H, Q, D = q.shape
    Hk, K = k.shape[1], k.shape[2]
    G, Dv, bs = H // Hk, v.shape[-1], geo.block_size
    if Q != 1:
        raise ValueError(f"paged_decode_attention takes one query per head, got {Q}")
    S = indices.shape[-1]
    pages, order = indices.reshape(B, Hk, S).sort(-1)  # the last page (the partial one) last
    valid = valid.expand(B, Hk, 1, S).reshape(B, Hk, S).gather(-1, order)
    n = S * bs
    keep = n
    masked = None  # (B, Hkv, n) bool, True where a gathered key must not be seen
    if K % bs:
        if bool((pages[..., -1] == geo.n_key_blocks - 1).all()) and bool(valid[..., -1].all()):
            keep = n - (geo.padded_keys - K)  # every row's partial page is last: cut its padding off
        else:
            masked = (pages[..., None] * bs + torch.arange(bs, device=q.device) >= K).flatten(-2)
    if not bool(valid.all()):
        unused = (~valid)[..., None].expand(B, Hk, S, bs).flatten(-2)
        masked = unused if masked is None else masked | unused
    if allowed is not None:
        seen = allowed[..., :K].expand(B, 1, 1, K).reshape(B, 1, K).expand(B, Hk, K)
        hidden = ~seen.gather(-1, _token_rows(pages, bs, K))
        masked = hidden if masked is None else masked | hidden
    kg = GATHERS[gather](k, pages, bs)[:, :, :keep]  # (B, Hkv, n', D)
    vg = GATHERS[gather](v, pages, bs)[:, :, :keep]
    qg = q.reshape(B, Hk, G, D)  # the G query heads of a KV group as G rows
    mask = None  # (B, Hkv, 1, n') additive, shared by the group's rows
    if block_bias is not None:
        term = block_bias.reshape(B, Hk, S).gather(-1, order).to(q.dtype)
        mask = term.repeat_interleave(bs, -1)[:, :, None, :keep]
    if masked is not None:
        hidden = torch.zeros(masked.shape, dtype=q.dtype, device=q.device).masked_fill(masked, -math.inf)[:, :, None, :keep]
        mask = hidden if mask is None else mask + hidden
    if mask is not None and mask.requires_grad and torch.is_grad_enabled():
        out = _softmax_attention(qg, kg, vg, mask, scale)  # the gate's gradient through its term
    else:
        out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, scale=scale)  # (B, Hkv, G, Dv)
    if masked is not None:  # a row that sees no key is zero, not NaN
        out = out.nan_to_num(0.0)
    return out.reshape(B, H, 1, Dv)


def _softmax_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale + mask
    return torch.matmul(torch.softmax(scores.float(), -1).to(v.dtype), v)


def paged_decode_supported(q: Tensor, geo: BlockGeometry, allowed: Tensor | None) -> bool:
    """Whether the call is one this kernel computes: one query per head, and the model's mask (if
    any) one row shared by every head."""
    if q.shape[2] != 1 or geo.n_query_blocks != 1:
        return False
    return allowed is None or (allowed.dim() == 4 and allowed.shape[1] == 1 and allowed.shape[2] == 1)


__all__ = ["GATHERS", "gather_pages", "gather_tokens", "paged_decode_attention", "paged_decode_supported"]
