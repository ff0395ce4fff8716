"""[5/9] Per-head classification: sharp / medium / uniform.

Classified on the head's mean normalised entropy ν = H/ln n (rows seeing ≥ 2 keys):
sharp when ν < 0.5 (the head spreads over fewer than √n keys), uniform when ν ≥ 0.9 (over
more than n^0.9 keys), medium in between. row_std (the std of a row's weights) and the
effective number of keys exp(H) are shown beside it; row_std is not used to classify because
it shrinks with 1/n and so depends on the sequence length.
"""

from __future__ import annotations

import math

import torch

from attnkit.validate.context import Context
from attnkit.validate.stats import nanmean
from attnkit.validate.types import INFO, OK, WARN, Section

SHARP, MEDIUM, UNIFORM = "sharp", "medium", "uniform"
LIST_LIMIT = 16  # per-head lines up to this many heads, a grid beyond


def classify(nu: float, sharp_below: float, uniform_above: float) -> str:
    if math.isnan(nu):
        return UNIFORM
    return SHARP if nu < sharp_below else UNIFORM if nu >= uniform_above else MEDIUM


def heads(ctx: Context) -> Section:
    opt = ctx.options
    sec = Section("heads", "Per-Head Analysis")
    rows = []
    for lv in ctx.captured.layers:
        seen = lv.n_visible >= 2
        for h in range(lv.num_heads):
            s = seen[:, h]
            nu = nanmean(lv.normalized_entropy[:, h])
            rows.append({
                "layer": lv.layer, "head": h, "normalized_entropy": nu,
                "effective_keys": float(torch.exp(lv.entropy[:, h][s]).mean()) if s.any() else math.nan,
                "visible_keys": float(lv.n_visible[:, h][s].float().mean()) if s.any() else math.nan,
                "row_std": float(lv.row_std[:, h][s].mean()) if s.any() else math.nan,
                "max_attention": float(lv.probs[:, h].amax(-1)[s].mean()) if s.any() else math.nan,
                "class": classify(nu, opt.sharp_below, opt.uniform_above),
            })
    total = len(rows)
    counts = {c: sum(r["class"] == c for r in rows) for c in (SHARP, MEDIUM, UNIFORM)}
    mark = {SHARP: "✓SHARP", MEDIUM: "⚠MEDIUM", UNIFORM: "❌UNIFORM"}
    sec.notes.append(f"Thresholds: sharp H/H_max < {opt.sharp_below:g} (fewer than √n keys), "
                     f"uniform H/H_max ≥ {opt.uniform_above:g} (more than n^{opt.uniform_above:g} keys), medium between")
    if total <= LIST_LIMIT:
        for r in rows:
            sec.notes.append(f"  L{r['layer']} H{r['head']:>2}: H/H_max={r['normalized_entropy']:.3f} "
                             f"eff.keys={r['effective_keys']:.1f}/{r['visible_keys']:.0f} row_std={r['row_std']:.4f} [{mark[r['class']]}]")
    else:
        letters = {SHARP: "S", MEDIUM: "m", UNIFORM: "·"}
        by_layer: dict[int, list[str]] = {}
        for r in rows:
            by_layer.setdefault(r["layer"], []).append(letters[r["class"]])
        sec.notes.append("  grid (S sharp, m medium, · uniform), heads left to right:")
        for layer, marks in by_layer.items():
            sec.notes.append(f"  L{layer:<2} {' '.join(marks)}")
    pct = {c: counts[c] / max(total, 1) for c in counts}
    sec.notes.append(f"Summary: {counts[SHARP]}/{total} sharp ({pct[SHARP]:.0%}), {counts[MEDIUM]}/{total} medium "
                     f"({pct[MEDIUM]:.0%}), {counts[UNIFORM]}/{total} uniform ({pct[UNIFORM]:.0%})")
    sharp = sorted((r for r in rows if r["class"] == SHARP), key=lambda r: r["normalized_entropy"])
    if sharp:
        names = ", ".join(f"L{r['layer']}H{r['head']} ({r['normalized_entropy']:.2f})" for r in sharp[:10])
        sec.add("sharp_heads", OK, f"{len(sharp)} sharp heads: {names}{' …' if len(sharp) > 10 else ''}",
                count=len(sharp))
    elif counts[UNIFORM] == total:
        sec.add("sharp_heads", WARN, f"Every head is uniform (H/H_max ≥ {opt.uniform_above:g})", count=0)
    else:
        sec.add("sharp_heads", INFO, f"No sharp head (H/H_max < {opt.sharp_below:g}); {counts[MEDIUM]} medium", count=0)
    ranked = sorted((r for r in rows if not math.isnan(r["normalized_entropy"])), key=lambda r: r["normalized_entropy"])
    if ranked and len(sharp) < 3:
        top = ", ".join(f"L{r['layer']}H{r['head']} (H/H_max {r['normalized_entropy']:.2f}, eff. {r['effective_keys']:.1f} "
                        f"of {r['visible_keys']:.0f} keys, top key {r['max_attention']:.2f})" for r in ranked[:3])
        sec.notes.append(f"Sharpest heads: {top}")
    sec.figures.update(counts=counts, total=total, sharp_below=opt.sharp_below, uniform_above=opt.uniform_above,
                       sharp=[f"L{r['layer']}H{r['head']}" for r in sharp],
                       sharpest=[f"L{r['layer']}H{r['head']}" for r in ranked[:5]], per_head=rows)
    return sec
