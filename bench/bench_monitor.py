"""Cost of ``AttentionMonitor`` on a training step of the reference model.

Three copies of attnkit's reference model (GPT-2, 4 layers × 4 heads × 128, vocab 1024) train on
the same batches (AdamW, batch ``--batch`` × 128 tokens, fp32) in one process, in interleaved
rounds (the arms' order rotates each round, so drifts in machine load fall on all of them):

  plain        nothing attached
  monitored    ``AttentionMonitor(model)`` at its default setting (1 step in DEFAULT_EVERY observed:
               per-head statistics, q/k gradient norms, trend detection, JSONL)
  every-step   ``AttentionMonitor(model, every=1)``: the cost of one observed step

Each round runs ``--block`` steps of each arm (a multiple of DEFAULT_EVERY, so a monitored block
holds the same number of observed steps every round); the figure is the median over rounds of
the per-round ratio of mean step times to plain.

    python bench/bench_monitor.py                  # writes its block in BENCHMARKS.md
    python bench/bench_monitor.py --rounds 3 --no-write
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import markers, write_block  # noqa: E402

MARK_START, MARK_END = markers("bench_monitor")
ARMS = ("plain", "monitored", "every-step")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--block", type=int, default=None, help="steps per arm per round (default 2 x DEFAULT_EVERY)")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()

    import torch
    import transformers

    from attnkit.common.loading.registry import load_model
    from attnkit.monitor import DEFAULT_EVERY, AttentionMonitor

    torch.set_num_threads(args.threads)
    block = args.block or 2 * DEFAULT_EVERY
    load_before = os.getloadavg()[0]
    started = _dt.datetime.now()
    models, opts, monitors = {}, {}, {}
    tmp = tempfile.mkdtemp(prefix="bench_monitor.")
    for arm in ARMS:
        models[arm] = load_model("reference").model.train()
        opts[arm] = torch.optim.AdamW(models[arm].parameters(), lr=1e-4)
    monitors["monitored"] = AttentionMonitor(models["monitored"], log_dir=f"{tmp}/m", emit=()).start()
    monitors["every-step"] = AttentionMonitor(models["every-step"], every=1, log_dir=f"{tmp}/e", emit=()).start()
    vocab, T = models["plain"].config.vocab_size, models["plain"].config.n_positions
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (args.batch, T), generator=g) for _ in range(block)]
    steps = {arm: 0 for arm in ARMS}

    def run(arm: str) -> float:
        model, opt, mon = models[arm], opts[arm], monitors.get(arm)
        t0 = time.perf_counter()
        for x in batches:
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if mon is not None:
                mon.on_step(steps[arm], loss=loss)
            steps[arm] += 1
        return (time.perf_counter() - t0) / len(batches)

    for arm in ARMS:  # warm-up
        run(arm)
    times = {arm: [] for arm in ARMS}
    for r in range(args.rounds):
        order = ARMS[r % 3:] + ARMS[:r % 3]
        for arm in order:
            times[arm].append(run(arm))
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{a} {times[a][-1] * 1e3:.1f} ms" for a in ARMS),
              flush=True)
    for mon in monitors.values():
        mon.close()
    ratio = {arm: statistics.median(t / p for t, p in zip(times[arm], times["plain"])) for arm in ARMS}
    plain_ms = statistics.median(times["plain"]) * 1e3
    overhead = ratio["monitored"] - 1
    observed_cost = (ratio["every-step"] - 1) * plain_ms
    lines = [
        MARK_START,
        f"### Results ({started:%Y-%m-%d %H:%M}–{_dt.datetime.now():%H:%M})", "",
        "- command: `python bench/bench_monitor.py" + (f" --rounds {args.rounds}" if args.rounds != 10 else "") + "`",
        f"- machine: {os.cpu_count()} CPU cores ({platform.machine()}), no GPU; torch threads {args.threads}",
        f"- torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}",
        f"- model: attnkit's reference GPT-2 (4 × 4 × 128, vocab 1024), AdamW, batch {args.batch} × {T} tokens, fp32; "
        f"{args.rounds} interleaved rounds of {block} steps per arm; default setting: 1 step in {DEFAULT_EVERY} observed",
        f"- load average before {load_before:.2f}, after {os.getloadavg()[0]:.2f} (other work on the machine: "
        "ratios come from interleaved rounds)", "",
        "| arm | median step ms | × plain (median of per-round ratios) |",
        "|---|---:|---:|",
        *[f"| {arm} | {statistics.median(times[arm]) * 1e3:.1f} | {ratio[arm]:.3f}× |" for arm in ARMS],
        "",
        f"Target (issue 12): the default setting costs ≤ 5 % of the training step: "
        f"{overhead * 100:+.1f} % — {'met' if overhead <= 0.05 else 'missed'}. "
        f"One observed step costs {ratio['every-step']:.2f}× a plain step ({observed_cost:+.1f} ms).", "",
        "<details><summary>raw (JSON)</summary>", "", "```json",
        json.dumps({"times_s": times, "ratio": ratio}), "```", "</details>",
        MARK_END,
    ]
    block_text = "\n".join(lines)
    print(block_text)
    if not args.no_write:
        write_block(ROOT / "BENCHMARKS.md", "bench_monitor", block_text)


if __name__ == "__main__":
    sys.exit(main())
