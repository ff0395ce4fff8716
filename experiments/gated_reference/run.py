"""The gated-attention paper's claims at toy scale: the reference model's architecture (GPT-2, 4 layers,
4 heads of 32, width 128, context 128, its 1,024-symbol BPE) trained from the same initialisation
without gates and with headwise / elementwise G1 gates (attnkit.gate.add_gates; identity at init),
on the KJV train split, same batches, a short budget; at each learning rate.

    python experiments/gated_reference/run.py --out runs/gated_reference --steps 300 --lrs 1.5e-3,1e-2

Measured on 32 validation blocks at the end: loss / perplexity, first-token attention share (sink_mass,
mean over heads, from the seam), largest |hidden state| over layers, mean gate and share below 0.1,
wall time per step. Writes OUT/results.json.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/gated_reference")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lrs", default="1.5e-3,1e-2")
    p.add_argument("--kinds", default="none,headwise,elementwise")
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args()
    torch.set_num_threads(1)
    from transformers import GPT2Config, GPT2LMHeadModel

    from attnkit.common.data import encode_documents, load_corpus, random_blocks, split_blocks
    from attnkit.gate import GateStats, add_gates
    from attnkit.common.loading.registry import load_model
    from attnkit.perplexity import evaluate_perplexity
    from attnkit.seam import attach
    from attnkit.seam.taps import StatsCollector

    tok = load_model("reference").tokenizer
    corpus = load_corpus("kjv")
    train_ids = encode_documents(tok, corpus.splits["train"])
    val = split_blocks(encode_documents(tok, corpus.splits["validation"]), 128)[:32]
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"args": vars(args), "runs": []}
    for lr in [float(x) for x in args.lrs.split(",")]:
        for kind in args.kinds.split(","):
            torch.manual_seed(args.seed)
            cfg = GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=128, n_layer=4, n_head=4, resid_pdrop=0.0,
                             embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=eot, eos_token_id=eot, pad_token_id=eot)
            model = GPT2LMHeadModel._from_config(cfg, attn_implementation="sdpa")
            if kind != "none":
                add_gates(model, kind)
            opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
            gen = torch.Generator().manual_seed(args.seed)
            losses, t0 = [], time.time()
            model.train()
            for step in range(args.steps):
                for g in opt.param_groups:  # 10 % warmup, then constant
                    g["lr"] = lr * min(1.0, (step + 1) / max(1, args.steps // 10))
                x = random_blocks(train_ids, 128, args.batch, gen)
                loss = model(input_ids=x, labels=x).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                losses.append(float(loss.detach()))
            seconds = time.time() - t0
            model.eval()
            ppl = evaluate_perplexity(model, val, batch_size=8)
            stats = StatsCollector()
            blocks = torch.stack(val[:8])
            with torch.no_grad(), attach(model, taps=[stats]):
                hs = model(input_ids=blocks, output_hidden_states=True).hidden_states
            heads = stats.heads()
            tail, head = losses[-50:], losses[:50]
            row = {"kind": kind, "lr": lr, "val_loss": ppl.nll, "val_perplexity": ppl.perplexity,
                   "train_loss_last50": sum(tail) / len(tail), "diverged": not math.isfinite(losses[-1]) or
                   sum(tail) / len(tail) > sum(head) / len(head),
                   "first_token_share": sum(h["sink_mass"] for h in heads) / len(heads),
                   "max_activation": max(float(h.abs().max()) for h in hs[1:]),
                   "seconds_per_step": seconds / args.steps}
            if kind != "none":
                with torch.no_grad(), GateStats(model) as gs:
                    model(input_ids=blocks)
                row.update({"mean_gate": gs.summary()["mean_gate"], "share_below_0_1": gs.summary()["share_below_0_1"]})
            results["runs"].append(row)
            print(json.dumps(row), flush=True)
            (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
