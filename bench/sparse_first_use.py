"""What a process holds between steps once it has run sparse attention, and from what.

In a fresh process (``bench/rss.py``'s fixed mmap threshold) on reference-long's architecture: two
dense SDPA training steps at ``--length`` tokens, then, one after another, the first use of each
operator and part the sparse path runs that dense SDPA does not, a sparse forward and a training
step at ``--length``, more steps of each, and a dense step again. After each: the resident set
between steps (``gc.collect`` and ``malloc_trim`` first), split into anonymous memory and
file-backed pages (the code of libtorch's kernels, mapped from the library when first run), each
as its growth over the line before, KiB.

    python bench/sparse_first_use.py
"""

from __future__ import annotations

import argparse
import gc
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rss  # noqa: E402


def resident() -> tuple[int, int, int]:
    """(RSS, anonymous, file-backed) KiB after collecting and trimming."""
    gc.collect()
    rss.trim()
    text = Path("/proc/self/status").read_text()
    return tuple(int(re.search(k + r":\s+(\d+)", text).group(1)) for k in ("VmRSS", "RssAnon", "RssFile"))


def worker(args) -> None:
    import torch

    from bench_sparse import build, steps

    torch.set_num_threads(1)
    model = build(args)
    _, dense = steps(model, "dense-sdpa", args.length, args)
    dense()
    dense()
    rows, last = [], [resident()]

    def after(what: str) -> None:
        now = resident()
        rows.append((what, *(a - b for a, b in zip(now, last[0]))))
        last[0] = now

    after("two dense steps (the baseline)")
    x = torch.randn(1, 2, 16, 16)
    torch.sort(x, dim=-1, stable=True)
    after("first stable sort")
    torch.tensor([1, 1, 2]).unique_consecutive(return_counts=True)
    after("first unique_consecutive")
    torch.logaddexp(x, x)
    after("first logaddexp")
    q, k = torch.randn(8, 1, 256, 32), torch.randn(8, 1, 128, 32)
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, k, 0.0, False, scale=0.1)
    after("first SDPA call of a bucket's shape")
    prefill, train = steps(model, f"moba@{args.density:g}", args.length, args)
    prefill()
    after(f"first sparse forward (moba@{args.density:g}, no grad)")
    train()
    after("first sparse training step")
    train()
    train()
    after("two more sparse steps")
    dense()
    after("a dense step")
    rss.report({"rows": rows})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="reference-long")
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--density", type=float, default=0.25)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    cmd = [sys.executable, __file__, "--worker", "--model", args.model, "--length", str(args.length),
           "--block-size", str(args.block_size), "--density", str(args.density)]
    result = rss.run_fresh(cmd, "first use")
    print(f"{'after':<42} {'RSS':>8} {'anon':>8} {'file':>8}   (KiB, growth over the line before)")
    for what, total, anon, file in result["rows"]:
        print(f"{what:<42} {total:>+8} {anon:>+8} {file:>+8}")


if __name__ == "__main__":
    main()
