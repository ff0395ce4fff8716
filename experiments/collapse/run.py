"""Seed 000's collapse experiment: TransformerAE merging zoo CNNs, ungated vs gated, and recovery.

    python experiments/collapse/run.py --out runs/collapse            # the documented run
    python experiments/collapse/run.py --out /tmp/c --quick           # a 2-minute smoke run

1. A zoo of clients x seeds ZooCNNs (1232 parameters) on scikit-learn's 8x8 digits (cached in OUT/zoo.safetensors);
   seeds below --train-seeds train the AE, the rest give the fixed evaluation pairs.
2. For each seed: one TransformerAE initialisation; a copy gets gates (attnkit.gate.add_gates, --gate kind,
   identity at init: the same function). Both train on the merging objective with the same pair/image order.
3. Per epoch, on the evaluation pairs, through the seam (StatsCollector + MapCapture): normalised attention
   entropy H / ln 50 (analyze's definition: 1 = uniform, 0 = one key), mean |p - 0.02|, largest weight x 50;
   output uniqueness / diversity / Wasserstein distance between predictions; grad-norm statistics; merged
   accuracy (and the baselines: each input alone, plain weight averaging).
4. Recovery: the first ungated run's final checkpoint (OUT/collapsed/) continued ungated and gated.

Writes OUT/robustness_evaluation_results.json and the seed's PNGs (attention_entropy_comparison.png,
weight_uniqueness_analysis.png, gated_vs_ungated_comparison.png, gradient_norm_stability.png).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

from attnkit.gate import GateStats, add_gates
from attnkit.models.cnn_zoo import Zoo, build_zoo, digits
from attnkit.models.merging import (Pairs, diversity, merge_loss, pair_accuracy, sample_pairs, uniqueness,
                                    wasserstein)
from attnkit.models.transformer_ae import N_TOKENS, AEConfig, TransformerAE
from attnkit.seam import attach
from attnkit.seam.taps import MapCapture, StatsCollector


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/collapse")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--steps", type=int, default=40, help="steps per epoch")
    p.add_argument("--batch", type=int, default=32, help="pairs per step")
    p.add_argument("--per-client", type=int, default=32, help="images per client per pair per step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip", type=float, default=0.0, help="grad-norm clip (0: none)")
    p.add_argument("--d-model", type=int, default=100)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--norm-first", action="store_true")
    p.add_argument("--qk-gain", type=float, default=1.0, help="multiply the initial W_q, W_k by this (sharper start)")
    p.add_argument("--embed-norm", action="store_true", help="LayerNorm the 50 token embeddings before the encoder")
    p.add_argument("--gate", default="mlp", help="gate kind (attnkit.gate.GATE_KINDS)")
    p.add_argument("--no-gated", action="store_true", help="ungated runs only (setting search)")
    p.add_argument("--recovery-epochs", type=int, default=15)
    p.add_argument("--recovery-lr", type=float, help="learning rate after the collapsed checkpoint (default: --lr)")
    p.add_argument("--zoo", help="zoo cache file (default: OUT/zoo_CxS.safetensors)")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--zoo-seeds", type=int, default=12)
    p.add_argument("--train-seeds", type=int, default=9, help="zoo seeds < this train the AE")
    p.add_argument("--eval-pairs", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    if a.quick:
        a.seeds, a.epochs, a.steps, a.recovery_epochs, a.zoo_seeds, a.train_seeds, a.eval_pairs = "0", 2, 5, 1, 2, 1, 16
    return a


def load_or_build_zoo(out: Path, args) -> tuple[Zoo, object]:
    from safetensors.torch import load_file, save_file

    data = digits(args.clients)
    path = Path(args.zoo) if args.zoo else out / f"zoo_{args.clients}x{args.zoo_seeds}.safetensors"
    if path.exists():
        t = load_file(path)
        return Zoo(t["weights"], t["client"], t["seed"], t["train_acc"], t["test_acc"]), data
    t0 = time.time()
    zoo = build_zoo(data, seeds=args.zoo_seeds)
    save_file({"weights": zoo.weights, "client": zoo.client, "seed": zoo.seed, "train_acc": zoo.train_acc,
               "test_acc": zoo.test_acc}, str(path))
    print(f"zoo: {len(zoo.client)} CNNs in {time.time() - t0:.0f} s, own-client test accuracy "
          f"{zoo.test_acc.mean():.3f} (min {zoo.test_acc.min():.3f})", flush=True)
    return zoo, data


def attention_metrics(model: TransformerAE, x: torch.Tensor) -> dict:
    stats, maps = StatsCollector(), MapCapture()
    was = model.training
    model.eval()
    with torch.no_grad(), attach(model, taps=[stats, maps]):
        pred = model(x)
    model.train(was)
    heads = stats.heads()
    dev = [float((m - 1.0 / N_TOKENS).abs().mean()) for m in maps.maps.values()]
    return {"pred": pred,
            "normalized_entropy": sum(h["normalized_entropy"] for h in heads) / len(heads),
            "normalized_entropy_min": min(h["normalized_entropy"] for h in heads),
            "max_over_uniform": sum(h["max_over_uniform"] for h in heads) / len(heads),
            "dist_from_uniform": sum(dev) / len(dev),  # mean |p - 0.02| over every map entry
            "heads": [{"layer": h["layer"], "head": h["head"], "normalized_entropy": h["normalized_entropy"],
                       "max_over_uniform": h["max_over_uniform"]} for h in heads]}


def evaluate(model, x_eval, pairs: Pairs, zoo, data, avg) -> dict:
    m = attention_metrics(model, x_eval)
    pred = m.pop("pred")
    out = {**m, "uniqueness": uniqueness(pred), "diversity": diversity(pred, avg), "wasserstein": wasserstein(pred),
           "merged_accuracy": float(pair_accuracy(pred, pairs, zoo, data).mean())}
    if any(True for _ in _gates(model)):
        model.eval()
        with torch.no_grad(), GateStats(model) as gs:
            model(x_eval)
        model.train()
        out["gates"] = gs.summary()
    return out


def _gates(model):
    from attnkit.gate import find_gates
    return find_gates(model)


def train(model, epochs: int, args, zoo, data, train_models, eval_ctx, seed: int, label: str, start_epoch: int = 0,
          lr: float | None = None):
    opt = torch.optim.AdamW(model.parameters(), lr=lr or args.lr, weight_decay=args.weight_decay)
    gen = torch.Generator().manual_seed(10_000 + seed)
    history = []
    if start_epoch == 0:
        history.append({"epoch": 0, **evaluate(model, *eval_ctx), "loss": None, "grad_norm": None})
    model.train()
    for epoch in range(start_epoch + 1, start_epoch + epochs + 1):
        t0, losses, norms = time.time(), [], []
        for _ in range(args.steps):
            pairs = sample_pairs(zoo, train_models, args.batch, gen)
            loss = merge_loss(model(pairs.inputs(zoo)), pairs, zoo, data, args.per_client, gen)
            opt.zero_grad()
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip if args.clip > 0 else float("inf"))
            opt.step()
            losses.append(float(loss.detach()))
            norms.append(float(norm))
        g = torch.tensor(norms)
        row = {"epoch": epoch, "loss": sum(losses) / len(losses),
               "grad_norm": {"mean": float(g.mean()), "std": float(g.std()), "min": float(g.min()), "max": float(g.max()),
                             "cv": float(g.std() / g.mean()) if g.mean() > 0 else float("nan")},
               **evaluate(model, *eval_ctx), "seconds": time.time() - t0}
        history.append(row)
        print(f"[{label} seed {seed}] epoch {epoch}: loss {row['loss']:.3f} H/ln50 {row['normalized_entropy']:.4f} "
              f"|p-0.02| {row['dist_from_uniform']:.5f} max*50 {row['max_over_uniform']:.3f} uniq {row['uniqueness']:.2f} "
              f"div {row['diversity']:.3f} W1 {row['wasserstein']:.4f} acc {row['merged_accuracy']:.3f} "
              f"|g| {row['grad_norm']['mean']:.3f}±{row['grad_norm']['std']:.3f} ({row['seconds']:.1f} s)", flush=True)
    return history


def scale_qk(model: TransformerAE, gain: float) -> None:
    """Initial W_q, W_k (and biases) times ``gain``: logits times gain² (through attnkit's QK layout)."""
    if gain == 1.0:
        return
    from attnkit.seam.layouts import qk_layout

    for block in model.blocks:
        layout = qk_layout(block.attn)
        for h in range(layout.num_heads):
            layout.scale_query(h, gain)
            layout.scale_key(h, gain)


def save_checkpoint(model: TransformerAE, directory: Path, pairs: torch.Tensor | None = None) -> None:
    """model.safetensors + ae_config.json; with ``pairs``, also analyzable.safetensors + probe_config.json for
    ``attnkit analyze attnkit.models.transformer_ae:probe`` (token id i = evaluation pair i)."""
    from dataclasses import asdict

    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"))
    (directory / "ae_config.json").write_text(json.dumps(asdict(model.config), indent=2) + "\n")
    if pairs is not None:
        save_file({**{f"ae.{k}": v for k, v in state.items()}, "pairs": pairs.contiguous()},
                  str(directory / "analyzable.safetensors"))
        (directory / "probe_config.json").write_text(json.dumps({**asdict(model.config), "num_pairs": len(pairs)}) + "\n")


def main() -> int:
    args = parse()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    zoo, data = load_or_build_zoo(out, args)
    train_models = torch.nonzero(zoo.seed < args.train_seeds).squeeze(1)
    eval_models = torch.nonzero(zoo.seed >= args.train_seeds).squeeze(1)
    pairs = sample_pairs(zoo, eval_models, 4 * args.eval_pairs, torch.Generator().manual_seed(123))
    keep = sorted({frozenset((a, b)): i for i, (a, b) in enumerate(zip(pairs.a.tolist(), pairs.b.tolist()))}.values())[:args.eval_pairs]
    pairs = Pairs(pairs.a[keep], pairs.b[keep])  # distinct unordered pairs: (A, B) and (B, A) average alike
    x_eval = pairs.inputs(zoo)
    avg = (zoo.weights[pairs.a] + zoo.weights[pairs.b]) / 2
    baselines = {"model_a": float(pair_accuracy(zoo.weights[pairs.a], pairs, zoo, data).mean()),
                 "model_b": float(pair_accuracy(zoo.weights[pairs.b], pairs, zoo, data).mean()),
                 "weight_averaging": float(pair_accuracy(avg, pairs, zoo, data).mean()),
                 "averaging_uniqueness": uniqueness(avg), "averaging_wasserstein": wasserstein(avg),
                 "inputs_own_client_test_accuracy": float(zoo.test_acc.mean())}
    print("baselines:", json.dumps(baselines), flush=True)
    eval_ctx = (x_eval, pairs, zoo, data, avg)
    cfg = AEConfig(d_model=args.d_model, n_head=args.n_head, n_layer=args.n_layer, d_ff=2 * args.d_model,
                   dropout=args.dropout, norm_first=args.norm_first, embed_norm=args.embed_norm)
    results = {"args": vars(args), "config": cfg.__dict__, "zoo": {"models": len(zoo.client), "clients": args.clients,
               "seeds": args.zoo_seeds, "train_models": len(train_models), "eval_models": len(eval_models)},
               "baselines": baselines, "runs": {"ungated": {}, "gated": {}}, "recovery": {}}
    t_start = time.time()
    for seed in [int(s) for s in args.seeds.split(",")]:
        torch.manual_seed(seed)
        base = TransformerAE(cfg)
        scale_qk(base, args.qk_gain)
        variants = [("ungated", base)] if args.no_gated else [("ungated", base), ("gated", copy.deepcopy(base))]
        for label, model in variants:
            if label == "gated":
                add_gates(model, args.gate)
            torch.manual_seed(seed)  # the same dropout masks' stream at the start
            results["runs"][label][str(seed)] = train(model, args.epochs, args, zoo, data, train_models, eval_ctx, seed, label)
            _dump(results, out)
            if label == "ungated" and seed == int(args.seeds.split(",")[0]):
                save_checkpoint(model, out / "collapsed", x_eval)
    if not args.no_gated and args.recovery_epochs > 0:
        from safetensors.torch import load_file

        seed = int(args.seeds.split(",")[0])
        state = load_file(str(out / "collapsed" / "model.safetensors"))
        for label in ("ungated", "gated"):
            model = TransformerAE(cfg)
            model.load_state_dict(state)
            if label == "gated":
                add_gates(model, args.gate)
            torch.manual_seed(seed + 7)
            start = {"epoch": args.epochs, **evaluate(model, *eval_ctx)}
            results["recovery"][label] = [start] + train(model, args.recovery_epochs, args, zoo, data, train_models,
                                                         eval_ctx, seed + 7, f"recovery {label}", start_epoch=args.epochs,
                                                         lr=args.recovery_lr)
            _dump(results, out)
    results["seconds"] = time.time() - t_start
    _dump(results, out)
    from plots import make_plots  # experiments/collapse/plots.py

    make_plots(results, out)
    print(f"done in {results['seconds']:.0f} s: {out / 'robustness_evaluation_results.json'}", flush=True)
    return 0


def _dump(results: dict, out: Path) -> None:
    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, list):
            return [clean(x) for x in v]
        return v
    tmp = out / "robustness_evaluation_results.json.tmp"
    tmp.write_text(json.dumps(clean(results), indent=1) + "\n")
    tmp.replace(out / "robustness_evaluation_results.json")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    sys.exit(main())
