"""Why does the learned gate lose quality at density 0.25 on reference-long? Selections compared on the
same held-out windows (the first N windows of the KJV test split, what `attnkit sparse eval` uses):

- the training-free patterns and the shipped gate (experiments/sparse/results/far_weights/gates_0.25);
- the shipped gate with its forced blocks changed (the previous block, the sink block): does it keep
  the diagonal / local block and sinks;
- two oracles that read the dense attention of the call itself (queries and keys as the sparse
  forward gives them) and keep the top-k blocks by
    * ``oracle_mass``: the attention mass the group's heads put on each key block, summed over the
      query block's rows (what dropping the block removes from those rows), and
    * ``oracle_max``: SeerAttention's distillation target, the max-pooled map maxed over the group's
      heads (what ``attnkit.sparse.targets`` trains the gate towards).
  An oracle is the best any gate with the same selection granularity (one set of key blocks per KV
  group and query block) can do with that ranking; if the max-pooled oracle is worse than the mass
  oracle, the target is the wrong one.

Prints one JSON line per variant: perplexity, KL against dense, top-1 agreement, measured density.

    PYTHONPATH=src python experiments/sparse/quality/diagnose.py --windows 8 --densities 0.25
"""

from __future__ import annotations

import argparse
import json
import math
import time
from contextlib import contextmanager
from dataclasses import replace

import torch
import torch.nn.functional as F


def block_mass(q, k, groups: int, scale: float, block: int, reduce: str):
    """(B, Hkv, nQb, nKb): dense causal attention pooled into blocks (``reduce``: "mass" sums the
    probabilities over the query block's rows and the group's heads; "max" max-pools them)."""
    B, H, T, D = q.shape
    k = k.repeat_interleave(groups, dim=1)
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    p = torch.softmax(logits.masked_fill(~causal, -math.inf), dim=-1)  # (B, H, T, T)
    n = math.ceil(T / block)
    p = F.pad(p, (0, n * block - T, 0, n * block - T)).view(B, H, n, block, n, block)
    if reduce == "mass":
        pooled = p.sum((3, 5)).view(B, H // groups, groups, n, n).sum(2)
    else:
        pooled = p.amax((3, 5)).view(B, H // groups, groups, n, n).amax(2)
    return pooled


@contextmanager
def layer_densities(per_layer: list[float]):
    """Every sparse call of layer i runs at density per_layer[i] (a measurement: the selector's
    config swapped per call)."""
    from attnkit.sparse.attention import SparseSelector

    original = SparseSelector.select

    def select(self, call):
        cfg = self.cfg
        self.cfg = replace(cfg, density=per_layer[call.site.layer])
        try:
            return original(self, call)
        finally:
            self.cfg = cfg

    SparseSelector.select = select
    try:
        yield
    finally:
        SparseSelector.select = original


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="reference-long")
    ap.add_argument("--gates", default="experiments/sparse/results/far_weights/gates_0.25")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--densities", default="0.25")
    ap.add_argument("--variants", default="all")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--per-layer", action="store_true", help="also the gate and the mass oracle in one layer at a time")
    ap.add_argument("--block-sizes", default="", help="also the gate, the oracle and quest at these block sizes")
    ap.add_argument("--layer-densities", default="", help="also run with these densities, one per layer")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from attnkit.common.data import encode_documents, load_corpus
    from attnkit.common.loading.registry import load_model
    from attnkit.metrics.fidelity import next_token_kl, perplexity, top1_agreement
    from attnkit.sparse import SparseConfig, sparse_attention
    from attnkit.sparse.distill import load_trained
    from attnkit.sparse.patterns import Pattern, register_pattern

    loaded = load_model(a.model)
    model, tok = loaded.model.eval(), loaded.tokenizer
    scale = model.config.head_dim ** -0.5 if getattr(model.config, "head_dim", None) else \
        (model.config.hidden_size // model.config.num_attention_heads) ** -0.5
    for reduce in ("mass", "max"):
        register_pattern(Pattern(f"oracle_{reduce}", lambda x, r=reduce: block_mass(x.q, x.k, x.groups, scale,
                                                                             x.geometry.block_size, r)))

    stream = encode_documents(tok, load_corpus("kjv").split("test"))
    ids = stream[: a.windows * a.seq_len].view(a.windows, a.seq_len)
    with torch.no_grad():
        dense = torch.cat([model(input_ids=w[None]).logits.float() for w in ids])
    print(json.dumps({"variant": "dense", "perplexity": perplexity(dense, ids)}), flush=True)

    def run(name, cfg, gates=None, layers=None):
        t = time.time()
        out, dens = [], []
        with torch.no_grad():
            for w in ids:
                with sparse_attention(model, cfg, gates=gates, layers=layers) as h:
                    out.append(model(input_ids=w[None]).logits.float())
                dens.append(h.density())
        s = torch.cat(out)
        print(json.dumps({"variant": name, "density": cfg.density, "measured": round(sum(dens) / len(dens), 4),
                          "perplexity": round(perplexity(s, ids), 3), "kl": round(float(next_token_kl(dense, s)), 4),
                          "top1_agreement": round(top1_agreement(dense, s), 4), "seconds": round(time.time() - t, 1)}),
              flush=True)

    want = None if a.variants == "all" else set(a.variants.split(","))
    for d in map(float, a.densities.split(",")):
        trained = load_trained(model, a.gates, density=d)
        variants = {
            "moba": (SparseConfig(pattern="moba", density=d), None),
            "quest": (SparseConfig(pattern="quest", density=d), None),
            "window": (SparseConfig(pattern="window", density=d), None),
            "gate": (trained.cfg, trained.gates),
            "gate_local2": (replace(trained.cfg, local_blocks=2), trained.gates),
            "gate_sinks": (replace(trained.cfg, sinks=True), trained.gates),
            "gate_local2_sinks": (replace(trained.cfg, local_blocks=2, sinks=True), trained.gates),
            "oracle_mass": (SparseConfig(pattern="oracle_mass", density=d), None),
            "oracle_max": (SparseConfig(pattern="oracle_max", density=d), None),
            "oracle_mass_local2": (SparseConfig(pattern="oracle_mass", density=d, local_blocks=2), None),
            "oracle_mass_sinks": (SparseConfig(pattern="oracle_mass", density=d, sinks=True), None),
            # the previous block forced in place of the sink block the budget counts: the same budget
            "oracle_mass_prev": (SparseConfig(pattern="oracle_mass", density=d, local_blocks=2, sink_blocks=0), None),
            "oracle_max_prev": (SparseConfig(pattern="oracle_max", density=d, local_blocks=2, sink_blocks=0), None),
            "gate_prev": (replace(trained.cfg, local_blocks=2, sink_blocks=0), trained.gates),
            "moba_local2": (SparseConfig(pattern="moba", density=d, local_blocks=2), None),
            "quest_local2": (SparseConfig(pattern="quest", density=d, local_blocks=2), None),
        }
        for name, (cfg, gates) in variants.items():
            if want is None or name in want:
                run(name, cfg, gates)
        for bs in map(int, a.block_sizes.split(",")) if a.block_sizes else ():  # finer selection, same density
            run(f"gate_block{bs}", replace(trained.cfg, block_size=bs), trained.gates)
            run(f"oracle_mass_block{bs}", SparseConfig(pattern="oracle_mass", density=d, block_size=bs))
            run(f"quest_block{bs}", SparseConfig(pattern="quest", density=d, block_size=bs))
        if a.layer_densities:  # one density per layer (the budget moved between layers)
            per_layer = [float(x) for x in a.layer_densities.split(",")]
            with layer_densities(per_layer):
                run(f"gate_layers{a.layer_densities}", trained.cfg, trained.gates)
                run(f"oracle_mass_layers{a.layer_densities}", SparseConfig(pattern="oracle_mass", density=d))
                run(f"quest_layers{a.layer_densities}", SparseConfig(pattern="quest", density=d))
        for layer in range(model.config.num_hidden_layers) if a.per_layer else ():  # one layer sparse, the rest dense
            for name in ("gate", "oracle_mass"):
                run(f"{name}_only_layer{layer}", *variants[name], layers=[layer])


if __name__ == "__main__":
    main()
