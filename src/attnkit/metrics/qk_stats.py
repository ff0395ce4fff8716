"""Per-row attention statistics straight from queries and keys: a C++ kernel, built once per machine.

``row_stats`` of ``metrics.fused`` reads scores q.k that a matmul wrote out, then makes a handful
of passes over them (max, min, exp, sums): about 2 ns a score on a CPU against ~1.4 ns for all
of SDPA's flash kernel. The kernel here (``qk_stats.cpp``) does what a flash-attention kernel
does instead: for a tile of query rows it loops over tiles of keys, computes each tile's scores
into a buffer that stays in cache, and folds them at once into each row's running sums, kept
relative to the row's running max and rescaled when it grows (the online softmax), over the
row's visible interval of keys only. Nothing (rows, keys) is written out; q and k are read in
place (any strides); grouped-query keys are read per key head, never expanded; one parallel
region packs the keys, one computes every row (tiles handed out one at a time, largest first).
Each row's fields are finished in double from its float32 sums, the same formulas as
``fused.row_stats``; a sharp row's e = 1 at its max is counted apart from the float32 lanes,
which would otherwise swallow its tail.

Scores are float32 dot products of the inputs' values (float32, bfloat16 or float16), as
flash-attention kernels accumulate them; the eager path instead rounds q.k to the model's dtype
in its matmul, which moves a bf16 score by up to 2^-9 of itself. Rows whose scores are not all
finite in the model's dtype (a NaN, an inf, a float16 q.k beyond 65504) are rare and get their
extremes and counts from the dtype's own matmul, as the eager path reports them. float64 inputs
take the eager path.

Built once per machine and cached (``attnkit.metrics.native``: g++, ninja, ``-O3 -march=native``);
where it cannot be built or loaded, ``load`` returns None after one RuntimeWarning, and callers
use the eager path. ``ATTNKIT_STATS_KERNEL=eager`` turns
it off (``fused.qk_kernel``).

Pure tensor functions, no model knowledge.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from attnkit.metrics.native import VEC_MATH, NativeKernel, build_dir

SOURCE = Path(__file__).with_name("qk_stats.cpp")
# float64 inputs stay on the eager path: the kernel accumulates in float32.
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DEVICES = ("cpu",)
# float16's largest finite value: a q.k beyond it is inf in the model's float16 matmul.
FP16_MAX = 65504.0

KERNEL = NativeKernel("qk_stats", SOURCE, "attnkit", "statistics kernel", headers=(VEC_MATH,))  # torch.ops.attnkit.qk_row_stats


def _build_name() -> str:
    """The build's name (``NativeKernel.build_name``: a digest of the source, headers, flags and machine)."""
    return KERNEL.build_name()


def _build_dir(name: str) -> Path:
    return build_dir(name)


def load(announce: bool = True):
    """``torch.ops.attnkit`` with the kernel, building it on first use (``NativeKernel.load``); None
    (after one warning) where it cannot be."""
    return KERNEL.load(announce)


def needs_build() -> bool:
    """Whether ``load`` would build the kernel (no build for this machine yet, nothing tried)."""
    return KERNEL.needs_build()


def failure() -> str | None:
    """Why the kernel could not be built or loaded, once ``load`` has tried; else None."""
    return KERNEL.failure()


def supports(q: Tensor, k: Tensor) -> bool:
    """Whether the kernel takes these queries and keys (CPU, float32/bf16/fp16, matching shapes)."""
    return (q.device.type in DEVICES and k.device.type == q.device.type and q.dtype in DTYPES and k.dtype == q.dtype
            and q.dim() == 4 and k.dim() == 4 and q.shape[1] % k.shape[1] == 0 and q.shape[-1] == k.shape[-1])


# The rows of the kernel's result, in its order (qk_stats.cpp's Field).
FIELDS = ("n_visible", "logit_max", "logit_min", "qk_absmax", "entropy", "max_prob", "sum_sq", "sink_mass",
          "diagonal_mass", "mean_distance", "suspect")


def kernel_fields(q: Tensor, k: Tensor, scale: float, lo: Tensor, hi: Tensor, pos: Tensor) -> dict[str, Tensor]:
    """The kernel's per-row results: q (B, H, R, D), k (B, Hkv, K, D) with Hkv dividing H (query
    head h reads key head h // (H // Hkv)); lo, hi, pos broadcastable to (B, H, R).

    Returns a (B, H, R) float32 tensor per name of ``FIELDS``: the ``RowStats`` fields of that name
    (computed in double from the float32 sums) and ``suspect``, 1 where the row's scores may not
    all be finite in the model's dtype (``row_stats`` redoes those rows).
    """
    B, H, R, _ = q.shape
    idx = lambda t: torch.as_tensor(t).to(torch.int64).expand(B, H, R)  # noqa: E731 - a view: no copy
    max_finite = FP16_MAX if q.dtype == torch.float16 else math.inf
    out = load().qk_row_stats(q, k, float(scale), idx(lo), idx(hi), idx(pos), max_finite)  # (FIELDS, N)
    return {name: t.view(B, H, R) for name, t in zip(FIELDS, out.unbind(0))}


def exact_extremes(q: Tensor, k: Tensor, scale: float, lo: Tensor, hi: Tensor, rows: Tensor,
                   budget: int = 1 << 22) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For the flat rows ``rows`` (indices into (B, H, R)): x_max, x_min of raw q.k as the model's
    dtype computes it (a matmul in that dtype: float16 overflow shows as inf), and the counts of
    non-finite and of NaN logits raw * scale over each row's visible keys. lo, hi: (N,) int64.
    For the rare rows that are not finite; a matmul per (batch, head) of them."""
    from attnkit.metrics.fused import count_nonfinite

    B, H, R, D = q.shape
    G = H // k.shape[1]
    x_max = torch.empty(rows.numel(), dtype=torch.float32)
    x_min = torch.empty_like(x_max)
    nonfinite = torch.empty(rows.numel(), dtype=torch.int64)
    nans = torch.empty_like(nonfinite)
    bh = rows // R
    for head in torch.unique(bh).tolist():
        where = (bh == head).nonzero().squeeze(-1)
        b, h = divmod(head, H)
        keys = k[b, h // G]  # (K, D)
        step = max(1, budget // max(1, keys.shape[0]))
        for s in range(0, where.numel(), step):
            idx = where[s : s + step]
            r = rows[idx] % R
            raw = q[b, h, r] @ keys.T  # (n, K) in the model's dtype
            row_lo, row_hi = lo[rows[idx]], hi[rows[idx]]
            j = torch.arange(raw.shape[-1])
            vis = (j >= row_lo[:, None]) & (j < row_hi[:, None])
            x = raw.float()
            x_max[idx] = torch.where(vis, x, -math.inf).amax(-1)
            x_min[idx] = torch.where(vis, x, math.inf).amin(-1)
            nonfinite[idx], nans[idx] = count_nonfinite(raw, scale, row_lo, row_hi)
    return x_max, x_min, nonfinite, nans


def row_stats(q: Tensor, k: Tensor, scale: float, lo: Tensor, hi: Tensor, pos: Tensor):
    """``fused.RowStats`` of every row of q (B, H, R, D) against keys k (B, Hkv, K, D): the row
    sees keys lo <= j < hi and sits at key ``pos`` (each broadcastable to (B, H, R)); logits are
    q.k * scale, scale > 0. The same statistics ``fused.row_stats`` gives for the raw scores."""
    from attnkit.metrics.fused import RowStats

    B, H, R, _ = q.shape
    fields = kernel_fields(q, k, scale, lo, hi, pos)
    n_visible = fields["n_visible"].to(torch.int64)
    nonfinite = nans = None
    suspect = fields.pop("suspect").view(-1)
    if bool(suspect.any()):  # rare: redo the extremes and counts in the model's dtype
        rows = suspect.nonzero().squeeze(-1)
        f = lambda t: torch.as_tensor(t).to(torch.int64).expand(B, H, R).reshape(-1)  # noqa: E731
        mx, mn, nf, nn = exact_extremes(q, k, scale, f(lo), f(hi), rows)
        for name, value in (("logit_max", mx * scale), ("logit_min", mn * scale),
                            ("qk_absmax", torch.maximum(mx, -mn).clamp_min(0.0).abs())):
            fields[name] = fields[name].reshape(-1).index_put((rows,), value).view(B, H, R)
        nonfinite = torch.zeros(B * H * R, dtype=torch.int64).index_put((rows,), nf).view(B, H, R)
        nans = torch.zeros(B * H * R, dtype=torch.int64).index_put((rows,), nn).view(B, H, R)
    del fields["n_visible"]
    return RowStats(n_visible=n_visible, nonfinite_logits=nonfinite, nan_logits=nans, **fields)
