"""[1/9] Sanity checks: the probabilities are distributions, causality as the probabilities show it, KL properties.

- Normalisation: largest |sum of a row − 1| over rows that see at least one key.
- Causality is read from the probabilities, not from the model's config: the largest weight on
  a key after the query's position. A causal language model with future mass leaks the answer.
- KL: for sampled pairs of rows (i < j, same head and sequence) KL(p_i || p_j) ≥ 0 (Gibbs), and
  KL(p || p) = 0, computed in float64 on each row's weights.
"""

from __future__ import annotations

import math

import torch

from attnkit.validate.context import Context
from attnkit.validate.types import CRITICAL, INFO, OK, WARN, Section

SUM_OK, SUM_WARN = 1e-4, 1e-2
FUTURE_TOL = 1e-6
KL_TOL = 1e-6
PAIRS_PER_LAYER = 512


def _kl(p, q):
    p, q = p.double(), q.double().clamp_min(1e-300)
    return torch.where(p > 0, p * (p.clamp_min(1e-300).log() - q.log()), torch.zeros_like(p)).sum(-1)


def sanity(ctx: Context) -> Section:
    sec = Section("sanity", "Sanity Checks (Correctness)")
    cap = ctx.captured
    g = torch.Generator().manual_seed(ctx.options.seed)
    max_err, max_future, nonfinite = 0.0, 0.0, 0
    kl_values, kl_self = [], []
    for lv in cap.layers:
        p = lv.probs
        nonfinite += int((~torch.isfinite(p)).sum())
        seen = lv.n_visible > 0
        err = (p.double().sum(-1) - 1.0).abs()
        if seen.any():
            max_err = max(max_err, float(torch.nan_to_num(err[seen], nan=math.inf).max()))
        Q, K = p.shape[-2:]
        qpos = torch.arange(Q)[:, None] + (K - Q)
        future = torch.arange(K)[None, :] > qpos
        if future.any():
            max_future = max(max_future, float(torch.nan_to_num(p[..., future], nan=0.0).max()))
        # KL over random row pairs (i < j) of random heads and sequences
        B, H = p.shape[:2]
        b = torch.randint(0, B, (PAIRS_PER_LAYER,), generator=g)
        h = torch.randint(0, H, (PAIRS_PER_LAYER,), generator=g)
        i = torch.randint(0, Q, (PAIRS_PER_LAYER,), generator=g)
        j = torch.randint(0, Q, (PAIRS_PER_LAYER,), generator=g)
        i, j = torch.minimum(i, j), torch.maximum(i, j)
        keep = (i != j) & seen[b, h, i] & seen[b, h, j]
        pi, pj = p[b, h, i][keep], p[b, h, j][keep]
        kl_values.append(_kl(pi, pj))
        kl_self.append(_kl(pi, pi).abs())

    if nonfinite:
        sec.add("nonfinite", CRITICAL, f"{nonfinite} attention weights are NaN/Inf", nonfinite_weights=nonfinite)
    status = OK if max_err < SUM_OK else WARN if max_err < SUM_WARN else CRITICAL
    word = "All rows sum to 1.0" if status == OK else "Rows do not sum to 1"
    sec.add("normalisation", status, f"{word} (max error: {max_err:.2e})", max_row_sum_error=max_err)

    causal = max_future <= FUTURE_TOL
    if causal:
        sec.add("causality", OK, f"Causal attention: no mass on future positions (max future attn: {max_future:.2e})",
                max_future_attention=max_future, causal=True)
    elif ctx.causal_lm:
        sec.add("causality", CRITICAL, f"Future positions get attention in a causal language model "
                f"(max future attn: {max_future:.4f}): the model can see what it predicts",
                max_future_attention=max_future, causal=False)
    else:
        sec.add("causality", INFO, f"Non-causal (bidirectional) attention detected (max future attn: {max_future:.4f})",
                max_future_attention=max_future, causal=False)

    kl = torch.cat(kl_values) if kl_values else torch.zeros(0)
    kls = torch.cat(kl_self) if kl_self else torch.zeros(0)
    if kl.numel():
        kl_min, kl_mean, self_max = float(kl.min()), float(kl.mean()), float(kls.max())
        good = kl_min >= -KL_TOL and self_max <= KL_TOL
        sec.add("kl", OK if good else CRITICAL,
                f"KL ≥ 0 (min: {kl_min:.2e}), KL(p‖p) ≈ 0 (max: {self_max:.2e}) over {kl.numel()} row pairs"
                if good else f"KL properties fail (min KL {kl_min:.2e}, max KL(p‖p) {self_max:.2e}): rows are not distributions",
                kl_min=kl_min, kl_mean=kl_mean, kl_self_max=self_max, pairs=int(kl.numel()))
    else:
        sec.add("kl", INFO, "KL check skipped: no pair of rows to compare (sequence too short)")
    sec.figures.update(max_row_sum_error=max_err, max_future_attention=max_future, causal=causal)
    return sec
