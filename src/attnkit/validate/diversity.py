"""[7/9] Diversity correlation: hidden-state diversity against attention diversity.

"Belief diversity" (μ_dist) generalised to any model: for the hidden states that
enter each layer (embeddings for layer 0, block l−1's output for layer l), the mean pairwise
cosine distance 1 − cos(h_i, h_j) between the tokens of a sequence. Attention diversity is
row_std (the std of a row's weights) and, length-free, 1 − H/H_max, averaged over heads.

Figures: both per layer and overall; and the Pearson correlation, over every (layer, query)
point, between how diverse the hidden states a query sees are (its mean cosine distance to its
visible keys) and how far its attention is from uniform (1 − H/H_max, averaged over heads).
Rule: diverse hidden states (> 0.3) with uniform attention (mean H/H_max ≥ 0.9, the
per-head "uniform" threshold) is an architectural problem: the layer has information to select
on and does not.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from attnkit.validate.context import Context
from attnkit.validate.stats import nanmean, pearson
from attnkit.validate.types import CRITICAL, INFO, OK, Section


def diversity(ctx: Context) -> Section:
    opt = ctx.options
    sec = Section("diversity", "Diversity Correlation")
    cap = ctx.captured
    if len(cap.hidden_states) < len(cap.layers):
        sec.add("diversity", INFO, "The model returns no hidden states (output_hidden_states): section skipped")
        sec.figures.update(hidden_diversity=math.nan)
        return sec
    per_layer, xs, ys = [], [], []
    for idx, lv in enumerate(cap.layers):
        hs = cap.hidden_states[lv.layer] if lv.layer < len(cap.hidden_states) else cap.hidden_states[idx]
        h = F.normalize(hs.double(), dim=-1)  # (B, T, D)
        dist = 1.0 - h @ h.transpose(-1, -2)  # (B, Q, K)
        T = dist.shape[-1]
        off = ~torch.eye(T, dtype=torch.bool)
        layer_div = float(dist[:, off].mean()) if T > 1 else math.nan
        # per query: mean distance to the keys it sees (any head's mask; heads share it)
        vis = lv.allowed[:, 0] & off  # (B, Q, K)
        q_div = torch.where(vis.sum(-1) > 0, (dist * vis).sum(-1) / vis.sum(-1).clamp_min(1), torch.nan)
        nonuni = 1.0 - lv.normalized_entropy.double()  # (B, H, Q)
        q_att = torch.nanmean(nonuni, dim=1) if lv.num_heads else nonuni[:, 0]
        xs.append(q_div.flatten())
        ys.append(q_att.flatten())
        seen = lv.n_visible >= 2
        per_layer.append({"layer": lv.layer, "hidden_diversity": layer_div,
                          "attention_row_std": float(lv.row_std[seen].mean()) if seen.any() else math.nan,
                          "attention_nonuniformity": max(nanmean(nonuni), 0.0)})
    hid = nanmean(torch.tensor([r["hidden_diversity"] for r in per_layer]))
    row_std = nanmean(torch.tensor([r["attention_row_std"] for r in per_layer]))
    nonuni = max(nanmean(torch.tensor([r["attention_nonuniformity"] for r in per_layer])), 0.0)
    r = pearson(torch.cat(xs), torch.cat(ys))
    sec.notes.append(f"Hidden-state diversity (mean cosine distance, seed's μ_dist): {hid:.4f}")
    sec.notes.append(f"Attention diversity (row_std): {row_std:.4f}; 1 − H/H_max: {nonuni:.4f}")
    for row in per_layer:
        sec.notes.append(f"  L{row['layer']}: hidden {row['hidden_diversity']:.3f}, row_std {row['attention_row_std']:.4f}, "
                         f"1 − H/H_max {row['attention_nonuniformity']:.3f}")
    sec.notes.append(f"Correlation over queries (diversity seen vs attention non-uniformity): r = {r:.3f}")
    uniform = (1.0 - nonuni) >= opt.uniform_above
    figs = {"hidden_diversity": hid, "attention_row_std": row_std, "attention_nonuniformity": nonuni, "correlation": r}
    if uniform and hid > opt.diversity_high:
        sec.add("diversity", CRITICAL, f"High hidden-state diversity ({hid:.3f}) BUT uniform attention "
                f"(H/H_max {1 - nonuni:.3f}): architectural issue!", **figs)
    elif uniform:
        sec.add("diversity", INFO, f"Hidden states are similar ({hid:.3f} ≤ {opt.diversity_high:g}): "
                "uniform attention is expected", **figs)
    else:
        sec.add("diversity", OK, f"Attention is not uniform (1 − H/H_max {nonuni:.3f}) with hidden-state diversity "
                f"{hid:.3f}", **figs)
    sec.figures.update(figs, per_layer=per_layer, diversity_high=opt.diversity_high)
    return sec
