"""Peak memory and time of a training step with a soft-cap applied through the seam, against SDPA.

Configurations, on one randomly initialised GPT-2-shaped model (no hub), batch 1, fp32, one
forward + backward of the language-model loss:

  sdpa              the model's own SDPA attention, nothing attached (the baseline)
  eager-softcap     what a user writes without attnkit: eager attention with the soft-cap inside it
                    (logits, tanh cap, mask, softmax, as Gemma 2's eager path does)
  attnkit-softcap   ``attach(model, score_mods=[soft_cap(cap)])``: attnkit's dense kernel, query
                    rows in chunks, each chunk checkpointed (logits recomputed in backward)
  attnkit-nockpt    the same kernel without checkpointing (what the seam did before: every
                    chunk's logits and probabilities kept for backward)

Memory: a fresh process per configuration (``bench/rss.py``), largest peak of ``--mem-repeats``
steps after one warm-up step. Time: one process, interleaved rounds (sdpa, eager-softcap,
attnkit-softcap, ...), medians of per-round ratios to SDPA.

    python bench/bench_train_memory.py                      # 1024 tokens, writes BENCHMARKS.md
    python bench/bench_train_memory.py --length 256 --layers 2 --rounds 2 --no-write
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rss  # noqa: E402
from results import command_line, interleave, markers, median_ratio, write_block  # noqa: E402

CONFIGS = ("sdpa", "eager-softcap", "attnkit-softcap", "attnkit-nockpt")
ROOT = Path(__file__).resolve().parents[1]
MARK_START, MARK_END = markers("bench_train_memory")


def build(args):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=args.layers, n_head=12, n_embd=768, n_positions=args.length, vocab_size=args.vocab,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel._from_config(cfg, attn_implementation="sdpa").train()


def _eager_softcap(cap: float):
    """Eager attention with a soft-cap, as a user writes it (Gemma 2's eager path), registered with transformers."""
    import torch
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    def fn(module, q, k, v, mask, scaling=None, dropout=0.0, **kw):
        scores = torch.matmul(q, k.transpose(-1, -2)) * scaling  # (B, H, T, T)
        scores = cap * torch.tanh(scores / cap)
        if mask is not None:
            scores = scores + mask
        probs = torch.softmax(scores, dim=-1)
        return torch.matmul(probs, v).transpose(1, 2).contiguous(), probs

    AttentionInterface.register("eager_softcap", fn)
    AttentionMaskInterface.register("eager_softcap", eager_mask)
    return "eager_softcap"


def steps(model, args) -> dict:
    """One training step per configuration (a closure that returns the loss)."""
    import torch

    from attnkit.seam.mods import soft_cap
    from attnkit.seam import attach

    ids = torch.randint(0, args.vocab, (1, args.length), generator=torch.Generator().manual_seed(0))
    eager_name = _eager_softcap(args.cap)

    def step(context):
        model.zero_grad(set_to_none=True)
        with context:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        return loss.detach()

    def eager_step():
        model.set_attn_implementation(eager_name)
        try:
            return step(nullcontext())
        finally:
            model.set_attn_implementation("sdpa")

    def nockpt_step():
        import attnkit.seam.kernels.dense as dense

        saved = dense.checkpoint
        dense.checkpoint = lambda fn, *a, use_reentrant=False: fn(*a)  # keep every chunk's graph
        try:
            return step(attach(model, score_mods=[soft_cap(args.cap)]))
        finally:
            dense.checkpoint = saved

    return {
        "sdpa": lambda: step(nullcontext()),
        "eager-softcap": eager_step,
        "attnkit-softcap": lambda: step(attach(model, score_mods=[soft_cap(args.cap)])),
        "attnkit-nockpt": nockpt_step,
    }


def memory_worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    fn = steps(build(args), args)[args.worker]
    fn()  # warm-up: optimizer-free, but grads are allocated once here
    peaks = [rss.peak_of(fn) for _ in range(args.mem_repeats)]
    rss.report({"config": args.worker, "peaks": peaks})


def measure_memory(config: str, args) -> int:
    cmd = [sys.executable, __file__, "--worker", config, "--length", str(args.length), "--layers", str(args.layers),
           "--vocab", str(args.vocab), "--cap", str(args.cap), "--mem-repeats", str(args.mem_repeats),
           "--threads", str(args.threads)]
    return max(rss.run_fresh(cmd, f"{config} (memory)")["peaks"])


def time_interleaved(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    fns = steps(build(args), args)
    measured = interleave({name: fns[name] for name in CONFIGS}, args.rounds)  # after a warm-up round
    times = {name: measured[name]["wall"] for name in CONFIGS}
    ratios = {name: median_ratio(times[name], times["sdpa"]) for name in CONFIGS}
    return {"times": times, "median": {n: statistics.median(t) for n, t in times.items()}, "ratio": ratios}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--vocab", type=int, default=1024, help="small, so the output layer does not hide attention's memory")
    p.add_argument("--cap", type=float, default=30.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--mem-repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return memory_worker(args)
    started = _dt.datetime.now()
    load_before = os.getloadavg()[0]
    mem = {c: measure_memory(c, args) for c in CONFIGS}
    timing = time_interleaved(args)
    load_after = os.getloadavg()[0]
    import torch
    import transformers

    command = command_line("bench_train_memory.py", args, p, ("worker", "no_write"))
    lines = [MARK_START, f"### Results ({started:%Y-%m-%d %H:%M}–{_dt.datetime.now():%H:%M})", "",
             f"- command: `{command}`",
             f"- machine: {os.cpu_count()} CPU cores ({platform.machine()}), no GPU; torch threads {args.threads}",
             f"- torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}",
             f"- model: GPT-2 shape, {args.layers} layers × 12 heads × 768, vocab {args.vocab}, batch 1, fp32, "
             f"{args.length} tokens, one forward + backward of the LM loss; soft-cap {args.cap}",
             f"- load average before {load_before:.2f}, after {load_after:.2f} (other work on the machine: ratios come "
             "from interleaved rounds, memory does not depend on load)", "",
             "| configuration | peak MiB above model | × SDPA | median step s | × SDPA (time) |",
             "|---|---:|---:|---:|---:|"]
    for c in CONFIGS:
        lines.append(f"| {c} | {mem[c] / 2**20:,.0f} | {mem[c] / mem['sdpa']:.2f}× | {timing['median'][c]:.2f} | "
                     f"{timing['ratio'][c]:.2f}× |")
    lines += ["", f"Target (issue 8): attnkit-softcap peak ≤ 1.3× SDPA: {mem['attnkit-softcap'] / mem['sdpa']:.2f}× — "
              f"{'met' if mem['attnkit-softcap'] <= 1.3 * mem['sdpa'] else 'NOT met'}.", "",
              "<details><summary>raw (JSON)</summary>", "", "```json",
              json.dumps({"memory_bytes": mem, "times": timing["times"]}), "```", "</details>", MARK_END]
    block = "\n".join(lines)
    print(block)
    if not args.no_write:
        write_block(ROOT / "BENCHMARKS.md", "bench_train_memory", block,
                    "## Training-step memory with a soft-cap through the seam (`bench/bench_train_memory.py`)")


if __name__ == "__main__":
    main()
