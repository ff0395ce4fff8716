"""The observation pass: exact logits of a call, chunk by chunk of query rows, shown to taps.

It runs under ``torch.no_grad`` on detached queries and keys, beside whatever kernel computed
the output, with the same modifiers applied (``kernels.dense.chunk_logits``). Nothing n x n
outlives a chunk unless a tap keeps it. When every chunk tap accepts a key prefix and the call
is causal, a chunk only computes the keys its rows can see.

Taps that take per-row statistics (``observe_rows``, the statistics tap) get them from one fused
pass over the raw scores q.k (``metrics.fused``) when the logits are plain raw * scale and the
mask gives each row one interval of keys (causal, padding, sliding windows): no logits,
probabilities or masks are written out for them. Other taps get ``ObservedChunk``s as before.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

from attnkit.seam.kernels.dense import chunk_logits, rows_of
from attnkit.metrics import fused
from attnkit.metrics import rows as rows_lib
from attnkit.seam.call import AttentionCall
from attnkit.seam.mask_cache import LastMaskCache
from attnkit.seam.plan import Mods
from attnkit.seam.taps import ObservedChunk, Tap
from attnkit.seam.taps.stats import ObservedRows

_key_need_cache = LastMaskCache()
_interval_cache = LastMaskCache()
_seen_cache = LastMaskCache()


@torch.no_grad()
def observe_call(
    call: AttentionCall,
    mods: Mods,
    taps: Sequence[Tap],
    heads: list[int],
    rows: Tensor,
    sampled: bool,
    query_mask: Tensor | None,
    chunk_elements: int,
) -> None:
    """Show ``taps`` the logits of ``heads`` on query ``rows`` of ``call`` (with ``mods`` applied)."""
    B, H, Q, _ = call.query.shape
    K = call.key_length
    device = call.query.device
    all_heads = heads == list(range(H))
    head_index = torch.tensor(heads, device=device)
    # Modifiers see head numbers of the call: only when no modifier runs may the pass compute
    # just the observed heads' logits.
    narrow = not all_heads and not mods
    q_src = call.query.detach() if not narrow else call.query.detach()[:, head_index]
    bias_full = call.bias.detach() if call.bias is not None else None
    sinks = call.sinks.detach() if call.sinks is not None else None
    if narrow:
        bias_full = _heads_of(bias_full, head_index)
    # Logits are raw * scale and nothing else: their extremes follow from raw's.
    plain = call.softcap is None and not mods and bias_full is None and call.scale > 0
    pick = slice(None) if narrow or all_heads else head_index
    intervals = _intervals(call, Q, K, head_index if narrow else None) if plain and sinks is None else None
    row_taps = [t for t in taps if callable(getattr(t, "observe_rows", None))] if intervals is not None else []
    chunk_taps = [t for t in taps if t not in row_taps]
    causal_only = call.allowed is None and call.is_causal
    # The (Q, K) causal mask is only built for taps that read masks.
    allowed_full = call.allowed_or_causal() if chunk_taps else call.allowed
    if narrow:
        allowed_full = _heads_of(allowed_full, head_index)
    row_valid_full = _row_valid(query_mask, B, Q, device)
    # Grouped-query models: the fused pass multiplies each key head with its group of query
    # heads, so the (B, H, K, D) expanded copy of the keys is never made for it.
    grouped = row_taps and not chunk_taps and not narrow and call.kv_groups > 1
    k_src = call.key_heads.detach() if grouped else call.key.detach() if not narrow else call.key.detach()[:, head_index]
    key_norm = k_src.float().norm(dim=-1)  # (B, h, K)
    if grouped:
        key_norm = key_norm.repeat_interleave(call.kv_groups, dim=1)
    if allowed_full is not None:  # padding keys, which no query sees, take no part
        key_norm = torch.where(_keys_seen(allowed_full, K), key_norm, 0.0)
    key_norm_max = key_norm.amax(-1)  # (B, h)
    need = None
    if (allowed_full is not None or causal_only) and all(t.accepts_key_prefix for t in taps):
        if causal_only:
            need = rows + (K - Q) + 1
        else:  # mask modifiers only take keys away: the model's mask bounds what a row sees
            need = _key_need(allowed_full, Q, K)[rows.cpu()].to(rows.device)
    work = B * q_src.shape[1] * rows.numel() * K  # logits of the call at most: compiled kernel or not
    row_stats: list[fused.RowStats] = []
    row_norms: list[Tensor] = []

    query_norm_full = q_src.float().norm(dim=-1)  # (B, h, Q): one pass for the whole call
    if row_taps and not chunk_taps:
        stats = _fused_rows(call, q_src, k_src, rows, need, intervals, work, fused_budget(q_src))
        row_stats.append(stats)
        row_norms.append(query_norm_full[:, :, rows])

    for r, k_len in _chunks(rows, need, B * q_src.shape[1], K, chunk_elements) if chunk_taps else ():
        q = q_src[:, :, r]  # (B, h, R, D)
        k_part = k_src if k_len == K else k_src[:, :, :k_len]
        raw = torch.matmul(q, k_part.transpose(-1, -2))  # in the model's dtype: fp16 overflow shows
        positions = r + (K - Q)
        query_norm = query_norm_full[:, :, r]
        if row_taps:
            lo, hi = (t if t.shape[-1] == 1 else t[..., r] for t in intervals)
            row_stats.append(fused.row_stats(raw, call.scale, lo, hi, positions, work))
            row_norms.append(query_norm)
        allowed = rows_of(allowed_full, r, k_len)
        row_max = row_min = None
        if plain:
            # Extremes of raw over visible keys give |q.k| max and, as logits = raw * scale with
            # scale > 0 and rounding monotone, the logits' extremes exactly.
            visible = allowed if allowed is not None else torch.ones(1, 1, 1, k_len, dtype=torch.bool, device=device)
            raw_max, raw_min = rows_lib.logit_extremes(raw, visible)
            qk_absmax = torch.maximum(raw_max, -raw_min).float().clamp_min(0.0).abs()
            row_max, row_min = raw_max.float().mul_(call.scale), raw_min.float().mul_(call.scale)
        else:
            qk_absmax = _visible_absmax(raw, allowed)
        logits, allowed = chunk_logits(call, mods, q, k_part, positions, allowed, rows_of(bias_full, r, k_len), raw=raw)
        del raw
        chunk = ObservedChunk(
            call=call,
            site=call.site,
            head_ids=heads,
            rows=r,
            sampled=sampled,
            logits=logits[:, pick],
            allowed=allowed if allowed.shape[1] == 1 else allowed[:, pick],
            positions=positions,
            row_valid=row_valid_full[:, r],
            query_norm=query_norm[:, pick],
            key_norm_max=key_norm_max[:, pick],
            qk_absmax=qk_absmax[:, pick],
            logit_max=None if row_max is None else row_max[:, pick],
            logit_min=None if row_min is None else row_min[:, pick],
            sinks=None if sinks is None else rows_of(sinks, r, 1)[:, head_index],
        )
        for tap in chunk_taps:
            tap.observe(chunk)
    if row_stats:
        # One fold per call, not per chunk: per-row statistics are (B, h, R) each, and the
        # accumulator's ~40 small operations per fold were a tenth of the observation's cost.
        rows_seen = ObservedRows(
            call=call, site=call.site, head_ids=heads, rows=rows, sampled=sampled, positions=rows + (K - Q),
            row_valid=row_valid_full[:, rows], query_norm=torch.cat(row_norms, -1), key_norm_max=key_norm_max,
            stats=fused.cat_rows(row_stats),
        )
        for tap in row_taps:
            tap.observe_rows(rows_seen)


# The fused path's chunks, in scores: half the call's query elements (B * H * Q * D), so that
# the working set (each thread's chunk of scores and its exp: 2 threads x 2 x 4 bytes x Q*H*D/2
# for a float32 chunk) stays near twice the size of the queries, a small part of what the
# forward itself holds at any length (its MLP activations alone are several times the queries);
# within [64K, 4M] scores (256 KiB-16 MiB in float32), large enough that a chunk's matmul and
# passes are not dominated by the chunk's hundred or so small operations on (rows,) tensors.
FUSED_CHUNK_MIN, FUSED_CHUNK_MAX = 1 << 16, 1 << 22
_pool: ThreadPoolExecutor | None = None


def fused_budget(query: Tensor) -> int:
    """Scores per chunk of the fused pass for a call whose queries are ``query`` (B, h, Q, D)."""
    return max(FUSED_CHUNK_MIN, min(FUSED_CHUNK_MAX, query.numel() // 2))


def _fused_rows(call: AttentionCall, q_src: Tensor, k_src: Tensor, rows: Tensor, need: Tensor | None,
                intervals: tuple[Tensor, Tensor], work: int, budget: int) -> fused.RowStats:
    """Per-row statistics of ``rows`` of the call, chunk by chunk: each chunk's q @ kᵀ and fused
    statistics run on one thread, and chunks run side by side on torch's threads.

    Why not let each operation use every thread: a chunk is two short operations (the matmul
    and the kernel), each a parallel region whose threads meet at a barrier. On a loaded machine
    a thread descheduled mid-region keeps the others spinning there: with ~70 regions a layer,
    the observation of a 2048-token GPT-2 layer took 2.7 s against 0.7 s on one thread (measured
    at load average 12 on 2 cores). Workers that each own whole chunks meet once per call.
    """
    B, h, Q, D = q_src.shape
    h_kv, K = k_src.shape[1], k_src.shape[2]
    groups = h // h_kv  # query heads per key head in k_src (1 when k_src has every head)
    contiguous = rows.numel() == Q  # every row, in order: chunks are slices, q needs no copy
    kernel = fused.qk_kernel(q_src, k_src)  # a single-pass kernel from q and k (C++), or the chunks below
    if kernel is not None:
        lo, hi = (t if t.shape[-1] == 1 else t[..., rows] for t in intervals)
        q_rows = q_src if contiguous else q_src[:, :, rows]
        return kernel(q_rows, k_src, call.scale, lo, hi, (rows + (K - Q)).view(1, 1, -1))

    def one(chunk: tuple[Tensor, int]) -> fused.RowStats:
        r, k_len = chunk
        q = q_src[:, :, int(r[0]) : int(r[-1]) + 1] if contiguous else q_src[:, :, r]  # (B, h, R, D)
        R = q.shape[2]
        lo, hi = (t if t.shape[-1] == 1 else t[..., r] for t in intervals)
        # Keys before the first one any row of the chunk sees (a sliding window's past) are left out.
        k0 = int(lo.min()) if lo.numel() else 0
        k0 = 0 if k0 >= k_len else k0
        k_part = k_src[:, :, k0:k_len]
        if groups > 1:  # (B, h_kv, groups * R, D): query head h_kv * groups + g, row by row
            q = q.reshape(B, h_kv, groups * R, D)
        raw = torch.matmul(q, k_part.transpose(-1, -2)).view(B, h, R, k_len - k0)  # in the model's dtype
        # raw is ours: the statistics may write over it
        return fused.row_stats(raw, call.scale, lo - k0, hi - k0, r + (K - Q - k0), work, scratch=True)

    # Rows that see no key after their own (causal, padding, windows) take one masked pass a chunk
    # whatever its band (``fused._left_sums``): the chunks need not be thin, and are fewer.
    lo_all, hi_all = intervals
    left_only = bool(((hi_all <= torch.arange(Q, device=hi_all.device) + (K - Q + 1)) | (hi_all <= lo_all)).all())
    chunks = list(_chunks(rows, need, B * h, K, budget, thin_band=not left_only))
    threads = torch.get_num_threads()
    if threads == 1 or len(chunks) == 1:
        return fused.cat_rows([one(c) for c in chunks])
    # Where the compiled kernel may run, the first chunk runs here, with every thread: a first
    # call compiles the kernel (dynamo compiles on the calling thread) and warms it. The one
    # masked pass compiles nothing: every chunk goes to the workers (a chunk of ~15 whole-tensor
    # passes on two threads is ~15 barriers, each spinning while the other thread is descheduled).
    first = [] if left_only and fused.compile_mode() != "1" else [one(chunks[0])]
    global _pool
    if _pool is None or _pool._max_workers != threads:
        _pool = ThreadPoolExecutor(threads, thread_name_prefix="attnkit-observe")

    def single(chunk):
        torch.set_num_threads(1)  # this worker's own matmul and kernel stay on its thread
        with torch.no_grad():  # grad mode is per thread
            return one(chunk)

    torch.set_num_threads(1)
    try:
        rest = list(_pool.map(single, chunks[len(first):]))
    finally:
        torch.set_num_threads(threads)
    return fused.cat_rows([*first, *rest])


# Rows per chunk of the fused pass where rows see keys on both sides of their own: at most 1/32
# of the chunk's keys (and at least 8), so the band of keys some of its rows see and others do
# not, which takes the masked kernel, stays a thin part of each chunk near the diagonal too.
BAND_SHARE, BAND_MIN_ROWS = 32, 8


def _chunks(rows: Tensor, need: Tensor | None, per_row: int, K: int, budget: int,
            thin_band: bool = False) -> Iterator[tuple[Tensor, int]]:
    """Consecutive groups of ``rows`` with the key prefix each group needs (K without ``need``),
    about ``budget`` logits a group; with ``thin_band``, at most ``BAND_SHARE``-th as many rows
    as keys (and at least ``BAND_MIN_ROWS``)."""
    cap = (lambda k: max(BAND_MIN_ROWS, k // BAND_SHARE)) if thin_band else (lambda k: rows.numel())
    if need is None:
        step = max(1, min(budget // max(1, per_row * K), cap(K)))
        for start in range(0, rows.numel(), step):
            yield rows[start : start + step], K
        return
    need_of = need.tolist()
    n, start = len(need_of), 0
    while start < n:
        end, k_len = start + 1, need_of[start]
        while end < n:
            k_next = max(k_len, need_of[end])
            if (end - start + 1) * k_next * per_row > budget or end - start + 1 > cap(k_next):
                break
            k_len, end = k_next, end + 1
        yield rows[start:end], k_len
        start = end


def _key_need(allowed: Tensor, Q: int, K: int) -> Tensor:
    """(Q,) for each query row, the key prefix that holds every key it sees and its own position.

    Models pass one mask to every layer, so the answer is kept for the last mask seen.
    """
    cached = _key_need_cache.get(allowed, (Q, K))
    if cached is not None:
        return cached
    original = allowed
    if allowed.dim() < 4:
        allowed = allowed.reshape((1,) * (4 - allowed.dim()) + tuple(allowed.shape))
    seen = allowed.any(1) if allowed.shape[1] > 1 else allowed[:, 0]  # (B|1, Q|1, K)
    seen = seen.any(0) if seen.shape[0] > 1 else seen[0]  # (Q|1, K)
    last = torch.where(seen, torch.arange(1, K + 1, device=allowed.device, dtype=torch.int32), 0).amax(-1)
    own = torch.arange(Q, device=allowed.device) + (K - Q) + 1
    need = torch.maximum(last.to(own.dtype).expand(Q), own).clamp_max(K).cpu()
    _key_need_cache.put(original, need, (Q, K))
    return need


def _keys_seen(allowed: Tensor, K: int) -> Tensor:
    """(B|1, H|1, K) bool: the keys some query row sees (padding keys are seen by none). Kept for the last mask seen."""
    cached = _seen_cache.get(allowed, (K,))
    if cached is None:
        m4 = allowed.reshape((1,) * (4 - allowed.dim()) + tuple(allowed.shape))
        cached = m4.any(-2).expand(*m4.shape[:2], K)
        _seen_cache.put(allowed, cached, (K,))
    return cached


def _intervals(call: AttentionCall, Q: int, K: int, head_index: Tensor | None) -> tuple[Tensor, Tensor] | None:
    """The keys each query row sees as one interval [lo, hi): two (B|1, h|1, Q|1) int64 tensors,
    or None when some row's keys are not contiguous. Kept for the last mask seen, as models pass
    one mask to every layer."""
    device = call.query.device
    if call.allowed is None:
        lo = torch.zeros(1, 1, 1, dtype=torch.long, device=device)
        if call.is_causal:  # query i sits at key K - Q + i and sees keys 0 .. K - Q + i
            return lo, (torch.arange(Q, device=device) + (K - Q + 1)).view(1, 1, Q)
        return lo, torch.full((1, 1, 1), K, dtype=torch.long, device=device)
    mask = call.allowed
    found = _interval_cache.get(mask, (Q, K))
    if found is None:
        m4 = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
        found = fused.mask_intervals(m4.expand(*m4.shape[:-1], K)) or ()
        _interval_cache.put(mask, found, (Q, K))
    if not found:
        return None
    if head_index is not None and found[0].shape[1] > 1:
        return found[0][:, head_index], found[1][:, head_index]
    return found


def _row_valid(query_mask: Tensor | None, B: int, Q: int, device: torch.device) -> Tensor:
    if query_mask is not None and query_mask.shape == (B, Q):
        return query_mask.to(device=device, dtype=torch.bool)
    return torch.ones(B, Q, dtype=torch.bool, device=device)


def _heads_of(t: Tensor | None, head_index: Tensor) -> Tensor | None:
    """The given heads of a (B|1, H|1, Q|1, K) mask or bias; unchanged when shared by all heads."""
    return t if t is None or t.dim() < 4 or t.shape[1] == 1 else t[:, head_index]


def _visible_absmax(raw: Tensor, allowed: Tensor | None) -> Tensor:
    """(B, H, R) largest |q.k| over visible keys, float32: NaN if a visible one is NaN, 0 for rows that see nothing."""
    if allowed is not None and not bool(allowed.all()):
        raw = torch.where(allowed, raw, 0.0)
    return torch.maximum(raw.amax(-1), -raw.amin(-1)).float().abs()
