"""[3/9] Token-level patterns, with the model's own tokenizer.

- Repetition: for rows that see both, the mean weight per earlier/other occurrence of the
  query's own token (same id, not itself) against the mean weight per other visible key.
- Special tokens and punctuation: mean weight per special-or-punctuation key against per regular
  key. "Special" is the tokenizer's own list (``all_special_ids``: [CLS], [SEP], <|endoftext|>,
  ...); punctuation is any token whose text is only punctuation or symbols.
- Special-token heads: heads whose mean mass on the tokenizer's special tokens is at least 0.5
  (BERT-family models are known to park attention on [CLS]/[SEP]); the same for punctuation.
- Copying (induction, Olsson et al. 2022): for rows whose token occurred before, the mass on the
  keys that *followed* an earlier occurrence (the token to copy next), per head; a head putting
  at least 0.2 of such rows' mass there, and 5x what uniform attention would, is an induction
  head. Attention to the repeated token itself (above) is a duplicate-token head's pattern; this
  is the one in-context copying needs.
Every ratio is 1.0 for uniform attention.
"""

from __future__ import annotations

import math

import torch

from attnkit.validate.context import Context
from attnkit.validate.positional import per_key_means
from attnkit.validate.stats import nanmean
from attnkit.validate.types import INFO, OK, Section

ATTRACT = 1.1
MOST_MASS = 0.5
# An induction head: mean mass on the keys that followed an earlier occurrence of the query's token
# at least INDUCTION_MASS and INDUCTION_LIFT times what uniform attention puts there (their share of
# the visible keys; on natural text several such keys often exist, so the mass is spread over them).
INDUCTION_MASS = 0.2
INDUCTION_LIFT = 5.0


def _top_heads(found: list[tuple[float, int, int]], ellipsis: bool = True) -> str:
    """"L3H2 0.29, L3H3 0.27" for the first 8 of ``found`` ((value, layer, head), largest first)."""
    top = ", ".join(f"L{l}H{h} {v:.2f}" for v, l, h in found[:8])
    return top + (" …" if ellipsis and len(found) > 8 else "")


def _head_dicts(found: list[tuple[float, int, int]]) -> list[dict]:
    return [{"layer": l, "head": h, "mass": v} for v, l, h in found]


def _ratio_msg(a: float, b: float) -> tuple[float, str]:
    r = a / b if b > 0 else math.inf
    return r, f"{r:.2f}x"


def tokens(ctx: Context) -> Section:
    sec = Section("tokens", "Token-Level Patterns")
    cap = ctx.captured
    ids = cap.input_ids  # (B, T)
    B, T = ids.shape
    same = ids[:, :, None] == ids[:, None, :]  # (B, Q, K), query i vs key j
    not_self = ~torch.eye(T, dtype=torch.bool)[None]
    special = torch.zeros_like(ids, dtype=torch.bool)
    punct = torch.zeros_like(ids, dtype=torch.bool)
    for i in cap.special_ids:
        special |= ids == i
    for i in cap.punctuation_ids:
        punct |= ids == i
    marked = (special | punct)[:, None, None, :]  # (B, 1, 1, K)

    # follows[b, i, j]: key j comes right after an earlier occurrence of query i's token (j - 1 < i, j != i).
    follows = torch.zeros_like(same)
    follows[:, :, 1:] = same[:, :, :-1] & (torch.arange(T - 1)[None, None, :] < torch.arange(T)[None, :, None])
    follows &= not_self
    copy_rows = follows.any(-1)  # (B, Q): rows with something to copy

    same_m, diff_m, mark_m, reg_m = [], [], [], []
    head_special, head_punct, head_copy, head_copy_chance, labels = [], [], [], [], []
    for lv in cap.layers:
        p, a = lv.probs, lv.allowed
        s = per_key_means(p, a, (same & not_self)[:, None])
        d = per_key_means(p, a, (~same & not_self)[:, None])
        both = ~(torch.isnan(s) | torch.isnan(d))
        same_m.append(s[both])
        diff_m.append(d[both])
        mk = per_key_means(p, a, marked)
        rg = per_key_means(p, a, ~marked)
        both = ~(torch.isnan(mk) | torch.isnan(rg))
        mark_m.append(mk[both])
        reg_m.append(rg[both])
        seen = lv.n_visible > 0
        sp_mass = (p * special[:, None, None, :]).sum(-1)  # (B, H, Q)
        pu_mass = (p * punct[:, None, None, :]).sum(-1)
        cp_mass = (p * (follows[:, None] & a)).sum(-1)  # (B, H, Q)
        cp_chance = (follows[:, None] & a).sum(-1) / lv.n_visible.clamp_min(1)  # uniform attention's mass there
        for h in range(lv.num_heads):
            head_special.append(float(sp_mass[:, h][seen[:, h]].mean()) if seen[:, h].any() else math.nan)
            head_punct.append(float(pu_mass[:, h][seen[:, h]].mean()) if seen[:, h].any() else math.nan)
            rows = seen[:, h] & copy_rows
            head_copy.append(float(cp_mass[:, h][rows].mean()) if rows.any() else math.nan)
            head_copy_chance.append(float(cp_chance[:, h][rows].mean()) if rows.any() else math.nan)
            labels.append((lv.layer, h))

    # repetition
    sm, dm = (nanmean(torch.cat(same_m)), nanmean(torch.cat(diff_m))) if same_m else (math.nan, math.nan)
    if math.isnan(sm):
        sec.add("repetition", INFO, "No repeated tokens in the sample: repetition test skipped")
        rep_ratio = math.nan
    else:
        rep_ratio, rs = _ratio_msg(sm, dm)
        msg = f"(same: {sm:.4f}, diff: {dm:.4f}, ratio: {rs})"
        if rep_ratio >= ATTRACT:
            sec.add("repetition", OK, f"Repeated tokens attract {msg}", same=sm, diff=dm, ratio=rep_ratio)
        else:
            sec.add("repetition", INFO, f"Repeated tokens do not attract more than others {msg}", same=sm, diff=dm, ratio=rep_ratio)

    # special tokens + punctuation against regular tokens
    km, rm = (nanmean(torch.cat(mark_m)), nanmean(torch.cat(reg_m))) if mark_m else (math.nan, math.nan)
    names = sorted(cap.special_names.values())
    kinds = "special token" + (f" ({', '.join(names)})" if names else "") + " / punctuation"
    if math.isnan(km):
        sec.add("special_attention", INFO, "No special tokens or punctuation in the sample")
        sp_ratio = math.nan
    else:
        sp_ratio, rs = _ratio_msg(km, rm)
        sec.add("special_attention", OK if sp_ratio >= 1.5 else INFO,
                f"{kinds[0].upper() + kinds[1:]} attention: {km:.4f} vs regular: {rm:.4f} (ratio: {rs})",
                special=km, regular=rm, ratio=sp_ratio)

    # heads that park most of their mass on special tokens / punctuation
    total = len(labels)
    special_heads = sorted(((v, l, h) for (l, h), v in zip(labels, head_special) if v >= MOST_MASS), reverse=True)
    punct_heads = sorted(((v, l, h) for (l, h), v in zip(labels, head_punct) if v >= MOST_MASS), reverse=True)
    share = float(special.float().mean())
    if cap.special_ids:
        if special_heads:
            sec.add("special_heads", OK,
                    f"{len(special_heads)}/{total} heads put most of their mass (≥ {MOST_MASS:g}) on special tokens "
                    f"{'/'.join(names)} (they are {share:.1%} of the tokens): {_top_heads(special_heads)}",
                    count=len(special_heads), heads=_head_dicts(special_heads))
        else:
            best = max(head_special) if head_special else math.nan
            sec.add("special_heads", INFO, f"No head puts most of its mass on special tokens {'/'.join(names)} "
                    f"(largest mean mass: {best:.2f}; they are {share:.1%} of the tokens)", count=0, heads=[])
    else:
        sec.add("special_heads", INFO, "The sample has no special tokens of the tokenizer (it adds none to plain text)",
                count=0, heads=[])
    # copying: heads that attend to what followed an earlier occurrence of the current token
    copy_heads = sorted(((v, l, h) for (l, h), v, c in zip(labels, head_copy, head_copy_chance)
                         if v >= INDUCTION_MASS and v >= INDUCTION_LIFT * c), reverse=True)
    chance = nanmean(torch.tensor(head_copy_chance)) if head_copy_chance else math.nan
    n_copy_rows = int(copy_rows.sum())
    if n_copy_rows == 0:
        sec.add("induction_heads", INFO, "No token repeats in the sample: the copying (induction) test is skipped",
                count=0, heads=[])
    elif copy_heads:
        sec.add("induction_heads", OK,
                f"{len(copy_heads)}/{total} heads copy (induction): on the {n_copy_rows} rows whose token occurred "
                f"before, ≥ {INDUCTION_MASS:g} of their mass (uniform: {chance:.2f}) is on the token that followed it: "
                f"{_top_heads(copy_heads)}", count=len(copy_heads), heads=_head_dicts(copy_heads))
    else:
        best = max((v for v in head_copy if not math.isnan(v)), default=math.nan)
        sec.add("induction_heads", INFO,
                f"No induction head: on the {n_copy_rows} rows whose token occurred before, no head puts "
                f"{INDUCTION_MASS:g} of its mass and {INDUCTION_LIFT:g}x uniform's ({chance:.2f}) on the token that "
                f"followed (largest: {best:.2f})", count=0, heads=[])
    if punct_heads:
        sec.notes.append(f"Heads with most of their mass on punctuation: {len(punct_heads)}/{total} — "
                         f"{_top_heads(punct_heads, ellipsis=False)}")
    sec.figures.update(
        repetition_ratio=rep_ratio, special_ratio=sp_ratio, special_tokens=names,
        special_token_share=share, punctuation_share=float(punct.float().mean()),
        special_heads=_head_dicts(special_heads),
        punctuation_heads=_head_dicts(punct_heads),
        head_special_mass=[{"layer": l, "head": h, "mass": v} for (l, h), v in zip(labels, head_special)],
        induction_heads=_head_dicts(copy_heads),
        head_induction_mass=[{"layer": l, "head": h, "mass": v} for (l, h), v in zip(labels, head_copy)],
    )
    return sec
