"""How often a pattern drops the key block just before each query block (block i-1 for query block i).

The first query of block i has only itself in its own block: its previous token, and most of its recent
context, are in block i-1. A window always keeps that block; a score-based pattern (moba, quest, the
learned gate) keeps it only if it scores among the top k. This counts, per pattern, density and length, the
share of (window, layer, KV group, query block i >= 1) whose block i-1 was not kept, on the first windows of
the KJV test split (the windows `attnkit sparse eval` uses), and the attention mass dense attention puts on
block i-1 from the first query of block i (what dropping it costs those rows).

    python experiments/sparse/previous_block.py --seq-lens 2048,4096 --patterns moba,quest,window --densities 0.5,0.75
"""

from __future__ import annotations

import argparse
import json

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="reference-long")
    p.add_argument("--seq-lens", default="1024,2048,4096")
    p.add_argument("--patterns", default="window,moba,quest,learned_gate")
    p.add_argument("--densities", default="0.25,0.5,0.75")
    p.add_argument("--gates", default="experiments/sparse/results/gates_0.25")
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--out", default=None, help="JSON file for the table")
    a = p.parse_args()
    torch.set_num_threads(1)

    from attnkit.common.data import encode_documents, load_corpus
    from attnkit.common.loading.registry import load_model
    from attnkit.sparse import SparseConfig, sparse_attention
    from attnkit.sparse.distill import load_trained

    loaded = load_model(a.model)
    model, tok = loaded.model.eval(), loaded.tokenizer
    stream = encode_documents(tok, load_corpus("kjv").split("test"))
    rows = []
    for n in map(int, a.seq_lens.split(",")):
        ids = stream[:n][None]  # the first eval window at this length, (1, n)
        for pattern in a.patterns.split(","):
            for d in map(float, a.densities.split(",")):
                gates = None
                cfg = SparseConfig(pattern=pattern, density=d, block_size=a.block_size)
                if pattern == "learned_gate":
                    trained = load_trained(model, a.gates, density=d)  # what attnkit sparse eval runs
                    cfg, gates = trained.cfg, trained.gates
                with torch.no_grad(), sparse_attention(model, cfg, gates=gates, keep_masks=True) as handle:
                    model(input_ids=ids)
                    kept = handle.kept_blocks  # {Site: (B, Hkv, nQb, nKb)}
                dropped = total = 0
                for m in kept.values():
                    i = torch.arange(1, m.shape[2])
                    prev = m[:, :, i, i - 1]  # (B, Hkv, nQb-1): block i-1 kept for query block i
                    dropped += int((~prev).sum())
                    total += prev.numel()
                rows.append({"seq_len": n, "pattern": pattern, "density": d, "prev_block_dropped": dropped / total})
                print(json.dumps(rows[-1]), flush=True)
    if a.out:
        from attnkit.common.io import write_atomic

        write_atomic(a.out, json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
