"""Live ``malloc`` bytes at the points of a sparse training step, against dense SDPA's, in one process.

At each point of a step (the ``sparse_attention`` block entered, the forward returned, its output
dropped but the loss kept, the backward done, the block left) the bytes in live ``malloc``
allocations above the step's start (``rss.malloc_in_use``: exact to the byte, whatever pages they
touch) and CPython's allocated blocks; medians of ``--rounds`` interleaved steps after a warm-up
of each. Run it with glibc's per-thread cache off, or freed small chunks it holds count as live:

    GLIBC_TUNABLES=glibc.malloc.tcache_count=0 python bench/sparse_step_live.py
    GLIBC_TUNABLES=glibc.malloc.tcache_count=0 python bench/sparse_step_live.py --pattern learned_gate --frozen-gate
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rss  # noqa: E402
from sparse_options import add_sparse_options  # noqa: E402

POINTS = ("entered", "forward", "output dropped", "after backward", "left")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_sparse_options(p, pattern="moba", block_size=128)
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--frozen-gate", action="store_true",
                   help="learned_gate: gates drawn at random and without gradient (a trained gate kept fixed)")
    args = p.parse_args()
    import torch

    from bench_sparse import build
    from attnkit.sparse import SparseConfig, make_gates, sparse_attention

    torch.set_num_threads(1)
    model = build(args)
    for param in model.parameters():
        param.requires_grad_(True)
    ids = torch.randint(0, model.config.vocab_size, (1, args.length), generator=torch.Generator().manual_seed(0))
    cfg = SparseConfig(pattern=args.pattern, density=args.density, block_size=args.block_size)
    gates = None
    if args.pattern == "learned_gate":
        gates = make_gates(model, cfg)
        if args.frozen_gate:
            with torch.no_grad():
                for param in gates.parameters():
                    param.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
            gates.requires_grad_(False)

    def step(sparse: bool, seen: dict) -> None:
        gc.collect()
        rss.trim()
        base, blocks = rss.malloc_in_use(), sys.getallocatedblocks()

        def mark(point: str) -> None:
            seen.setdefault(point, []).append((rss.malloc_in_use() - base, sys.getallocatedblocks() - blocks))

        model.zero_grad(set_to_none=False)
        block = sparse_attention(model, cfg, gates=gates) if sparse else None
        if block is not None:
            block.__enter__()
        mark("entered")
        out = model(input_ids=ids, labels=ids)
        mark("forward")
        loss = out.loss
        del out
        mark("output dropped")
        loss.backward()
        mark("after backward")
        if block is not None:
            block.__exit__(None, None, None)
        del block, loss
        mark("left")

    for sparse in (False, True):  # warm-up
        step(sparse, {})
    seen: dict = {False: {}, True: {}}
    for _ in range(args.rounds):
        for sparse in (False, True):
            step(sparse, seen[sparse])
    sparse_name = f"{args.pattern}@{args.density:g}"
    print(f"live malloc KiB and CPython blocks above the step's start, dense SDPA and {sparse_name} "
          f"(medians of {args.rounds}):")
    for point in POINTS:
        d, s = ([statistics.median(x[i] for x in seen[sp][point]) for i in (0, 1)] for sp in (False, True))
        print(f"  {point:>15}: dense {d[0] / 1024:10.2f}  sparse {s[0] / 1024:10.2f}  ({(s[0] - d[0]) / 1024:+8.2f} KiB)"
              f"   blocks {d[1]:.0f} / {s[1]:.0f} ({s[1] - d[1]:+.0f})")


if __name__ == "__main__":
    main()
