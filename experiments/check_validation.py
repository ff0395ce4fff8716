"""Validation of ``attnkit check``'s predictions (issue 10): does the check, from the config alone,
say which small models break in fp16 / bf16?

For each configuration (GPT-2- and Llama-shaped, eager attention; head dim, heads, sequence length,
temperature and a weight scale X on W_q and W_k emulating training growth, logits x X^2 — all drawn
from a fixed grid by a seeded generator), the same weights run forward and backward on real text
(KJV test split, the reference tokenizer) in fp32 and in fp16 / bf16. Observed "unsafe" for a
(configuration, dtype) case: any non-finite loss, attention weight or gradient; or an attention
weight that moves by more than 10 % relative to fp32 (weights >= 0.01 of the fp32 run: the
check's tolerance, ``attnkit.check.dtypes.DISTORTION_TOLERANCE``); or a loss that moves by more
than 2 %. Predicted "unsafe" = ``attnkit.check(config, seq_len, dtype, temperature, weight_growth)``
says "unsafe" (primary rule; "marginal" counted as unsafe is reported as a second rule).

    python experiments/check_validation.py --out runs/check_validation
    python experiments/check_validation.py --out runs/check_validation --configs 4   # smoke run
    python experiments/check_validation.py --out runs/check_boundary --seed 2 --configs 60 --near-boundary
    python experiments/check_validation.py --out runs/check_depth4 --seed 3 --configs 48 --near-boundary --layers 4

Writes results.json (every case with its figures), summary.md (confusion tables, every miss and
false alarm) and validation.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

PROB_TOLERANCE = 0.10  # the check's DISTORTION_TOLERANCE (asserted below)
PROB_FLOOR = 0.01  # relative errors are taken on weights the fp32 run gives at least this
LOSS_TOLERANCE = 0.02
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def make_config(family: str, hidden: int, head_dim: int, layers: int, seq_len: int) -> dict:
    heads = hidden // head_dim
    if family == "gpt2":
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 1024, "n_embd": hidden,
                "n_head": heads, "n_layer": layers, "n_positions": max(seq_len, 64), "initializer_range": 0.02,
                "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0}
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 1024, "hidden_size": hidden,
            "num_attention_heads": heads, "num_key_value_heads": heads, "head_dim": head_dim,
            "num_hidden_layers": layers, "intermediate_size": 2 * hidden, "max_position_embeddings": max(seq_len, 64),
            "initializer_range": 0.02, "rope_theta": 10000.0, "attention_dropout": 0.0}


def build_model(config: dict, growth: float, temperature: float, seed: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    from attnkit.seam.layouts import qk_layout

    cfg = AutoConfig.for_model(**dict(config))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    for module in model.modules():
        if type(module).__name__ in ("GPT2Attention", "LlamaAttention"):
            layout = qk_layout(module)
            for h in range(layout.num_heads):
                layout.scale_query(h, growth)
            for g in range(layout.num_kv_heads):
                layout.scale_key(g, growth)
            module.scaling = module.scaling / temperature  # temperature: logits / T
    return model


def run_case(model, ids, dtype):
    """loss, attention weights per layer (float32), gradients finite?, for ``model`` cast to ``dtype``."""
    import copy

    m = copy.deepcopy(model).to(dtype)
    # Module.to() also rounds RoPE's frequency buffer (inv_freq), which from_pretrained(dtype=...) and
    # autocast keep in fp32: angles = position x rounded frequency are then off by up to T 2^-s rad
    # (q's relative error 1.3e-2 instead of 4.8e-4 in fp16 at T = 256). Keep it as a real load does.
    for (name, buffer), (_, original) in zip(m.named_buffers(), model.named_buffers()):
        if name.endswith("inv_freq"):
            buffer.data = original.data.clone()
    m.zero_grad(set_to_none=True)
    out = m(input_ids=ids, labels=ids, output_attentions=True)
    out.loss.backward()
    grads_finite = all(torch.isfinite(p.grad).all().item() for p in m.parameters() if p.grad is not None)
    attentions = [a.detach().float() for a in out.attentions]
    return float(out.loss.detach().float()), attentions, grads_finite


def observe(ref, low) -> dict:
    ref_loss, ref_att, _ = ref
    loss, att, grads_finite = low
    finite = math.isfinite(loss) and grads_finite and all(torch.isfinite(a).all().item() for a in att)
    worst_prob = 0.0
    for a_ref, a in zip(ref_att, att):
        keep = a_ref >= PROB_FLOOR
        if keep.any():
            rel = ((a - a_ref).abs() / a_ref)[keep]
            rel = torch.nan_to_num(rel, nan=math.inf)
            worst_prob = max(worst_prob, float(rel.max()))
    loss_err = abs(loss - ref_loss) / abs(ref_loss) if math.isfinite(loss) else math.inf
    unsafe = (not finite) or worst_prob > PROB_TOLERANCE or loss_err > LOSS_TOLERANCE
    reasons = [r for r, hit in (("non-finite", not finite), (f"prob error > {PROB_TOLERANCE:g}", worst_prob > PROB_TOLERANCE),
                                (f"loss error > {LOSS_TOLERANCE:g}", loss_err > LOSS_TOLERANCE)) if hit]
    largest = max(float(a.abs().max()) for a in ref_att) if ref_att else 0.0
    return {"finite": finite, "prob_error": worst_prob, "loss_error": loss_err, "loss": loss, "ref_loss": ref_loss,
            "unsafe": unsafe, "reasons": reasons, "max_attention": largest}


def measured_logits(model, ids) -> dict:
    """The fp32 run's largest logit and |q.k| through the seam (what the check predicts)."""
    from attnkit.seam import AttentionSession, StatsCollector, observe_forward

    collector = StatsCollector()
    observe_forward(model, AttentionSession(taps=[collector]), input_ids=ids)
    heads = collector.heads()
    return {"logit_max": max(h["logit_max"] for h in heads), "qk_absmax": max(h["qk_absmax"] for h in heads)}


def draw_configs(n: int, seed: int, near_boundary: bool = False, layers: int = 2) -> list[dict]:
    """``near_boundary``: instead of a growth drawn log-uniformly in 1..400x, one that puts the
    check's predicted largest logit log-uniformly in 1.5..200, the decade around both formats'
    limits (6.1 bf16, 48.8 fp16), where a wrong threshold shows."""
    rng = random.Random(seed)
    configs = []
    for i in range(n):
        family = "gpt2" if i % 2 == 0 else "llama"
        head_dim = rng.choice([16, 32, 64])
        hidden = rng.choice([h for h in (64, 128, 256) if h >= 2 * head_dim or h == head_dim * 2])
        seq_len = rng.choice([64, 128, 256])
        temperature = rng.choice([0.5, 1.0, 1.0, 2.0])
        growth = round(10 ** rng.uniform(0.0, math.log10(400.0)), 2)  # 1x .. 400x: init to far past fp16's limit
        if near_boundary:
            from attnkit.check import check

            target = 10 ** rng.uniform(math.log10(1.5), math.log10(200.0))
            at_one = check(make_config(family, hidden, head_dim, layers, seq_len), seq_len=seq_len, temperature=temperature,
                           regions=False).init[0].estimate.model_max
            growth = round(max(1.0, math.sqrt(target / at_one)), 2)
        configs.append({"id": i, "family": family, "hidden": hidden, "head_dim": head_dim, "heads": hidden // head_dim,
                        "layers": layers, "seq_len": seq_len, "temperature": temperature, "growth": growth})
    return configs


def confusion(cases, key: str) -> dict:
    tp = sum(c["predicted"][key] and c["observed"]["unsafe"] for c in cases)
    fp = sum(c["predicted"][key] and not c["observed"]["unsafe"] for c in cases)
    fn = sum((not c["predicted"][key]) and c["observed"]["unsafe"] for c in cases)
    tn = sum((not c["predicted"][key]) and not c["observed"]["unsafe"] for c in cases)
    precision = tp / (tp + fp) if tp + fp else float("nan")
    recall = tp / (tp + fn) if tp + fn else float("nan")
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn, "precision": precision, "recall": recall}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/check_validation")
    ap.add_argument("--configs", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--near-boundary", action="store_true", help="growths that put the predicted logit near the limits")
    ap.add_argument("--layers", type=int, default=2, help="layers of every configuration (errors grow with depth)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from attnkit.check import DISTORTION_TOLERANCE, check
    from attnkit.check.measure import sample_ids
    from attnkit.common.loading.registry import load_model

    assert PROB_TOLERANCE == DISTORTION_TOLERANCE
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_model("reference").tokenizer
    text_ids = sample_ids(tokenizer, 256)
    cases = []
    start = time.time()
    for cfg in draw_configs(args.configs, args.seed, args.near_boundary, args.layers):
        config = make_config(cfg["family"], cfg["hidden"], cfg["head_dim"], cfg["layers"], cfg["seq_len"])
        ids = text_ids[:, :cfg["seq_len"]]
        model = build_model(config, cfg["growth"], cfg["temperature"], seed=cfg["id"])
        ref = run_case(model, ids, torch.float32)
        measured = measured_logits(model, ids)
        for dt, torch_dtype in DTYPES.items():
            report = check(config, seq_len=cfg["seq_len"], dtype=dt, temperature=cfg["temperature"],
                           weight_growth=cfg["growth"], regions=False)
            est = report.init[0].estimate
            verdict = report.init[0].verdicts[dt]
            observed = observe(ref, run_case(model, ids, torch_dtype))
            case = {**cfg, "dtype": dt, "observed": observed, "measured_fp32": measured,
                    "predicted": {"status": verdict.status, "unsafe": verdict.status == "unsafe",
                                  "unsafe_or_marginal": verdict.status != "safe", "largest_logit": est.model_max,
                                  "largest_logit_99": est.model_max_high, "raw_absmax": est.raw_absmax,
                                  "distortion": verdict.distortion,
                                  "findings": {f.kind: f.status for f in verdict.findings}}}
            cases.append(case)
            print(f"[{time.time() - start:6.0f}s] #{cfg['id']:2d} {cfg['family']:5s} h{cfg['hidden']} d{cfg['head_dim']} "
                  f"T{cfg['seq_len']} tau{cfg['temperature']:g} X{cfg['growth']:g} {dt}: predicted {verdict.status:8s} "
                  f"(logit {est.model_max:.3g}, measured {measured['logit_max']:.3g}) observed "
                  f"{'UNSAFE' if observed['unsafe'] else 'safe'} (prob err {observed['prob_error']:.3g}, "
                  f"loss err {observed['loss_error']:.2g}, finite {observed['finite']})", flush=True)
        (out / "results.json").write_text(json.dumps({"cases": cases}, indent=1, default=str))
    summary = {"primary (unsafe)": confusion(cases, "unsafe"), "unsafe or marginal": confusion(cases, "unsafe_or_marginal")}
    for dt in DTYPES:
        summary[f"{dt} (unsafe)"] = confusion([c for c in cases if c["dtype"] == dt], "unsafe")
    (out / "results.json").write_text(json.dumps({"summary": summary, "cases": cases,
                                                  "tolerances": {"prob": PROB_TOLERANCE, "prob_floor": PROB_FLOOR,
                                                                 "loss": LOSS_TOLERANCE}}, indent=1, default=str))
    write_summary(out, summary, cases)
    plot(out, cases)
    print(json.dumps(summary, indent=1))


def _row(c) -> str:
    o, p = c["observed"], c["predicted"]
    return (f"| {c['id']} | {c['family']} | {c['hidden']} | {c['head_dim']}x{c['heads']} | {c['seq_len']} | "
            f"{c['temperature']:g} | {c['growth']:g} | {c['dtype']} | {p['status']} | {p['largest_logit']:.3g} | "
            f"{c['measured_fp32']['logit_max']:.3g} | {p['raw_absmax']:.4g} | {c['measured_fp32']['qk_absmax']:.4g} | "
            f"{o['prob_error']:.3g} | {o['loss_error']:.2g} | {'yes' if o['finite'] else 'NO'} | "
            f"{', '.join(o['reasons']) or '-'} |")


def write_summary(out: Path, summary: dict, cases: list) -> None:
    head = ("| # | family | hidden | d x heads | T | temp | growth X | dtype | predicted | pred. largest logit | "
            "measured largest logit (fp32) | pred. max abs(q.k) | measured max abs(q.k) | prob error | loss error | finite | observed |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = ["# attnkit check: validation", "", "| rule | TP | FP | FN | TN | precision | recall |", "|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        lines.append(f"| {name} | {s['tp']} | {s['fp']} | {s['fn']} | {s['tn']} | {s['precision']:.2f} | {s['recall']:.2f} |")
    misses = [c for c in cases if c["observed"]["unsafe"] and not c["predicted"]["unsafe"]]
    alarms = [c for c in cases if c["predicted"]["unsafe"] and not c["observed"]["unsafe"]]
    for title, rows in (("Misses (observed unsafe, predicted not)", misses), ("False alarms (predicted unsafe, observed safe)", alarms),
                        ("All cases", cases)):
        lines += ["", f"## {title}: {len(rows)}", "", head] + [_row(c) for c in rows]
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def plot(out: Path, cases: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    from attnkit.check.dtypes import FORMATS

    for ax, dt in ((axes[0], "fp16"), (axes[1], "bf16")):
        limit = FORMATS[dt].largest_tolerated_logit()
        sub = [c for c in cases if c["dtype"] == dt]
        for c in sub:
            o, p = c["observed"], c["predicted"]
            y = o["prob_error"] if o["finite"] else 50.0
            color = "#cf222e" if o["unsafe"] else "#1a7f37"
            marker = "o" if p["unsafe"] == o["unsafe"] else "X"
            ax.scatter(max(p["largest_logit"], 1e-2), max(y, 1e-5), c=color, marker=marker, s=60 if marker == "X" else 30,
                       edgecolors="black" if marker == "X" else "none")
        ax.axvline(limit, color="gray", ls="--", lw=1)
        ax.axhline(PROB_TOLERANCE, color="gray", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("predicted largest logit (attnkit check, from the config)")
        ax.set_ylabel("observed largest relative error of a weight vs fp32\n(50 = non-finite)")
        ax.set_title(f"{dt}: dashed = the check's rounding limit {limit:.3g}" + (", overflow past" if dt == "fp16" else ""), fontsize=9)
    fig.suptitle("red = observed unsafe, green = safe; X = prediction wrong", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "validation.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
