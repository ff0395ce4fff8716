"""One decoding step: which pages of the KV cache it keeps, and attention that reads only those.

A decoding step has one query per head at the end of a KV cache of K keys. Dense attention reads
all K keys and values; at density d the step keeps about d · K/bs pages (key blocks of ``bs``
keys) and this kernel reads only them:

    k_kept, v_kept = the kept pages' keys and values, copied      (B, Hkv, S·bs, D)  the only copy
    out = SDPA(q_group, k_kept, v_kept, mask)                      the G query heads of a KV group
                                                                   as G query rows of one call

The cache is never copied whole (no concatenation, padding or grouped-query expansion of it); the
query heads of a KV group share its pages (the selection is per KV group). The additive mask hides
what a gathered page holds that is not its own (the last page may be partial), the slots a row
does not use, the keys the model's own mask hides (a padding mask, one row for every head), and
adds the learned gate's per-page term. It is ordinary autograd (index_select and SDPA; softmax and
matmul where the gate's term needs its gradient), so it also runs with a gradient, on any device.

Two ways to copy the kept pages (``GATHERS``; ``bench/bench_decode.py`` times both):

- ``pages`` (the default): the cache seen as overlapping windows of ``bs`` keys, one window per
  key position, and one ``index_select`` of whole windows, ``bs · D`` contiguous values each. A
  partial last page is read as the window of the last ``bs`` keys, its first keys (the previous
  page's) masked. Needs at least one page of keys stored as rows, heads evenly spaced (a contiguous
  cache, or the written part of a preallocated one); else it copies ``tokens``.
- ``tokens``: one ``index_select`` of the kept pages' key positions, a row of ``D`` values each.

``select_step_pages`` is ``blocks.select_blocks`` for such a step's one query row, in a few ops.

    sel = select_step_pages(scores, geo, density=0.25, sink_blocks=1, local_blocks=1, sinks=False)
    out = paged_decode_attention(q, k, v, sel.indices, sel.valid, sel.geometry, scale=D ** -0.5)
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from attnkit.seam.kernels.blocks import BlockGeometry, BlockSelection


def is_decoding_step(geo: BlockGeometry) -> bool:
    """One query at the end of a causal call's keys: its block is the last key block, every key
    block is a candidate."""
    return geo.causal and geo.query_length == 1


def select_step_pages(scores: Tensor, geo: BlockGeometry, density: float, sink_blocks: int, local_blocks: int,
                      sinks: bool) -> BlockSelection:
    """``select_blocks`` for a decoding step (``is_decoding_step``), in a handful of tensor ops: the
    forced pages (the last ``local_blocks``, the first ``sink_blocks`` when ``sinks``) and then the
    best-scored up to ⌈density · pages⌉ (at least sinks + local, as for every pattern), ties to the
    more recent page, in ``select_blocks``' order (forced first, latest first; then by score).
    scores: (B, Hkv, 1, nKb). The same selection as ``select_blocks`` (tested)."""
    n = geo.n_key_blocks
    k, local, first = step_budget(n, density, sink_blocks, local_blocks, sinks)
    B, Hk = scores.shape[:2]
    forced = _forced_pages(n, local, first, scores.device).expand(B, Hk, 1, -1)
    rest = k - forced.shape[-1]
    if rest:
        # the free pages, latest first so that a stable descending sort puts the later of two equal ones first
        free = torch.nan_to_num(scores.detach().float()[..., first: n - local], nan=-1e30).flip(-1)
        chosen = (n - local - 1) - free.sort(dim=-1, descending=True, stable=True).indices[..., :rest]
        forced = torch.cat([forced, chosen], -1)
    return BlockSelection(indices=forced, valid=all_valid(k, scores.device), geometry=geo, every_slot=True)


@functools.lru_cache(maxsize=256)
def step_budget(n: int, density: float, sink_blocks: int, local_blocks: int, sinks: bool) -> tuple[int, int, int]:
    """(kept, local, first) of a decoding step over n pages: how many pages it keeps (⌈density · n⌉,
    at least the sinks + local pages, as for every pattern), how many of the last are forced
    (local) and how many of the first (forced sinks that are not local pages)."""
    local = min(local_blocks, n)
    first = min(sink_blocks if sinks else 0, n - local)

    def count(a: int, b: int) -> int:  # pages in [0, a) ∪ [n - b, n)
        a, b = min(a, n), min(b, n)
        return a + b - max(0, a - (n - b))

    k = math.ceil(n * density - 1e-9)  # BlockGeometry.budget's arithmetic, in Python's doubles
    return max(1, min(max(k, count(sink_blocks, local_blocks), local + first), n)), local, first


@functools.lru_cache(maxsize=64)
def _forced_pages(n: int, local: int, first: int, device: torch.device) -> Tensor:
    """(1, 1, 1, local + first) the forced pages in ``select_blocks``' order: local ones, then sinks, latest first."""
    pages = torch.cat([torch.arange(n - 1, n - local - 1, -1), torch.arange(first - 1, -1, -1)])
    return pages.to(device).view(1, 1, 1, -1)


@functools.lru_cache(maxsize=64)
def all_valid(k: int, device: torch.device) -> Tensor:
    """(1, 1, 1, k) True: every slot of a decoding step's selection is used (cached: one tensor a size)."""
    return torch.ones(1, 1, 1, k, dtype=torch.bool, device=device)


def gather_tokens(k: Tensor, v: Tensor, pages: Tensor, bs: int) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """(B, Hkv, S·bs, D|Dv) the keys and values (k, v: (B, Hkv, K, D|Dv)) of the pages (B, Hkv, S);
    which of them to hide, (B, Hkv, S·bs) bool or None: the positions past K of a partial last page;
    and each gathered key's position among the K keys, (B, Hkv, S·bs) long (where a mask is read)."""
    B, Hk, K, _ = k.shape
    tokens = (pages[..., None] * bs + torch.arange(bs, device=k.device)).flatten(-2)  # (B, Hkv, S·bs)
    hidden = tokens >= K if K % bs else None
    tokens = tokens.clamp(max=K - 1)
    rows = (tokens + (torch.arange(B * Hk, device=k.device) * K).view(B, Hk, 1)).flatten()
    kg, vg = (t.reshape(B * Hk * K, t.shape[-1]).index_select(0, rows).view(B, Hk, -1, t.shape[-1]) for t in (k, v))
    return kg, vg, hidden, tokens


def _head_rows(t: Tensor) -> int | None:
    """How many key rows apart t's (B, Hkv, K, D) heads begin in its storage, when its keys are rows
    of D contiguous values and its heads evenly spaced (a contiguous cache: K; the first K keys of a
    preallocated one: its capacity); else None."""
    B, Hk, _, D = t.shape
    s0, s1, s2, s3 = t.stride()
    if s3 != 1 or s2 != D or s1 % D or (B > 1 and s0 != Hk * s1) or (Hk == 1 and B > 1 and s0 % D):
        return None
    return (s1 if Hk > 1 else s0) // D


def gather_pages(k: Tensor, v: Tensor, pages: Tensor, bs: int) -> tuple[Tensor, Tensor, Tensor | None, Tensor]:
    """What ``gather_tokens`` gives, copied a whole page at a time (see the module's docstring)."""
    B, Hk, K, _ = k.shape
    if K < bs or _head_rows(k) is None or _head_rows(v) is None:
        return gather_tokens(k, v, pages, bs)
    first = (pages * bs).clamp(max=K - bs)  # (B, Hkv, S) each page's first key (a partial last page: K - bs)

    def windows(t: Tensor) -> Tensor:  # row r: the bs keys from row r of the storage on; starts never cross a head
        D, apart = t.shape[-1], _head_rows(t)
        starts = (first + (torch.arange(B * Hk, device=t.device) * apart).view(B, Hk, 1)).flatten()
        rows = t.as_strided(((B * Hk - 1) * apart + K - bs + 1, bs * D), (D, 1), t.storage_offset())
        return rows.index_select(0, starts).view(B, Hk, -1, D)

    hidden = None
    if K % bs:  # the partial last page's window begins with keys of the page before: hide them
        hidden = ((pages == K // bs)[..., None] & (torch.arange(bs, device=k.device) < bs - K % bs)).flatten(-2)
    tokens = (first[..., None] + torch.arange(bs, device=k.device)).flatten(-2)  # the windows' own keys
    return windows(k), windows(v), hidden, tokens


GATHERS: dict[str, Callable[[Tensor, Tensor, Tensor, int], tuple[Tensor, Tensor, Tensor | None, Tensor]]] = {
    "pages": gather_pages, "tokens": gather_tokens}


def paged_decode_attention(
    q: Tensor, k: Tensor, v: Tensor, indices: Tensor, valid: Tensor, geo: BlockGeometry, *,
    scale: float, block_bias: Tensor | None = None, allowed: Tensor | None = None, gather: str = "pages",
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
    pages = indices.reshape(B, Hk, S)
    kg, vg, hidden, tokens = GATHERS[gather](k, v, pages, bs)  # (B, Hkv, S·bs, D|Dv), positions (B, Hkv, S·bs)
    if not bool(valid.all()):  # slots a row does not use
        unused = (~valid.expand(B, Hk, 1, S).reshape(B, Hk, S))[..., None].expand(B, Hk, S, bs).flatten(-2)
        hidden = unused if hidden is None else hidden | unused
    if allowed is not None:  # the model's own mask, at the gathered keys' positions
        seen = allowed[..., :K].expand(B, 1, 1, K).reshape(B, 1, K).expand(B, Hk, K).gather(-1, tokens)
        hidden = ~seen if hidden is None else hidden | ~seen
    mask = None  # (B|1, Hkv|1, 1, S·bs) additive, shared by the group's query rows
    if block_bias is not None:
        mask = block_bias.reshape(B, Hk, S).to(q.dtype).repeat_interleave(bs, -1)[:, :, None]
    if hidden is not None:
        hide = torch.zeros(hidden.shape, dtype=q.dtype, device=q.device).masked_fill_(hidden, -math.inf)[:, :, None]
        mask = hide if mask is None else mask + hide
    qg = q.reshape(B, Hk, G, D)  # the G query heads of a KV group as G rows
    if mask is not None and mask.requires_grad and torch.is_grad_enabled():
        out = _softmax_attention(qg, kg, vg, mask, scale)  # the gate's gradient through its term
    else:
        out = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, scale=scale)  # (B, Hkv, G, Dv)
    if allowed is not None:  # a row that sees no key is zero, not NaN (a NaN key or value stays NaN)
        blind = hidden.all(-1)  # (B, Hkv): the row's kept keys are all hidden
        out = out.masked_fill(blind[:, :, None, None], 0.0)
    return out.reshape(B, H, 1, Dv)


def _softmax_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale + mask
    probs = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), -1)  # float32 at least
    return torch.matmul(probs.to(v.dtype), v)


def paged_decode_supported(q: Tensor, geo: BlockGeometry, allowed: Tensor | None) -> bool:
    """Whether the call is one this kernel computes: one query per head, and the model's mask (if
    any) one row shared by every head, over (at least) every key."""
    if q.shape[2] != 1 or geo.n_query_blocks != 1:
        return False
    return allowed is None or is_padding_mask(allowed, geo.key_length)


def is_padding_mask(allowed: Tensor, key_length: int) -> bool:
    """Whether a decoding step's mask ``allowed`` is one row per batch row shared by every head,
    (B|1, 1, 1, K' >= key_length): what the paged kernels and a pattern's ``step_pages`` take."""
    return allowed.dim() == 4 and allowed.shape[1] == 1 and allowed.shape[2] == 1 and allowed.shape[3] >= key_length


__all__ = ["GATHERS", "all_valid", "gather_pages", "gather_tokens", "is_decoding_step", "is_padding_mask",
           "paged_decode_attention",
           "paged_decode_supported", "select_step_pages", "step_budget"]
