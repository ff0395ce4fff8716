"""[6/9] Query-side variation: do different queries attend differently?

row_std and entropy ask how each query spreads over keys (key side); this asks whether two
queries spread differently (query side). For a pair of rows (i, j) both rows are restricted to
the keys both can see and renormalised, then compared by L2 distance. The restriction matters
for causal models: row j sees more keys than row i, and without it uniform causal attention
would look like query variation. Uniform attention gives exactly 0.

Figures: the mean and max over random row pairs of the same head and sequence ("average / max
query variation"), and the means for adjacent (Δpos = 1) and distant (Δpos = 10)
pairs: distant > adjacent means attention changes with position.
"""

from __future__ import annotations

import math

import torch

from attnkit.validate.context import Context
from attnkit.validate.types import INFO, OK, WARN, Section

RANDOM_PAIRS = 256
DISTANT = 10
STRUCTURE = 1.1  # distant/adjacent ratio that counts as positional structure


def pair_l2(probs: torch.Tensor, allowed: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """(B, H, M) L2 between rows i[m] and j[m] over their common keys, renormalised; NaN where < 2 common keys."""
    common = allowed[:, :, i] & allowed[:, :, j]
    p = probs[:, :, i] * common
    q = probs[:, :, j] * common
    ps, qs = p.sum(-1, keepdim=True), q.sum(-1, keepdim=True)
    ok = (common.sum(-1) >= 2) & (ps.squeeze(-1) > 1e-12) & (qs.squeeze(-1) > 1e-12)
    d = (p / ps.clamp_min(1e-30) - q / qs.clamp_min(1e-30)).norm(dim=-1)
    return torch.where(ok, d, torch.nan)


def query_variation(ctx: Context) -> Section:
    opt = ctx.options
    sec = Section("query_variation", "Query-Side Variation (Do different tokens attend differently?)")
    g = torch.Generator().manual_seed(opt.seed)
    rand_all, adj_all, far_all, per_head = [], [], [], []
    for lv in ctx.captured.layers:
        Q = lv.probs.shape[-2]
        if Q < 3:
            continue
        i = torch.randint(0, Q, (RANDOM_PAIRS,), generator=g)
        j = torch.randint(0, Q, (RANDOM_PAIRS,), generator=g)
        keep = i != j
        rnd = pair_l2(lv.probs, lv.allowed, i[keep], j[keep])
        adj = pair_l2(lv.probs, lv.allowed, torch.arange(Q - 1), torch.arange(1, Q))
        far = pair_l2(lv.probs, lv.allowed, torch.arange(Q - DISTANT), torch.arange(DISTANT, Q)) if Q > DISTANT else None
        rand_all.append(rnd.flatten())
        adj_all.append(adj.flatten())
        if far is not None:
            far_all.append(far.flatten())
        for h in range(lv.num_heads):
            per_head.append({"layer": lv.layer, "head": h, "l2": _nanmean(rnd[:, h])})
    if not rand_all:
        sec.add("variation", INFO, "Sequence too short to compare queries")
        sec.figures.update(mean=math.nan)
        return sec
    rnd = torch.cat(rand_all)
    mean, mx = _nanmean(rnd), _nanmax(rnd)
    adj = _nanmean(torch.cat(adj_all))
    far = _nanmean(torch.cat(far_all)) if far_all else math.nan
    sec.notes.append(f"Average query variation (L2 between rows, over shared keys): {mean:.4f}")
    sec.notes.append(f"Max query variation: {mx:.4f}")
    if mean > opt.query_variation_high:
        sec.add("variation", OK, f"Different queries attend differently (L2={mean:.4f})", mean=mean, max=mx)
    elif mean < opt.query_variation_low:
        sec.add("variation", WARN, f"Queries attend almost alike (L2={mean:.4f} < {opt.query_variation_low:g}): "
                "no query-side structure either", mean=mean, max=mx)
    else:
        sec.add("variation", INFO, f"Weak query-side variation (L2={mean:.4f})", mean=mean, max=mx)
    sec.notes.append("Positional pattern analysis:")
    sec.notes.append(f"  Adjacent queries (Δpos=1): L2={adj:.4f}")
    sec.notes.append(f"  Distant queries (Δpos={DISTANT}): L2={far:.4f}")
    if not math.isnan(far) and far > STRUCTURE * adj and far > opt.query_variation_low:
        sec.add("positional_structure", OK, "Positional structure detected (distant > adjacent)", adjacent=adj, distant=far)
    else:
        sec.add("positional_structure", INFO, "No positional structure (distant ≈ adjacent)", adjacent=adj, distant=far)
    sec.figures.update(mean=mean, max=mx, adjacent=adj, distant=far, distant_offset=DISTANT, per_head=per_head)
    return sec


def _nanmean(x: torch.Tensor) -> float:
    x = x[~torch.isnan(x)]
    return float(x.mean()) if x.numel() else math.nan


def _nanmax(x: torch.Tensor) -> float:
    x = x[~torch.isnan(x)]
    return float(x.max()) if x.numel() else math.nan
