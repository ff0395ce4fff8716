"""What a sparse training step's peak memory has above dense SDPA's: live memory or the allocator's.

For each configuration, in a fresh process (``bench/rss.py``'s fixed mmap threshold), after one
warm-up step, ``--rounds`` measured steps give:

  peak          VmHWM - VmRSS over the step (what ``bench_block_kernel.py`` reports);
  fwd_rss       the resident set at the end of the forward (as the backward starts), above the
                step's start;
  fwd_live      the same after ``malloc_trim`` there: the freed heap pages handed back, what is
                left is live (tensors and objects);
  peak_trimmed  the step's peak when that trim is done (a separate step);
  fwd_malloc    bytes in live ``malloc`` allocations at the end of the forward above the step's
                start (``rss.malloc_in_use``): live memory to the byte, whatever pages it touches;
  fwd_blocks    CPython's allocated memory blocks there above the step's start (its small
                objects, which come from its own arenas and ``fwd_malloc`` does not count);
  between       the process's whole resident set between steps (after ``gc.collect`` and
                ``malloc_trim``, as a step starts): what stays held from step to step (the
                model, its gradients, and whatever a configuration keeps across steps).

fwd_rss - fwd_live is what glibc keeps resident of the forward's freed small allocations (those
under the mmap threshold come from its heap, and its free pages stay until trimmed).

    python bench/sparse_train_peak.py --block-size 128
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rss  # noqa: E402


def worker(args) -> None:
    import torch

    from bench_sparse import build, steps

    torch.set_num_threads(1)
    model = build(args)
    _, train = steps(model, args.worker, args.length, args)
    train()
    seen: dict = {}
    backward = torch.Tensor.backward

    def at_backward(self, *a, **k):  # the loss's backward: the forward is over
        seen["fwd_malloc"] = rss.malloc_in_use() - seen["malloc"]
        seen["fwd_blocks"] = sys.getallocatedblocks() - seen["blocks"]
        seen["fwd_rss"] = rss.status()["VmRSS"] - seen["base"]
        if seen["trim"]:
            rss.trim()
            seen["fwd_live"] = rss.status()["VmRSS"] - seen["base"]
        return backward(self, *a, **k)

    torch.Tensor.backward = at_backward
    out: dict = {"peak": [], "fwd_rss": [], "fwd_live": [], "peak_trimmed": [], "between": [], "fwd_malloc": [],
                 "fwd_blocks": []}

    def step(trim: bool) -> None:
        seen["trim"] = trim
        gc.collect()
        rss.trim()
        seen["base"] = rss.status()["VmRSS"]
        seen["malloc"], seen["blocks"] = rss.malloc_in_use(), sys.getallocatedblocks()
        out["between"].append(seen["base"])
        out["peak_trimmed" if trim else "peak"].append(rss.peak_of(train))
        out["fwd_live" if trim else "fwd_rss"].append(seen["fwd_live" if trim else "fwd_rss"])
        if not trim:
            out["fwd_malloc"].append(seen["fwd_malloc"])
            out["fwd_blocks"].append(seen["fwd_blocks"])

    for _ in range(args.rounds):
        step(False)
        step(True)
    rss.report({k: statistics.median(v) for k, v in out.items()})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="reference-long")
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--configs", default="dense-sdpa,moba@0.25")
    p.add_argument("--rounds", type=int, default=3, help="measured steps of each kind per process")
    p.add_argument("--processes", type=int, default=2, help="fresh processes per configuration (interleaved)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    results: dict = {c: [] for c in args.configs.split(",")}
    for _ in range(args.processes):
        for c in results:
            results[c].append(rss.run_fresh(
                [sys.executable, __file__, "--worker", c, "--model", args.model, "--length", str(args.length),
                 "--block-size", str(args.block_size), "--rounds", str(args.rounds)], c))
    base = args.configs.split(",")[0]
    summary = {c: {k: statistics.median(r[k] for r in rs) / rss.unit(k) for k in rs[0]} for c, rs in results.items()}
    for c, s in summary.items():
        print(f"{c:>12}: " + ", ".join(f"{k} {v:.2f} {rss.unit_name(k)} ({v - summary[base][k]:+.2f})"
                                       for k, v in s.items()))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
