"""One attention layer's per-row statistics (``observe._fused_rows``, the fused pass of
``analyze``) against that layer's SDPA: CPU and wall seconds, interleaved rounds in one process.

GPT-2 small's layer shape by default (12 heads of 64, causal). CPU seconds are the figure to
compare on a shared machine; run it once per code version, alternating processes:

    PYTHONPATH=src python bench/bench_fused_rows.py --tokens 2048 --threads 1 --rounds 7
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F

from attnkit.seam import observe

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import interleave, median_ratio  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=7)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    N, H, D = args.tokens, args.heads, args.head_dim
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, H, N, D) * s for s in (0.3, 0.3, 1.0))  # (B, H, N, D)
    call = types.SimpleNamespace(scale=D ** -0.5)  # the pass reads only the scale of the call
    rows = torch.arange(N)
    intervals = (torch.zeros(1, 1, 1, dtype=torch.long), (rows + 1).view(1, 1, N))  # causal
    budget = observe.fused_budget(q)

    def stats():
        observe._fused_rows(call, q, k, rows, rows + 1, intervals, H * N * N, budget)

    def sdpa():
        F.scaled_dot_product_attention(q, k, v, is_causal=True)

    times = interleave({"sdpa": sdpa, "statistics": stats}, args.rounds, warmup=2)
    for what in ("cpu", "wall"):
        s, a = (statistics.median(times[n][what]) for n in ("sdpa", "statistics"))
        ratio = median_ratio(times["statistics"][what], times["sdpa"][what])
        print(f"{what}: sdpa {s:.3f} s, statistics {a:.3f} s, ratio {ratio:.2f} (median of per-round ratios)")
    print(f"{N} tokens, {H} heads of {D}, {args.threads} threads, load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
