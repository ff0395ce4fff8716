"""[2/9] Positional patterns: do nearby keys get more weight than distant ones?

For every row that sees both kinds of key: the mean weight per *nearby* key (1 ≤ |i − j| ≤ w,
w = 5, the local window) and per *far* key (|i − j| > w); the figures are those
means averaged over rows, and their ratio (1.0 for uniform attention). A head is "local" when
its own ratio is at least 2. Also reported: mass on the query's own position and on the first
position (the attention sink), each against what uniform attention would give.
"""

from __future__ import annotations

import math

import torch

from attnkit.validate.context import Context
from attnkit.validate.stats import nanmean
from attnkit.validate.types import INFO, OK, WARN, Section

STRONG, WEAK = 1.5, 1.1
LOCAL_HEAD = 2.0


def per_key_means(probs, allowed, sel):
    """Mean weight per selected visible key, per row; NaN where the row sees none of them."""
    keys = allowed & sel
    count = keys.sum(-1)
    mass = (probs * keys).sum(-1)
    return torch.where(count > 0, mass / count.clamp_min(1), torch.nan)


def positional(ctx: Context) -> Section:
    sec = Section("positional", "Positional Patterns")
    w = ctx.options.window
    near_all, far_all, head_ratio, labels = [], [], [], []
    diag, diag_u, sink, sink_u = [], [], [], []
    for lv in ctx.captured.layers:
        p, a = lv.probs, lv.allowed
        Q, K = p.shape[-2:]
        qpos = torch.arange(Q)[:, None] + (K - Q)
        dist = (qpos - torch.arange(K)[None, :]).abs()
        near = per_key_means(p, a, (dist >= 1) & (dist <= w))
        far = per_key_means(p, a, dist > w)
        both = ~(torch.isnan(near) | torch.isnan(far))
        near, far = torch.where(both, near, torch.nan), torch.where(both, far, torch.nan)
        near_all.append(near.flatten())
        far_all.append(far.flatten())
        for h in range(lv.num_heads):
            n_h, f_h = nanmean(near[:, h]), nanmean(far[:, h])
            head_ratio.append(n_h / f_h if f_h > 0 else math.nan)
            labels.append((lv.layer, h))
        n = lv.n_visible.clamp_min(1).float()
        seen2 = lv.n_visible >= 2
        d = torch.diagonal(p[..., K - Q:], dim1=-2, dim2=-1)  # (B, H, Q): weight on itself
        diag.append(d[seen2])
        diag_u.append((1.0 / n)[seen2])
        first = a.to(torch.uint8).argmax(-1, keepdim=True)
        sink.append(p.gather(-1, first).squeeze(-1)[seen2])
        sink_u.append((1.0 / n)[seen2])
    near_m = nanmean(torch.cat(near_all)) if near_all else math.nan
    far_m = nanmean(torch.cat(far_all)) if far_all else math.nan
    if math.isnan(near_m) or math.isnan(far_m):
        sec.add("local_bias", INFO, f"Sequence too short to compare nearby (≤ {w}) and far keys")
        ratio = math.nan
    else:
        ratio = near_m / far_m if far_m > 0 else math.inf
        msg = f"(nearby: {near_m:.4f}, far: {far_m:.4f}, ratio: {ratio:.2f}x)"
        if ratio >= STRONG:
            sec.add("local_bias", OK, f"Local bias {msg}", nearby=near_m, far=far_m, ratio=ratio)
        elif ratio >= WEAK:
            sec.add("local_bias", INFO, f"Weak local bias {msg}", nearby=near_m, far=far_m, ratio=ratio)
        else:
            sec.add("local_bias", WARN, f"No local bias {msg}", nearby=near_m, far=far_m, ratio=ratio)
    local_heads = [f"L{l}H{h}" for (l, h), r in zip(labels, head_ratio) if r >= LOCAL_HEAD]
    total = len(labels)
    if total:
        sec.notes.append(f"Local heads (own nearby/far ratio ≥ {LOCAL_HEAD:g}): {len(local_heads)}/{total}"
                         + (f" — {', '.join(local_heads[:12])}{' …' if len(local_heads) > 12 else ''}" if local_heads else ""))
    if diag:
        dm, du = float(torch.cat(diag).mean()), float(torch.cat(diag_u).mean())
        sm, su = float(torch.cat(sink).mean()), float(torch.cat(sink_u).mean())
        sec.notes.append(f"Mass on own position: {dm:.4f} (uniform: {du:.4f}); on the first position (sink): {sm:.4f} (uniform: {su:.4f})")
        if su > 0 and sm / su >= 5 and sm >= 0.2:
            sec.add("sink", INFO, f"Attention sink: the first position gets {sm:.2f} of the mass ({sm / su:.1f}x uniform)",
                    sink_mass=sm, sink_uniform=su)
    else:
        dm = du = sm = su = math.nan
    sec.figures.update(window=w, nearby=near_m, far=far_m, ratio=ratio, local_heads=local_heads,
                       head_ratio=[{"layer": l, "head": h, "ratio": r} for (l, h), r in zip(labels, head_ratio)],
                       self_mass=dm, self_mass_uniform=du, sink_mass=sm, sink_mass_uniform=su)
    return sec
