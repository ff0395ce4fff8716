"""Cost of each cross-path similarity at a real vocabulary: S + weights, forward and forward+backward.

    python bench/bench_paths.py --rounds 15            # N = 8 paths, V = 151,936 (Qwen2.5), one thread

Time: interleaved rounds in one process (every variant once per round, in a shuffled order), the
median per variant and the median of per-round ratios to cosine. Memory: peak RSS of one
forward+backward in a fresh process per variant (bench/rss.py). Results go into BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import rss  # noqa: E402
from results import markers, write_block  # noqa: E402

from attnkit.paths import make_similarity, path_weights  # noqa: E402


def build(name: str, vocab: int, embed_dim: int):
    if name in ("luong", "bahdanau"):
        emb = torch.randn(vocab, embed_dim, generator=torch.Generator().manual_seed(0))
        return make_similarity(name, embedding=emb, seed=0)
    return make_similarity(name)


def step(sim, logits: torch.Tensor, backward: bool) -> float:
    t = time.perf_counter()
    x = logits.detach().requires_grad_(backward)
    a = path_weights(sim(torch.softmax(x, -1)), temperature=0.1)
    if backward:
        (a * torch.arange(a.numel(), dtype=a.dtype).view_as(a)).sum().backward()
    return time.perf_counter() - t


def worker(name: str, n: int, vocab: int, embed_dim: int) -> None:
    torch.set_num_threads(1)
    sim = build(name, vocab, embed_dim)
    logits = torch.randn(1, n, vocab)
    step(sim, logits, True)  # warm
    rss.report({"peak": rss.peak_of(lambda: step(sim, logits, True))})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--paths", type=int, default=8)
    p.add_argument("--vocab", type=int, default=151_936)
    p.add_argument("--embed-dim", type=int, default=2048)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, args.paths, args.vocab, args.embed_dim)
    torch.set_num_threads(1)
    names = ["cosine", "raw_dot", "scaled_dot", "bhattacharyya", "jensen_shannon", "luong", "bahdanau"]
    sims = {k: build(k, args.vocab, args.embed_dim) for k in names}
    logits = torch.randn(1, args.paths, args.vocab, generator=torch.Generator().manual_seed(0))
    times = {(k, b): [] for k in names for b in (False, True)}
    rng = random.Random(0)
    for k in names:
        step(sims[k], logits, True)
    for _ in range(args.rounds):
        order = [(k, b) for k in names for b in (False, True)]
        rng.shuffle(order)
        for k, b in order:
            times[(k, b)].append(step(sims[k], logits, b))
    peaks = {k: rss.run_fresh([sys.executable, __file__, "--worker", k, "--paths", str(args.paths), "--vocab",
                               str(args.vocab), "--embed-dim", str(args.embed_dim)], k)["peak"] for k in names}
    rows = ["| similarity | forward ms | ratio to cosine | forward+backward ms | ratio | peak MiB (fwd+bwd) |",
            "|---|---:|---:|---:|---:|---:|"]
    for k in names:
        f, fb = times[(k, False)], times[(k, True)]
        rf = statistics.median(a / c for a, c in zip(f, times[("cosine", False)]))
        rb = statistics.median(a / c for a, c in zip(fb, times[("cosine", True)]))
        rows.append(f"| {k} | {1e3 * statistics.median(f):.1f} | {rf:.2f}x | {1e3 * statistics.median(fb):.1f} | "
                    f"{rb:.2f}x | {peaks[k] / 2**20:.0f} |")
    start, end = markers("bench_paths")
    cmd = "python bench/bench_paths.py " + " ".join(sys.argv[1:])
    block = (f"{start}\n`{cmd}` — S(p) + `path_weights` for one group of N = {args.paths} paths over V = "
             f"{args.vocab:,} tokens, float32, one thread; learnable ones through a {args.embed_dim}-wide embedding "
             f"(luong rank 128, bahdanau width 256). Medians of {args.rounds} interleaved rounds; ratio = median of "
             f"per-round ratios to cosine; peak = RSS above the live set in a fresh process.\n\n"
             + "\n".join(rows) + f"\n{end}")
    write_block(ROOT / "BENCHMARKS.md", "bench_paths", block, heading="## Cross-path similarities (attnkit.paths)")
    print(block)


if __name__ == "__main__":
    main()
