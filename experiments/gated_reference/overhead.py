"""Wall-time cost of a gate on a training step of the reference architecture (batch 8 x 128, one thread):
ungated and gated copies of the same model, steps interleaved, median of per-round ratios.

    python experiments/gated_reference/overhead.py --rounds 20
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

import torch


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(1)
    from transformers import GPT2Config, GPT2LMHeadModel

    from attnkit.gate import add_gates

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=1024, n_positions=128, n_embd=128, n_layer=4, n_head=4)
    base = GPT2LMHeadModel._from_config(cfg, attn_implementation="sdpa").train()
    models = {"none": base}
    for kind in ("headwise", "elementwise", "mlp"):
        models[kind] = copy.deepcopy(base)
        add_gates(models[kind], kind)
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-3) for k, m in models.items()}
    x = torch.randint(0, 1024, (8, 128), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {k: [] for k in models}
    for r in range(args.rounds + 2):
        for k, m in models.items():
            t = time.perf_counter()
            m(input_ids=x, labels=x).loss.backward()
            opts[k].step()
            opts[k].zero_grad()
            if r >= 2:  # warm-up rounds left out
                times[k].append(time.perf_counter() - t)
    out = {k: {"median_step_s": statistics.median(v),
               "median_ratio_to_ungated": statistics.median(a / b for a, b in zip(v, times["none"]))}
           for k, v in times.items()}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
