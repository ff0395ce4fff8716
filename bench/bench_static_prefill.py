"""A prompt written into a StaticCache: sparse prefill against dense SDPA prefill with the same cache.

With a preallocated cache (``StaticCache``, ``generate(..., cache_implementation="static")``) the
model hands attention every slot and its own mask (causal over the written keys, the unwritten
slots hidden). ``sparse_attention`` runs such a call on the written keys alone, without the mask,
on the SDPA block kernels (``split_sdpa`` on the CPU); the mask kept, it would run on the portable
kernel. In one process, interleaved rounds (every configuration once a round, after one warm-up
round), medians of the per-round ratios to dense SDPA measured in the same round:

  dense            the model's own SDPA attention, StaticCache
  PATTERN@D        ``sparse_attention``, StaticCache (the written keys, no mask: what runs by default)
  PATTERN@D mask   the same with the model's mask kept over every slot (``_causal_prefix`` answering
                   None): the portable kernel, what ran before the written-keys cut
  PATTERN@D dyn    ``sparse_attention`` with a DynamicCache (no unwritten slots, no mask)

Each call prefills the prompt into a fresh cache (room for ``--room`` more tokens) and keeps the
last position's logits. Times are wall-clock and the process's CPU time.

    python bench/bench_static_prefill.py                          # 8k tokens, quest@0.25, 5 rounds
    python bench/bench_static_prefill.py --lengths 1024 --rounds 2 --pattern moba
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import build, new_cache, summarise  # noqa: E402
from results import interleave  # noqa: E402
from sparse_options import add_sparse_options  # noqa: E402


def prefill_part(model, length: int, args) -> dict:
    import torch

    from attnkit.sparse import SparseConfig, attention, sparse_attention

    ids = torch.randint(0, model.config.vocab_size, (args.batch, length), generator=torch.Generator().manual_seed(length))
    cfg = SparseConfig(pattern=args.pattern, density=args.density, block_size=args.block_size)
    name = f"{args.pattern}@{args.density:g}"
    kernels: dict = {}

    def prefill(kind: str):
        cache = new_cache(model, kind, length + args.room)
        return model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1).logits

    def dense():
        with torch.no_grad():
            prefill("static")

    def sparse(kind: str, keep_mask: bool = False):
        def run():
            cut = attention._causal_prefix
            if keep_mask:
                attention._causal_prefix = lambda *a: None
            try:
                with torch.no_grad(), sparse_attention(model, cfg) as handle:
                    prefill(kind)
            finally:
                attention._causal_prefix = cut
            kernels[run.__name__] = dict(handle.kernels)
        return run

    fns = {"dense": dense, name: sparse("static"), f"{name} mask": sparse("static", True),
           f"{name} dyn": sparse("dynamic")}
    for n, fn in fns.items():
        fn.__name__ = n
    result = summarise(interleave(fns, args.rounds), "dense")
    result["kernels"] = kernels
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_sparse_options(p)
    p.add_argument("--lengths", default="8192", help="prompt tokens")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--room", type=int, default=32, help="StaticCache slots after the prompt (tokens to decode)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    lengths = [int(x) for x in args.lengths.split(",")]
    model = build(args, max(lengths) + args.room)
    print(f"load before {os.getloadavg()}; threads {args.threads}; {args.model}, batch {args.batch}, block {args.block_size}")
    print("| prompt tokens | configuration | kernels | s (wall) | s (CPU) | × dense (wall) | × dense (CPU) | rounds × dense (wall) |")
    print("|---:|---|---|---:|---:|---:|---:|---|")
    for n in lengths:
        r = prefill_part(model, n, args)
        kernels = r.pop("kernels")
        for c, t in r.items():
            rounds = ", ".join(f"{b / a:.2f}" for a, b in zip(t["wall"]["rounds"], r["dense"]["wall"]["rounds"]))
            seen = ", ".join(f"{k} {v}" for k, v in kernels.get(c, {"sdpa": 1}).items())
            print(f"| {n} | {c} | {seen} | {t['wall']['median_s']:.3f} | {t['cpu']['median_s']:.3f} "
                  f"| {t['wall']['speedup']:.2f} | {t['cpu']['speedup']:.2f} | {rounds} |", flush=True)
    print(f"load after {os.getloadavg()}")


if __name__ == "__main__":
    main()
