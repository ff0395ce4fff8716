"""[4/9] Statistical tests against the uniform baseline.

- Deviation: mean |p_ij − 1/n_i| over visible keys, and the largest one ("mean dev").
- Entropy: mean normalised entropy H/ln n over rows that see at least 2 keys (1 = uniform).
- Significance, per head: d_i = 1 − H_i/ln n_i is the row's distance from uniform (0 exactly
  for uniform rows). One-sided one-sample t-test of H0: mean d ≤ m against H1: mean d > m, with
  m = 0.02 the "nearly uniform" margin (H/H_max > 0.98, so that 0.983 counts as "nearly uniform";
  a bare "≠ 0" test would call float rounding significant). Rows of a sequence are correlated,
  so the sample size is the AR(1) effective one (see ``stats.one_sided_t_test``). A head is
  significantly non-uniform when p < α / (number of heads) (Bonferroni, α = 0.01).
"""

from __future__ import annotations

import math

import torch

from attnkit.validate.context import Context
from attnkit.validate.stats import nanmean, one_sided_t_test
from attnkit.validate.types import CRITICAL, OK, WARN, Section

ENTROPY_CRITICAL, ENTROPY_WARN = 0.95, 0.85


def statistics(ctx: Context) -> Section:
    sec = Section("statistics", "Statistical Tests")
    opt = ctx.options
    heads, dev_sum, dev_count, dev_max, ne_all = [], 0.0, 0, 0.0, []
    for lv in ctx.captured.layers:
        p, a = lv.probs.double(), lv.allowed
        n = lv.n_visible.clamp_min(1).double()[..., None]
        dev = ((p - 1.0 / n).abs() * a)
        dev_sum += float(dev.sum())
        dev_count += int(a.sum())
        dev_max = max(dev_max, float(dev.max()))
        ne = lv.normalized_entropy  # (B, H, Q)
        ne_all.append(ne.flatten())
        for h in range(lv.num_heads):
            test = one_sided_t_test(1.0 - ne[:, h], opt.uniform_margin)
            heads.append({"layer": lv.layer, "head": h, "normalized_entropy": nanmean(ne[:, h]), **test})
    total = len(heads)
    threshold = opt.alpha / max(total, 1)
    for h in heads:
        h["significant"] = bool(h["p_value"] < threshold) if not math.isnan(h["p_value"]) else False
    n_sig = sum(h["significant"] for h in heads)
    mean_dev = dev_sum / max(dev_count, 1)
    mean_ne = nanmean(torch.cat(ne_all)) if ne_all else math.nan

    test_desc = (f"one-sided t-test of 1 − H/H_max > {opt.uniform_margin:g} per head, "
                 f"Bonferroni α = {opt.alpha:g}/{total}")
    if n_sig == 0:
        sec.add("vs_uniform", CRITICAL, f"Nearly uniform: no head differs significantly from uniform "
                f"(mean dev: {mean_dev:.4f}, max: {dev_max:.4f}; {test_desc})",
                significant_heads=0, heads=total, mean_dev=mean_dev, max_dev=dev_max)
    elif n_sig < total / 2:
        sec.add("vs_uniform", WARN, f"Only {n_sig}/{total} heads differ significantly from uniform "
                f"(mean dev: {mean_dev:.4f}, max: {dev_max:.4f}; {test_desc})",
                significant_heads=n_sig, heads=total, mean_dev=mean_dev, max_dev=dev_max)
    else:
        sec.add("vs_uniform", OK, f"{n_sig}/{total} heads differ significantly from uniform "
                f"(mean dev: {mean_dev:.4f}, max: {dev_max:.4f}; {test_desc})",
                significant_heads=n_sig, heads=total, mean_dev=mean_dev, max_dev=dev_max)
    if math.isnan(mean_ne):
        sec.add("entropy", WARN, "No row sees two keys or more: entropy not measured")
    elif mean_ne >= ENTROPY_CRITICAL:
        sec.add("entropy", CRITICAL, f"Nearly uniform (H/H_max: {mean_ne:.3f})", normalized_entropy=mean_ne)
    elif mean_ne >= ENTROPY_WARN:
        sec.add("entropy", WARN, f"Broad attention (H/H_max: {mean_ne:.3f})", normalized_entropy=mean_ne)
    else:
        sec.add("entropy", OK, f"Structured attention (H/H_max: {mean_ne:.3f}; 0 = one key, 1 = uniform)",
                normalized_entropy=mean_ne)
    sec.figures.update(mean_dev=mean_dev, max_dev=dev_max, normalized_entropy=mean_ne, significant_heads=n_sig,
                       heads_tested=total, alpha=opt.alpha, bonferroni_threshold=threshold, margin=opt.uniform_margin,
                       test="one-sided one-sample t-test of 1 - H/ln(n) against the margin, AR(1) effective n",
                       per_head=heads)
    return sec
