"""What an attached session costs when it does nothing, and when it observes one forward in N.

Configurations on one GPT-2-shaped model (random weights, no hub), batch 1, fp32, training step
(forward + backward of the LM loss), interleaved rounds in one process:

  plain          the model's own SDPA, nothing attached (the baseline)
  inactive       ``attach(model, taps=[StatsCollector()])`` with ``session.active = False``
  unobserved     a step that an ``every=N`` session does not observe (the mix for N = 50 is reported)
  observed       every step observed (full statistics, every row)

    python bench/bench_seam_overhead.py                    # 512 tokens, 12 layers, writes BENCHMARKS.md
    python bench/bench_seam_overhead.py --length 128 --layers 2 --rounds 3 --no-write
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import OwnTime, command_line, interleave, markers, median_ratio, write_block  # noqa: E402

MARK_START, MARK_END = markers("bench_seam_overhead")
CONFIGS = ("plain", "inactive", "unobserved", "observed")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from attnkit.seam import AttentionSession, StatsCollector, attach

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=args.layers, n_head=12, n_embd=768, n_positions=args.length, vocab_size=args.vocab,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel._from_config(cfg, attn_implementation="sdpa").train()
    ids = torch.randint(0, args.vocab, (1, args.length), generator=torch.Generator().manual_seed(0))

    def step():
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()

    inactive = AttentionSession(taps=[StatsCollector()])
    inactive.active = False
    sparse = AttentionSession(taps=[StatsCollector()], every=2)  # forwards alternate: observed, unobserved
    full = AttentionSession(taps=[StatsCollector()])

    def timed_step() -> OwnTime:
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        return OwnTime(time.perf_counter() - wall, time.process_time() - cpu)

    def with_session(session, skip_first: bool = False):
        def run() -> OwnTime:
            with attach(model, session):  # attaching and leaving happen once per run, outside the timing
                if skip_first:  # this session observes forwards 0, 2, 4, ...: spend the observed one untimed
                    step()
                return timed_step()
        return run

    runs = {"plain": timed_step, "inactive": with_session(inactive),
            "unobserved": with_session(sparse, skip_first=True), "observed": with_session(full)}
    measured = interleave({c: runs[c] for c in CONFIGS}, args.rounds)  # after a warm-up round
    times = {c: measured[c]["wall"] for c in CONFIGS}
    ratio = {c: median_ratio(times[c], times["plain"]) for c in CONFIGS}
    med = {c: statistics.median(times[c]) for c in CONFIGS}
    every = 50
    mix = (ratio["observed"] + (every - 1) * ratio["unobserved"]) / every
    lines = [MARK_START, f"### Results ({_dt.datetime.now():%Y-%m-%d %H:%M})", "",
             f"- command: `{command_line('bench_seam_overhead.py', args, p, ('no_write',))}`",
             f"- machine: {os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}, threads {args.threads}; "
             f"load average {os.getloadavg()[0]:.2f} at the end",
             f"- GPT-2 shape {args.layers} × 12 × 768, vocab {args.vocab}, {args.length} tokens, batch 1, fp32, "
             f"training step (forward + backward); {args.rounds} interleaved rounds after one warm-up round", "",
             "| configuration | median step s | × plain (median of per-round ratios) |", "|---|---:|---:|"]
    for c in CONFIGS:
        lines.append(f"| {c} | {med[c]:.3f} | {ratio[c]:.3f}× |")
    lines += ["", f"`inactive`: attached, `session.active = False`; `unobserved`: a step an `every=N` session does not "
              f"observe; `observed`: full statistics of every row. With `every={every}` a run costs "
              f"(1 × observed + {every - 1} × unobserved) / {every} = {mix:.3f}× plain.", MARK_END]
    block = "\n".join(lines)
    print(block)
    if not args.no_write:
        write_block(ROOT / "BENCHMARKS.md", "bench_seam_overhead", block,
                    "## What an attached session costs in training (`bench/bench_seam_overhead.py`)")


if __name__ == "__main__":
    main()
