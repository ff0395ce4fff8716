"""[9/9] Ablation: does learned attention beat fixed patterns? Through the seam, for any model.

Every attention call of the model is overridden by a pattern from ``attnkit.seam.mods.PATTERNS``
(no model edit, so nothing is ever skipped): ``uniform`` (β_ij = 1/n over visible keys),
``local`` (uniform over |i − j| ≤ w, w = 5 by default) and
``first_token`` (all mass on the first visible key), against ``learned`` (the model as it
is). Masks are kept: a causal model stays causal.

Language models: loss = mean next-token NLL over every predicted token of the held-out blocks
(summed in float64), perplexity = exp(loss). Learned attention "clearly helps" when a pattern's
loss is at least 0.05 nats higher (≈ 5 % perplexity).

Encoders without a language-model head (MiniLM): there is no loss to compare, so the ablation
measures how far the outputs move: the mean cosine similarity of each token's final hidden
state to the learned one, and of the mean-pooled sentence embedding to the learned one.
Attention "makes no difference" when 1 − cosine stays below 0.01 for both.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from attnkit.common.distributed import agree, rank_share, sum_over_ranks
from attnkit.seam.mods import PATTERNS, local_pattern
from attnkit.seam import attach
from attnkit.validate.context import Context
from attnkit.validate.types import CRITICAL, INFO, OK, WARN, Section

VARIANTS = ("learned", "uniform", "local", "first_token")
DESCRIPTIONS = {
    "learned": "the model's own attention",
    "uniform": "1/n over every visible key",
    "local": "uniform over keys within {window} positions",
    "first_token": "all mass on the first visible key",
}


def _pattern(variant: str, window: int):
    return local_pattern(window) if variant == "local" else PATTERNS[variant]


def _forward(model, batch, variant, window=5):
    mask = torch.ones_like(batch)
    if variant == "learned":
        return model(input_ids=batch, attention_mask=mask)
    with attach(model, **_pattern(variant, window)):
        return model(input_ids=batch, attention_mask=mask)


def _hidden(out):
    h = getattr(out, "last_hidden_state", None)
    return h if h is not None else out[0]


@torch.no_grad()
def _run(ctx: Context) -> dict[str, dict]:
    """Every variant's loss (or output change) over the held-out blocks; under ``torchrun`` each rank
    runs its share of the blocks and the sums are pooled, so every rank returns the same figures."""
    env = ctx.env
    sums = agree(env, lambda: _sums_over_share(ctx, rank_share(ctx.ablation_ids, env)))
    pooled = dict(zip(sums, (sum_over_ranks(values, env) for values in sums.values())))
    results: dict[str, dict] = {}
    for variant, values in pooled.items():
        pattern = DESCRIPTIONS[variant].format(window=ctx.options.window)
        if ctx.causal_lm:
            total, count = values
            loss = total / max(count, 1)
            results[variant] = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(count),
                                "pattern": pattern}
        else:
            tok_cos, pooled_cos, tokens, sequences = values
            results[variant] = {"loss": None, "perplexity": None, "tokens": int(tokens),
                                "token_cosine": tok_cos / max(tokens, 1), "pooled_cosine": pooled_cos / max(sequences, 1),
                                "pattern": pattern}
    return results


def _sums_over_share(ctx: Context, blocks) -> dict[str, list[float]]:
    """Per variant, sums over ``blocks``: (NLL, predicted tokens) for a language model, else
    (token cosine, pooled cosine, tokens, sequences): sums add up over any split of the blocks."""
    model = ctx.model
    device = next(model.parameters()).device
    bs = ctx.options.batch_size
    starts = range(0, blocks.shape[0], bs)
    was_training = model.training
    model.eval()
    sums: dict[str, list[float]] = {}
    try:
        if ctx.causal_lm:
            for variant in VARIANTS:
                total, count = 0.0, 0
                for start in starts:
                    batch = blocks[start : start + bs].to(device)
                    logits = _forward(model, batch, variant, ctx.options.window).logits[:, :-1].float()
                    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
                    total += float(nll.double())
                    count += batch[:, 1:].numel()
                sums[variant] = [total, count]
        else:
            learned = [_hidden(_forward(model, blocks[start : start + bs].to(device), "learned")).float() for start in starts]
            for variant in VARIANTS:
                tok_cos, pooled_cos, tokens, sequences = 0.0, 0.0, 0, 0
                for k, start in enumerate(starts):
                    ref = learned[k]
                    if variant == "learned":
                        h = ref
                    else:
                        batch = blocks[start : start + bs].to(device)
                        h = _hidden(_forward(model, batch, variant, ctx.options.window)).float()
                    tok_cos += float(F.cosine_similarity(h, ref, dim=-1).double().sum())
                    pooled_cos += float(F.cosine_similarity(h.mean(1), ref.mean(1), dim=-1).double().sum())
                    tokens += h.shape[0] * h.shape[1]
                    sequences += h.shape[0]
                sums[variant] = [tok_cos, pooled_cos, tokens, sequences]
    finally:
        model.train(was_training)
    return sums


def ablation(ctx: Context) -> Section:
    opt = ctx.options
    sec = Section("ablation", "Ablation Study (Does Attention Help?)")
    res = _run(ctx)
    blocks = ctx.ablation_ids
    plural = "s" if blocks.shape[0] != 1 else ""
    shared = f", shared among {ctx.env.world_size} processes" if ctx.env.distributed else ""  # torchrun
    sec.notes.append(f"Held-out text: {ctx.data_source} — {blocks.shape[0]} block{plural} of {blocks.shape[1]} tokens{shared}")
    if ctx.causal_lm:
        base = res["learned"]["loss"]
        for variant, r in res.items():
            r["delta_loss"] = r["loss"] - base
            sec.notes.append(f"  {variant + ':':<13} loss={r['loss']:.4f}, PPL={r['perplexity']:.2f}"
                             + (f"  (Δloss {r['delta_loss']:+.4f})" if variant != "learned" else "")
                             + f"   [{r['pattern']}]")
        for variant in VARIANTS[1:]:
            r = res[variant]
            d = r["delta_loss"]
            label = {"uniform": "uniform", "local": "a local window", "first_token": "first-token-only"}[variant]
            msg = (f"learned loss {base:.4f} (PPL {res['learned']['perplexity']:.2f}) vs {variant} {r['loss']:.4f} "
                   f"(PPL {r['perplexity']:.2f}), Δ = {d:+.4f} nats")
            if d >= opt.ablation_margin:
                sec.add(f"vs_{variant}", OK, f"Learned attention beats {label}: {msg}", delta_loss=d)
            elif variant == "uniform":
                sec.add("vs_uniform", CRITICAL, f"Learned attention is no better than uniform: {msg}; "
                        "attention is not helping", delta_loss=d)
            else:
                sec.add(f"vs_{variant}", WARN, f"{label[0].upper() + label[1:]} does as well as learned attention or better: {msg}",
                        delta_loss=d)
        matters = res["uniform"]["delta_loss"] >= opt.ablation_margin
    else:
        sec.add("no_lm_head", INFO, f"{ctx.name} has no language-model head; ablation measured as output change "
                "(cosine of the final hidden states and of the mean-pooled embeddings to the learned ones; 1 = unchanged)")
        for variant, r in res.items():
            r["output_change"] = 1.0 - min(r["token_cosine"], r["pooled_cosine"])
            if variant != "learned":
                sec.notes.append(f"  {variant + ':':<13} token cos={r['token_cosine']:.4f}, pooled cos={r['pooled_cosine']:.4f}"
                                 f"   [{r['pattern']}]")
        u = res["uniform"]
        matters = u["output_change"] >= opt.output_change_margin
        msg = f"token cos {u['token_cosine']:.4f}, pooled cos {u['pooled_cosine']:.4f}"
        if matters:
            sec.add("vs_uniform", OK, f"Attention matters: with uniform attention the outputs move ({msg})",
                    output_change=u["output_change"])
        else:
            sec.add("vs_uniform", CRITICAL, f"Replacing attention by uniform barely changes the outputs ({msg}): "
                    "attention makes no difference", output_change=u["output_change"])
        for variant in VARIANTS[2:]:
            r = res[variant]
            sec.add(f"vs_{variant}", INFO, f"With {variant.replace('_', '-')} attention: token cos {r['token_cosine']:.4f}, "
                    f"pooled cos {r['pooled_cosine']:.4f}", output_change=r["output_change"])
    sec.figures.update(variants=res, attention_matters=matters, metric="loss" if ctx.causal_lm else "cosine",
                       blocks=int(blocks.shape[0]), block_tokens=int(blocks.shape[1]), data=ctx.data_source,
                       **({"processes": ctx.env.world_size} if ctx.env.distributed else {}))
    return sec
