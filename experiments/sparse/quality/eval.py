"""Every pattern at every density and length against dense reference-long, on held-out KJV text:
perplexity, next-token KL against dense, top-1 agreement with dense, measured density.

The windows are what ``attnkit sparse eval`` uses (``attnkit.sparse.evaluate.eval_windows``:
non-overlapping, from the start of the test split), the metrics ``attnkit.metrics.fidelity``'s. Rows:

- the training-free patterns as ``attnkit sparse eval`` runs them (local block forced, no sinks
  except ``sinks_window``), and again with the previous block forced too (``+prev``:
  ``local_blocks=2, sink_blocks=0``; the budget's floor stays two blocks, so every row at one
  density keeps the same number of blocks: compare ``measured_density``);
- each ``--gates NAME=DIR`` as trained (its own config: forced blocks, sinks), run at every density.

One JSON line per row is appended to ``--out`` (``.jsonl``) as it is measured; a row already there
(same length, pattern, density) is skipped, so a killed run continues where it stopped.

    PYTHONPATH=src python experiments/sparse/quality/eval.py --lengths 1024,4096 \\
        --gates previous=experiments/sparse/results/far_weights/gates_0.25,mass_l2=runs/quality/mass_l2 \\
        --out experiments/sparse/results/quality/eval.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def nearest(dirs: list[str], density: float) -> str:
    """The directory whose gates were trained at the density nearest ``density``."""
    def trained_at(d: str) -> float:
        return float(json.loads((Path(d) / "train_summary.json").read_text())["sparse"]["density"])

    return min(dirs, key=lambda d: (abs(trained_at(d) - density), d))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="reference-long")
    ap.add_argument("--lengths", default="1024,4096")
    ap.add_argument("--tokens", type=int, default=8192, help="held-out tokens per length")
    ap.add_argument("--densities", default="0.125,0.25,0.5")
    ap.add_argument("--patterns", default="window,sinks_window,moba,quest")
    ap.add_argument("--names", default=None, help="only these rows (names as written, e.g. moba+prev,mass)")
    ap.add_argument("--layer-shares", default="", metavar="S0,S1,...",
                    help="also run the training-free patterns with these layer_shares (rows PATTERN@shares)")
    ap.add_argument("--local2", action=argparse.BooleanOptionalAction, default=False,
                    help="also run the training-free patterns with the previous block forced")
    ap.add_argument("--gates", default="", help="NAME=DIR[+DIR...][,NAME=...]: at each density the directory "
                    "trained (or calibrated) at the nearest density, as attnkit sparse eval --gates picks")
    ap.add_argument("--shares-from", default=None, metavar="NAME",
                    help="also run the training-free patterns with that gate's layer_shares (rows PATTERN@shares)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    from attnkit.common.data import encode_documents, load_corpus
    from attnkit.common.loading.registry import load_model
    from attnkit.metrics.fidelity import next_token_kl, perplexity, top1_accuracy, top1_agreement
    from attnkit.sparse import SparseConfig, sparse_attention
    from attnkit.sparse.distill import load_trained
    from attnkit.sparse.evaluate import dense_baseline, eval_windows

    loaded = load_model(a.model)
    model, tok = loaded.model.eval(), loaded.tokenizer
    stream = encode_documents(tok, load_corpus("kjv").split("test"))
    gates = dict(g.split("=", 1) for g in a.gates.split(",") if g)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            done.add((r["seq_len"], r["name"], r["density"]))

    def write(row: dict) -> None:
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    for n in map(int, a.lengths.split(",")):
        ids = eval_windows(tok, n, a.tokens, stream=stream)
        base = dense_baseline(model, ids, grad_windows=0)
        dense = torch.cat(base.logits)
        if (n, "dense", 1.0) not in done:
            write({"seq_len": n, "name": "dense", "pattern": "dense", "density": 1.0, "measured_density": 1.0,
                   "windows": int(ids.shape[0]), "perplexity": base.perplexity, "top1_accuracy": base.top1_accuracy,
                   "kl": 0.0, "top1_agreement": 1.0})
        for d in map(float, a.densities.split(",")):
            runs = {}
            for p in a.patterns.split(","):
                runs[p] = (SparseConfig(pattern=p, density=d), None, None)
                if a.layer_shares:
                    shares = tuple(float(x) for x in a.layer_shares.split(","))
                    runs[f"{p}@shares"] = (SparseConfig(pattern=p, density=d, layer_shares=shares), None, None)
                if a.local2:
                    runs[f"{p}+prev"] = (SparseConfig(pattern=p, density=d, local_blocks=2, sink_blocks=0), None, None)
            for name, dirs in gates.items():
                directory = nearest(dirs.split("+"), d)
                trained = load_trained(model, directory, density=d)
                runs[name] = (trained.cfg, trained.gates, directory)
                if name == a.shares_from:  # the training-free patterns with this gate's layer budget
                    for p in a.patterns.split(","):
                        runs[f"{p}@shares"] = (SparseConfig(pattern=p, density=d,
                                                            layer_shares=trained.cfg.layer_shares), None, None)
            for name, (cfg, g, directory) in runs.items():
                if (n, name, d) in done or (a.names and name not in a.names.split(",")):
                    continue
                t = time.time()
                logits, dens = [], []
                with torch.no_grad():
                    for w in ids:
                        with sparse_attention(model, cfg, gates=g) as h:
                            logits.append(model(input_ids=w[None]).logits.float())
                        dens.append(h.density())
                s = torch.cat(logits)
                ppl = perplexity(s, ids)
                write({"seq_len": n, "name": name, "pattern": cfg.pattern, "density": d,
                       "layer_shares": cfg.layer_shares, "local_blocks": cfg.local_blocks, "sink_blocks": cfg.sink_blocks, "sinks": cfg.keeps_sinks, "gates": directory,
                       "measured_density": sum(dens) / len(dens), "windows": int(ids.shape[0]),
                       "perplexity": ppl, "perplexity_ratio": ppl / base.perplexity,
                       "kl": float(next_token_kl(dense, s)), "top1_agreement": top1_agreement(dense, s),
                       "top1_accuracy": top1_accuracy(s, ids), "seconds": round(time.time() - t, 1)})
        del base, dense


if __name__ == "__main__":
    main()
