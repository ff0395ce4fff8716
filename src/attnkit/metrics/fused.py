"""Per-row attention statistics in one fused pass over the raw scores, without probabilities.

``HeadStatsAccumulator.update`` reads a chunk's probabilities; computing those costs a softmax
(an exp, a division and a (B, H, R, K) copy) and then a dozen passes more for entropy, max,
sum of squares and the rest. Everything it needs is a function of per-row sums over the
logits s of the visible keys, with m the row's largest logit and e = exp(s - m):

    Z = sum e                    A = sum e * (m - s)      S2 = sum e^2
    D = sum e * |i - j|          e at the first visible key and at the row's own key

    entropy H = log Z + A / Z    (= -sum p log p with p = e / Z; both terms are >= 0,
                                   so nothing cancels, unlike logsumexp - sum p s)
    max p = 1 / Z                sum p^2 = S2 / Z^2        mean distance = D / Z
    sink mass = e_first / Z      diagonal mass = e_own / Z

``row_sums`` computes Z, A, S2, D in two passes over each row (its max and min, then the sums),
reading the raw scores q.k as the matmul left them (any float dtype: the logits
s = float(raw) * scale are never written out); the two single-key terms are gathers. Which keys
a row sees is given as one interval [lo, hi) per row, which is what causal masks, padding and
sliding windows are; ``mask_intervals`` turns a bool mask into intervals, or says it is not made
of them. Under ``torch.compile`` (inductor's C++ backend; Triton on CUDA) the passes fuse into one loop nest per
row; without it the same function runs eagerly, slower, with the same values.

``row_stats`` does not hand a whole chunk to ``row_sums``: the keys that every row of a chunk
sees, on one side of every row's own key (for a chunk of consecutive causal rows, all keys
before its first row), need neither masks nor |i - j| per score, and their sums are a handful
of whole-tensor passes (max, min, exp, sum, norm, one matrix-vector product) at memory speed,
no compiler needed (``split_row_sums``). Only the thin band of keys some rows see and others
not goes through ``row_sums``, and the parts merge exactly (``merge_sums``). Rows that see no
key after their own (causal, padding, sliding windows) need no split: one masked pass over the
chunk (``_left_sums``), the hidden keys of its band set to +-inf and 0. Long causal,
padded, bidirectional and windowed calls so never compile: a compile costs a fresh process
tens of seconds on a loaded machine, even with inductor's on-disk cache warm. The compiled
kernel is used where a call is mostly band (masks with short runs) and large enough to pay
(``COMPILE_MIN_LOGITS``), or always with ``ATTNKIT_COMPILE=1``.
Callers that hold q and k rather than scores first ask ``qk_kernel`` for a single-pass kernel
(``metrics.qk_stats``, C++: the scores are never written out); this module is its fallback.
Pure tensor functions, no model knowledge.
"""

from __future__ import annotations

import math
import os
import threading
import time
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class RowStats:
    """What ``HeadStatsAccumulator`` needs of each row of a chunk; every field (B, H, R).

    n_visible: keys the row sees (int64)
    logit_max / logit_min: over visible keys, float32; NaN if a visible logit is NaN,
        -inf / +inf for a row that sees nothing
    entropy, max_prob, sum_sq, sink_mass, diagonal_mass, mean_distance: of the row's softmax
        (meaningless, and never used, for rows that are not finite or see fewer than 2 keys)
    nonfinite_logits / nan_logits: counts over visible keys; None when the producer found
        every row finite (then no row is counted as non-finite)
    finite: bool, the row's logits and probabilities are all finite; None = nonfinite_logits == 0
    """

    n_visible: Tensor
    logit_max: Tensor
    logit_min: Tensor
    entropy: Tensor
    max_prob: Tensor
    sum_sq: Tensor
    sink_mass: Tensor
    diagonal_mass: Tensor
    mean_distance: Tensor
    nonfinite_logits: Tensor | None = None
    nan_logits: Tensor | None = None
    finite: Tensor | None = None
    qk_absmax: Tensor | None = None  # largest |q.k| over visible keys, when the producer has it
    row_mass: Tensor | None = None  # the keys' share of the row when a learned sink takes the rest; None = 1


def cat_rows(parts: list[RowStats]) -> RowStats:
    """Chunks of rows (along R) as one ``RowStats``; counts are zeros where a chunk had none."""
    if len(parts) == 1:
        return parts[0]
    out = {}
    for name in RowStats.__dataclass_fields__:
        values = [getattr(p, name) for p in parts]
        if all(v is None for v in values):
            out[name] = None
            continue
        if any(v is None for v in values):
            if name == "finite":  # None = every row finite
                values = [torch.ones_like(p.n_visible, dtype=torch.bool) if v is None else v for p, v in zip(parts, values)]
            elif name in ("nonfinite_logits", "nan_logits"):
                values = [torch.zeros_like(p.n_visible) if v is None else v for p, v in zip(parts, values)]
            else:
                raise ValueError(f"RowStats.{name} is missing from some chunks")
        out[name] = torch.cat(values, -1)
    return RowStats(**out)


# ---------------------------------------------------------------------------- the kernel
def _row_sums(raw: Tensor, scale: Tensor, lo: Tensor, hi: Tensor, pos: Tensor) -> tuple[Tensor, ...]:
    """Per-row sums over keys j in [lo, hi) of s = float(raw) * scale (scale > 0).

    raw: (N, K) any float dtype; scale: (1,) float32; lo, hi, pos: (N,) float32 (exact integers:
    key positions are far below 2^24). Returns six (N,) float32 tensors: max and min of
    float(raw) over visible keys (unscaled: |q.k| for the overflow check, and the logits'
    extremes exactly, as rounding is monotone), Z, A, S2 and D. A NaN or inf among the visible
    scores shows in max, min or Z (exp of NaN is NaN), which ``row_stats`` checks; counting them
    here would cost 40 % more per element, for rows that are almost never there.
    """
    j = torch.arange(raw.shape[-1], device=raw.device, dtype=torch.float32)  # (K,)
    vis = (j >= lo[:, None]) & (j < hi[:, None])  # (N, K), from indices: no mask is read
    x = raw.float()  # fused into the loops below: never materialised
    # Pass 1: the extremes.
    x_max = torch.where(vis, x, -math.inf).amax(-1)
    x_min = torch.where(vis, x, math.inf).amin(-1)
    # Pass 2: every sum over e = exp(s - m) in one loop. Masked keys contribute exact zeros; the
    # where() around e * -d keeps a masked inf score (fp16 overflow) from making 0 * inf = NaN.
    m = x_max * scale  # the row's largest logit, exactly float(raw_max) * scale
    d = x * scale - m[:, None]  # <= 0 on visible keys of a finite row, 0 at the max
    e = torch.where(vis, torch.exp(d), 0.0)
    z = e.sum(-1)
    a = torch.where(vis, e * -d, 0.0).sum(-1)
    s2 = (e * e).sum(-1)
    md = (e * (pos[:, None] - j).abs()).sum(-1)  # |i - j| from indices
    return x_max, x_min, z, a, s2, md


def count_nonfinite(flat: Tensor, scale: float, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """(N,) counts of non-finite and of NaN logits float(raw) * scale over each row's visible keys
    (eager; the scaling can overflow too)."""
    j = torch.arange(flat.shape[-1], device=flat.device, dtype=torch.float32)
    vis = (j >= lo[:, None]) & (j < hi[:, None])
    s = flat.float() * scale
    return (vis & ~torch.isfinite(s)).sum(-1), (vis & torch.isnan(s)).sum(-1)


# Compiled lazily, once per process; ``compile_seconds`` says what the first compile cost.
_compiled = None
_compile_failed: str | None = None
_compiled_dtypes: set[torch.dtype] = set()  # dtypes of raw the compiled kernel has run on
_lock = threading.Lock()
compile_seconds: float | None = None

# Calls with fewer logits than this run eagerly until the kernel is compiled: compiling (seconds,
# once per process; a warm inductor cache makes it faster) would cost more than it saves on
# small models.
COMPILE_MIN_LOGITS = 1 << 22
# Where inductor compiles the kernel: its C++ backend on the CPU, Triton on CUDA (one fused loop per
# row there too, instead of a (N, K) float32 copy per pass). Elsewhere (MPS) the kernel runs eagerly.
COMPILE_DEVICES = ("cpu", "cuda")


def compile_mode() -> str:
    """``ATTNKIT_COMPILE``: "auto" (default: compile for large calls), "1" always, "0" never."""
    mode = os.environ.get("ATTNKIT_COMPILE", "auto").strip().lower()
    return {"": "auto", "true": "1", "yes": "1", "on": "1", "false": "0", "no": "0", "off": "0"}.get(mode, mode)


def _kernel(raw: Tensor, work: int):
    """The compiled ``_row_sums`` when compiling is wanted, works here, and pays; else the eager one."""
    global _compiled
    mode = compile_mode()
    if mode == "0" or _compile_failed is not None or raw.device.type not in COMPILE_DEVICES:
        return _row_sums
    # Small calls use the compiled kernel only once it exists for this dtype (no compile for them).
    if mode == "auto" and work < COMPILE_MIN_LOGITS and raw.dtype not in _compiled_dtypes:
        return _row_sums
    # Sizes 0 and 1 are specialised by dynamo: a one-row or one-key chunk would compile again.
    if raw.shape[0] < 2 or raw.shape[1] < 2 or torch.compiler.is_compiling():
        return _row_sums
    if _compiled is None:
        with _lock:
            if _compiled is None and _compile_failed is None:
                try:
                    _compiled = torch.compile(_row_sums, dynamic=True, fullgraph=True)
                except Exception as exc:  # noqa: BLE001 - no compiler here: stay eager
                    _fail(exc)
    return _compiled if _compiled is not None else _row_sums


def _fail(exc: BaseException) -> None:
    global _compile_failed, _compiled
    _compile_failed, _compiled = f"{type(exc).__name__}: {exc}", None
    warnings.warn(f"attnkit: compiled statistics unavailable ({_compile_failed}); using the eager kernel",
                  RuntimeWarning, stacklevel=3)


def row_sums(raw: Tensor, scale: float, lo: Tensor, hi: Tensor, pos: Tensor,
             work: int | None = None) -> tuple[Tensor, ...]:
    """``_row_sums``, compiled when that pays (``work``: logits in the whole call, for the choice)."""
    global compile_seconds
    scale_t = torch.as_tensor(scale, dtype=torch.float32, device=raw.device).reshape(1)
    args = (raw, scale_t, lo, hi, pos)
    fn = _kernel(raw, raw.numel() if work is None else work)
    if fn is _row_sums:
        return _row_sums(*args)
    first = compile_seconds is None
    t0 = time.perf_counter()
    try:
        out = fn(*args)
    except Exception as exc:  # noqa: BLE001 - e.g. no C++ compiler: fall back for good
        _fail(exc)
        return _row_sums(*args)
    if first:
        compile_seconds = time.perf_counter() - t0
    _compiled_dtypes.add(raw.dtype)
    return out


def row_stats(raw: Tensor, scale: float, lo: Tensor, hi: Tensor, pos: Tensor, work: int | None = None,
              scratch: bool = False) -> RowStats:
    """Per-row statistics of a chunk of raw scores.

    raw: (B, H, R, K) q.k before scaling, in the model's dtype (or logits with scale 1.0);
    scale > 0; lo, hi: broadcastable to (B, H, R), int or float, the row sees keys lo <= j < hi;
    pos: (R,) the key position of each query row (for the diagonal and distances).
    ``qk_absmax`` of the result is the largest |raw| over visible keys.

    scratch: the pass may write over ``raw`` (a matmul output of the caller's own, not read
    again), which saves a (B, H, R, K) float32 buffer.
    """
    B, H, R, K = raw.shape
    shape = (B, H, R)
    flat = raw.reshape(B * H * R, K)  # a view: matmul output is contiguous
    f = lambda t: t.to(torch.float32).expand(shape).reshape(-1)  # noqa: E731 - (N,) per row
    lo_f, hi_f = f(lo), f(hi)
    pos_f = f(pos.view(1, 1, R))
    # The two single-key terms read raw before the sums may write over it.
    own, first = _raw_at(flat, pos_f), _raw_at(flat, lo_f)
    x_max, x_min, z, a, s2, md = split_row_sums(flat, scale, lo_f, hi_f, pos_f, work, scratch)
    m = x_max * scale
    e_own = _e_of(own, pos_f, scale, m, lo_f, hi_f)
    e_first = _e_of(first, lo_f, scale, m, lo_f, hi_f)
    n_visible = (hi_f - lo_f).clamp_min(0)
    # A row that sees something and is not finite shows here (blind rows have max = -inf).
    suspect = ~(torch.isfinite(x_max) & torch.isfinite(x_min) & torch.isfinite(z)) & (n_visible > 0)
    nonfinite = nans = None
    if bool(suspect.any()):  # rare: count exactly, and let NaN propagate into the extremes as amax does
        # Keys the sums wrote over were finite (they are only written when they are), and stay so.
        nonfinite, nans = count_nonfinite(flat, scale, lo_f, hi_f)
        x_max = torch.where(nans > 0, math.nan, x_max)
        x_min = torch.where(nans > 0, math.nan, x_min)
    inv_z = 1.0 / z
    v = lambda t: None if t is None else t.view(shape)  # noqa: E731
    return RowStats(
        n_visible=v(n_visible.to(torch.int64)),
        logit_max=v(x_max * scale), logit_min=v(x_min * scale),
        entropy=v(torch.log(z) + a * inv_z),
        max_prob=v(inv_z),  # e = 1 at the max
        sum_sq=v(s2 * inv_z * inv_z),
        sink_mass=v(e_first * inv_z),
        diagonal_mass=v(e_own * inv_z),
        mean_distance=v(md * inv_z),
        nonfinite_logits=v(nonfinite), nan_logits=v(nans),
        # Rows that see nothing: max(-inf, -inf) clamps to 0, as over no visible key.
        qk_absmax=v(torch.maximum(x_max, -x_min).clamp_min(0.0).abs()),
    )


def _raw_at(flat: Tensor, col: Tensor) -> Tensor:
    """(N,) float32 raw score at one key per row (any column where the row does not see it)."""
    return flat.gather(-1, col.clamp(0, flat.shape[-1] - 1).long()[:, None]).squeeze(-1).float()


def _e_of(raw_at: Tensor, col: Tensor, scale: float, m: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """exp(s - m) at one key per row, from its raw score (0 where the row does not see it)."""
    return torch.where((col >= lo) & (col < hi), torch.exp(raw_at * scale - m), 0.0)


# ---------------------------------------------------------------------------- keys seen by every row
# A chunk of consecutive query rows under a causal, padding or sliding-window mask sees most of
# its keys from every row: for causal rows i0..i1 every key j <= i0. Over such a block the masks
# and the |i - j| of ``_row_sums`` are not needed, and the sums are a few whole-tensor passes
# (max, min, exp, sums, one matrix-vector product) that run at memory speed without a compiler;
# only the thin band of keys some rows see and others do not goes through ``row_sums``. The
# parts are then merged exactly as a softmax over a concatenation is (rescaled to one max).
# Below this share of keys seen by every row, the band is most of the work: ``row_sums`` does all.
SPLIT_MIN_SHARE = 0.5


def split_row_sums(flat: Tensor, scale: float, lo: Tensor, hi: Tensor, pos: Tensor,
                   work: int | None = None, scratch: bool = False) -> tuple[Tensor, ...]:
    """``row_sums`` of (N, K) raw scores, with the keys that every row sees done by
    ``_common_sums`` (no masks, no compiler) and the rest by ``row_sums``; with ``scratch``
    it may write over ``flat``.

    Same outputs as ``row_sums``: six (N,) float32 tensors x_max, x_min, Z, A, S2, D.
    """
    N, K = flat.shape
    seen = hi > lo  # rows that see no key take no part in the bounds (padding queries)
    if compile_mode() == "1" or not bool(seen.any()):  # ATTNKIT_COMPILE=1: the compiled kernel for everything
        return row_sums(flat, scale, lo, hi, pos, work)
    lo_s, hi_s, pos_s = lo[seen], hi[seen], pos[seen]
    if bool((hi_s <= pos_s + 1).all()):  # causal, padding, sliding windows: no row sees past its own key
        out = _left_sums(flat, scale, lo, hi, pos, seen, lo_s, hi_s, scratch)
        return out if out is not None else row_sums(flat, scale, lo, hi, pos, work)
    start, stop = int(lo_s.max()), int(hi_s.min())  # keys [start, stop) are seen by every row
    p_min, p_max = int(pos_s.min()), int(pos_s.max())
    # Left of every row's own key (distance pos - j), and right of every row's (j - pos).
    left = (start, max(start, min(stop, p_min + 1)))
    right = (max(left[1], p_max + 1), stop) if p_max + 1 < stop else (left[1], left[1])
    common = [(a, b, side) for (a, b), side in ((left, -1), (right, 1)) if b > a]
    if sum(b - a for a, b, _ in common) < SPLIT_MIN_SHARE * K:
        # Mostly band: a chunk of a short prefix, or of a mask that is not made of long runs.
        # The compiled kernel is used if it exists, but not compiled for a chunk this size.
        return row_sums(flat, scale, lo, hi, pos, min(work or flat.numel(), flat.numel()))
    # Their extremes first: a non-finite score among them sends the chunk to ``row_sums`` before
    # anything is written over.
    extremes = [(flat[:, a:b].amax(-1), flat[:, a:b].amin(-1)) for a, b, _ in common]
    if not all(bool(torch.isfinite(mx).all() & torch.isfinite(mn).all()) for mx, mn in extremes):
        return row_sums(flat, scale, lo, hi, pos, work)
    parts = [_common_sums(flat[:, a:b], mx.float(), mn.float(), scale, pos, a, b, side, scratch)
             for (a, b, side), (mx, mn) in zip(common, extremes)]
    bounds = sorted([0, K] + [x for a, b, _ in common for x in (a, b)])
    for a, b in zip(bounds[::2], bounds[1::2]):  # the band: keys some rows see and others not
        if b > a:
            # Small: compiled only if the kernel already exists (it is never compiled for this).
            parts.append(row_sums(flat[:, a:b], scale, lo - a, hi - a, pos - a, 0))
    x_max, x_min, z, a_, s2, md = merge_sums(parts, scale)
    if not bool(seen.all()):  # rows that see nothing: as ``row_sums`` leaves them
        blind = ~seen
        x_max = x_max.masked_fill(blind, -math.inf)
        x_min = x_min.masked_fill(blind, math.inf)
        z, a_, s2, md = (t.masked_fill(blind, 0.0) for t in (z, a_, s2, md))
    return x_max, x_min, z, a_, s2, md


EXP_FLOOR = -87.0  # exp(-87) = 1.6e-38, float32's smallest normal numbers


def _left_sums(flat: Tensor, scale: float, lo: Tensor, hi: Tensor, pos: Tensor, seen: Tensor,
               lo_s: Tensor, hi_s: Tensor, scratch: bool) -> tuple[Tensor, ...] | None:
    """``row_sums`` of (N, K) raw scores whose rows see no key after their own (hi <= pos + 1),
    as whole-tensor passes over the chunk; None when a score a row sees is not finite (nothing
    it sees written over: the caller's ``row_sums`` then counts them).

    The keys some rows see and others do not lie in [0, max lo) and [min hi, K) over the rows
    that see any: there the hidden scores are set to +inf for the min, then -inf, so that the
    max, exp (0) and the sums need no mask; the chunk is one part, with nothing to merge. The
    distances pos - j >= 0 are summed as (pos - (c - 1)) * Z + sum e * (c - 1 - j) over keys
    j < c = min hi (both terms >= 0) and per score over the band [c, K).
    """
    N, K = flat.shape
    lo_max, hi_min = (int(v) for v in torch.stack([lo_s.max(), hi_s.min()]).tolist())
    edges = [(0, lo_max), (hi_min, K)] if lo_max < hi_min else [(0, K)]
    # (N, b - a) for each edge: keys of [a, b) a row does not see
    hidden = [((j < lo[:, None]) | (j >= hi[:, None]), a, b)
              for a, b in edges if b > a
              for j in [torch.arange(a, b, device=flat.device, dtype=lo.dtype)]]
    # (N, K) float32 scores to write over: the caller's when it is ours, else a copy
    x = flat if scratch and flat.dtype == torch.float32 else flat.to(torch.float32, copy=True)
    for h, a, b in hidden:
        x[:, a:b].masked_fill_(h, math.inf)
    x_min = x.amin(-1)
    for h, a, b in hidden:
        x[:, a:b].masked_fill_(h, -math.inf)
    x_max = x.amax(-1)
    m = x_max * scale  # the row's largest logit; the smallest must not overflow once scaled either
    if not bool((torch.isfinite(m) & torch.isfinite(x_min * scale))[seen].all()):
        return None
    # d = s - m = scale * x - m in one pass (a fused multiply-add a score), over x
    d = torch.add(m.neg_()[:, None], x, alpha=scale, out=x)
    # exp takes a slow path (10-70x) below about -87, where its result is denormal or 0 (-inf
    # included): hidden keys get d = 0 (e * d = 0 there too) and e = 0 after it, and ``EXP_FLOOR``
    # bounds the rest, whose e < 2e-38 is far below the rounding of Z >= 1.
    for h, a, b in hidden:
        d[:, a:b].masked_fill_(h, 0.0)
    e = torch.exp(d.clamp_min_(EXP_FLOOR))  # (N, K)
    for h, a, b in hidden:
        e[:, a:b].masked_fill_(h, 0.0)
    s2 = torch.linalg.vector_norm(e, dim=-1).square()
    c = min(hi_min, K)
    j = torch.arange(K, device=flat.device, dtype=e.dtype)
    z_c = e[:, :c].sum(-1)
    md = e[:, :c].mv((c - 1) - j[:c]) + (pos - (c - 1)) * z_c  # pos >= hi - 1 >= c - 1 on seen rows
    z = z_c
    if c < K:  # the band: distances per score; hidden keys have e = 0
        band = e[:, c:]
        z = z + band.sum(-1)
        md = md + (band * (pos[:, None] - j[c:])).sum(-1)
    a_ = d.mul_(e).sum(-1).neg_().clamp_min_(0.0)  # >= 0: only the max's rounding error (d at the max) is < 0
    if not bool(seen.all()):  # rows that see nothing: as ``row_sums`` leaves them
        blind = ~seen
        x_max = x_max.masked_fill(blind, -math.inf)
        x_min = x_min.masked_fill(blind, math.inf)
        z, a_, s2, md = (t.masked_fill(blind, 0.0) for t in (z, a_, s2, md))
    return x_max, x_min, z, a_, s2, md


def _common_sums(x: Tensor, x_max: Tensor, x_min: Tensor, scale: float, pos: Tensor,
                 a: int, b: int, side: int, scratch: bool) -> tuple[Tensor, ...]:
    """The six sums over keys [a, b) of (N, b - a) raw scores ``x`` that every row sees, all on one
    side of each row's own key (side -1: j <= pos; +1: j > pos). Writes over a float32 ``x``
    when ``scratch``.

    Every pass is a whole-tensor operation; A = -sum e * d with d = s - m <= 0 and
    D = sum e * |pos - j| = |pos - edge| * Z + sum e * |edge - j| have no cancelling terms.
    """
    # (N, W): d = s - m = scale * x - m in one pass (one fused multiply-add a score), written over
    # a float32 ``x`` when ``scratch``. At the max, d is m's rounding error (|d| <= half an ulp of m),
    # not an exact 0: a part of e's relative error of that size, far below the float32 sums' own.
    m = (x_max * scale)[:, None]
    if scratch and x.dtype == torch.float32:
        d = torch.add(m.neg(), x, alpha=scale, out=x)
    else:
        d = torch.add(m.neg(), x.float(), alpha=scale)
    e = torch.exp(d.clamp_min_(EXP_FLOOR))  # (N, W); the floor keeps exp off its slow path (``_left_sums``)
    z = e.sum(-1)
    s2 = torch.linalg.vector_norm(e, dim=-1).square()
    j = torch.arange(a, b, device=x.device, dtype=e.dtype)
    if side < 0:  # pos - j = (pos - (b - 1)) + ((b - 1) - j), both >= 0
        md = e.mv(b - 1 - j) + (pos - (b - 1)) * z
    else:  # j - pos = (j - a) + (a - pos), both > 0
        md = e.mv(j - a) + (a - pos) * z
    a_ = d.mul_(e).sum(-1).neg_().clamp_min_(0.0)  # >= 0: only the max's rounding error (above) is < 0
    return x_max, x_min, z, a_, s2, md


def merge_sums(parts: list[tuple[Tensor, ...]], scale: float) -> tuple[Tensor, ...]:
    """The sums of a row over the union of key sets, from each set's (x_max, x_min, Z, A, S2, D)
    relative to its own max: each part rescaled by exp(s_max_part - s_max) (A also shifts by
    (s_max - s_max_part) * Z), parts with no visible key (Z = 0) taking no part."""
    if len(parts) == 1:
        return parts[0]
    x_max = torch.stack([p[0] for p in parts])  # (P, N)
    x_min = torch.stack([p[1] for p in parts]).amin(0)
    z, a, s2, md = (torch.stack([p[i] for p in parts]) for i in range(2, 6))
    top = x_max.amax(0)  # (N,)
    live = z != 0  # a NaN sum stays live, so the row shows as not finite
    shift = torch.where(live, (top - x_max) * scale, 0.0)  # >= 0 for parts that see keys
    c = torch.where(live, torch.exp(-shift), 0.0)
    z_all = (c * z).sum(0)
    a_all = (c * torch.where(live, a + shift * z, 0.0)).sum(0)
    s2_all = (c * c * torch.where(live, s2, 0.0)).sum(0)
    md_all = (c * torch.where(live, md, 0.0)).sum(0)
    return top, x_min, z_all, a_all, s2_all, md_all


# ---------------------------------------------------------------------------- masks as intervals
def mask_intervals(allowed: Tensor) -> tuple[Tensor, Tensor] | None:
    """A bool mask (..., Q, K) as per-row key intervals: (lo, hi), each (..., Q) int64, with
    ``allowed[..., i, j] == (lo[i] <= j < hi[i])``; None when some row's keys are not contiguous.

    Rows that see nothing get lo = hi = 0. One pass of a few reductions over the mask (not over
    the logits: a mask is shared by heads and layers).
    """
    K = allowed.shape[-1]
    bytes_ = allowed.to(torch.uint8)  # one byte a key: no int64 (Q, K) temporaries
    count = bytes_.sum(-1, dtype=torch.int16 if K < 2**15 else torch.int32).long()  # 10x a bool sum's speed
    lo = bytes_.argmax(-1)  # the first True (argmax returns the first of equal maxima)
    hi = K - bytes_.flip(-1).argmax(-1)  # one past the last True
    blind = count == 0
    lo = torch.where(blind, 0, lo)
    hi = torch.where(blind, 0, hi)
    if not bool((hi - lo == count).all()):
        return None
    return lo, hi


# ---------------------------------------------------------------------------- kernels from q and k
# Per-row statistics straight from queries and keys, one pass, nothing (rows, keys) written out:
# name -> a module with ``DEVICES``, ``supports(q, k)``, ``needs_build()``, ``load()`` and
# ``row_stats(q, k, scale, lo, hi, pos)``.
# Where none applies, callers compute q.k chunk by chunk and call ``row_stats`` above (eager).
QK_KERNELS = {"cpp": "attnkit.metrics.qk_stats"}


def stats_kernel_choice() -> str:
    """``ATTNKIT_STATS_KERNEL``: "auto" (default: the C++ kernel where it builds), "cpp", or "eager"."""
    choice = os.environ.get("ATTNKIT_STATS_KERNEL", "auto").strip().lower() or "auto"
    if choice not in ("auto", "eager", *QK_KERNELS):
        raise ValueError(f"ATTNKIT_STATS_KERNEL must be auto, eager or one of {sorted(QK_KERNELS)}, not {choice!r}")
    return choice


def qk_kernels_to_build(device: torch.device | str) -> list[str]:
    """The single-pass kernels that a run on ``device`` would build on first use (none built yet)."""
    import importlib

    choice = stats_kernel_choice()
    if choice == "eager":
        return []
    names = [n for n in (QK_KERNELS if choice == "auto" else (choice,))
             if torch.device(device).type in importlib.import_module(QK_KERNELS[n]).DEVICES]
    return [n for n in names if importlib.import_module(QK_KERNELS[n]).needs_build()]


def build_qk_kernels(names: list[str]) -> None:
    """Build (or load) these single-pass kernels now rather than inside the first statistics call
    (the caller says so: no ``KernelBuildNotice``)."""
    import importlib

    for name in names:
        importlib.import_module(QK_KERNELS[name]).load(announce=False)


def qk_kernel(q: Tensor, k: Tensor):
    """The ``row_stats(q, k, scale, lo, hi, pos) -> RowStats`` of a single-pass kernel that takes
    these queries (B, H, R, D) and keys (B, Hkv, K, D), or None (then the eager path)."""
    import importlib

    choice = stats_kernel_choice()
    if choice == "eager":
        return None
    for name in QK_KERNELS if choice == "auto" else (choice,):
        module = importlib.import_module(QK_KERNELS[name])
        if module.supports(q, k) and module.load() is not None:
            return module.row_stats
    return None
