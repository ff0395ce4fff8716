"""Train one learned gate on reference-long with the Python API (``attnkit.sparse.distill.distill``), the
settings the diagnosis asks for that the CLI does not expose: the map target ("max" or "mass"), the
forced local blocks, and a start from trained gates (a second, end-to-end stage).

    # stage 1: distil the block-mass map at 1024 tokens (the longest the model takes), density 0.25
    PYTHONPATH=src python experiments/sparse/quality/train.py --out runs/quality/mass_l2 \\
        --map-target mass --local-blocks 2 --steps 300
    # stage 2: next-token KL only (the LM's output, frozen model), from stage 1's gates
    PYTHONPATH=src python experiments/sparse/quality/train.py --out runs/quality/mass_l2_e2e \\
        --start-from runs/quality/mass_l2 --local-blocks 2 --map-weight 0 --steps 200 --lr 1e-3

Writes what ``attnkit sparse train`` writes (gates, config, train_summary.json; loadable with
``--gates DIR``). One process, ``--threads`` threads.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="reference-long")
    ap.add_argument("--out", required=True)
    ap.add_argument("--density", type=float, default=0.25)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--local-blocks", type=int, default=1)
    ap.add_argument("--sink-blocks", type=int, default=1,
                    help="the budget's floor counts these even unforced: 0 with --local-blocks 2 keeps every density's budget")
    ap.add_argument("--layer-shares", default="", metavar="S0,S1,...", help="train under this layer budget")
    ap.add_argument("--sinks", action="store_true", help="force the first block (off: reference-long has no sink)")
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=5e-3)
    ap.add_argument("--warmup-steps", type=int, default=30)
    ap.add_argument("--map-weight", type=float, default=1.0)
    ap.add_argument("--map-target", default="mass")
    ap.add_argument("--gate-bias", type=float, default=1.0)
    ap.add_argument("--gate-grad", default="straight_through")
    ap.add_argument("--gate-dim", type=int, default=32)
    ap.add_argument("--gate-init", default="moba")
    ap.add_argument("--start-from", default=None, help="a gates directory to continue from")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()

    import torch

    torch.set_num_threads(a.threads)
    from attnkit.common.loading.registry import load_model
    from attnkit.common.training import TrainConfig
    from attnkit.sparse import SparseConfig
    from attnkit.sparse.distill import DistillSettings, distill, load_trained

    loaded = load_model(a.model)
    cfg = SparseConfig(pattern="learned_gate", density=a.density, block_size=a.block_size, local_blocks=a.local_blocks,
                       sink_blocks=a.sink_blocks, sinks=a.sinks,
                       layer_shares=tuple(float(x) for x in a.layer_shares.split(",")) if a.layer_shares else None, gate_dim=a.gate_dim, gate_bias=a.gate_bias, gate_grad=a.gate_grad)
    start = load_trained(loaded.model, a.start_from).gates if a.start_from else None
    settings = DistillSettings(seq_len=a.seq_len, batch_size=a.batch_size, map_weight=a.map_weight,
                               gate_init=a.gate_init, map_target=a.map_target)
    train_cfg = TrainConfig(steps=a.steps, lr=a.lr, warmup_steps=a.warmup_steps, min_lr_ratio=0.1, grad_clip=1.0,
                            seed=a.seed, checkpoint_every=100, progress=False, log_every=25,
                            meta={"model": a.model, "start_from": a.start_from})
    t = time.time()
    result = distill(loaded.model, loaded.tokenizer, cfg, settings, train_cfg, a.out, start_from=start)
    last = result.history[-30:]
    print(json.dumps({"out": a.out, "steps": result.steps, "minutes": round((time.time() - t) / 60, 2),
                      "kl_last30": sum(h["kl"] for h in last) / len(last),
                      "map_kl_last30": sum(h.get("map_kl", 0.0) for h in last) / len(last)}), flush=True)


if __name__ == "__main__":
    main()
