"""Peak memory and time of block-sparse attention against dense SDPA and dense eager, by length.

Configurations, on one model (default ``reference-long``), batch 1, fp32:

  dense-sdpa            the model's own SDPA attention (on the CPU: PyTorch's flash kernel, O(T) memory)
  dense-eager           the model's eager attention: the (T × T) scores and probabilities of every
                        head kept for backward (what the seed's dense baseline is)
  PATTERN@DENSITY       ``sparse_attention`` with that pattern and density (``--patterns``,
                        ``--densities``); learned_gate with its gates (untrained: the cost is the same)
  PATTERN@DENSITY/flex  the same selection run by compiled FlexAttention (``--flex``: inference only,
                        PyTorch has no CPU backward for it; the compile is a warm-up, not timed)

Two steps each: **inference** (a forward under ``no_grad``) and **training** (forward + backward of
the LM loss with every model parameter requiring grad, and the gates for learned_gate).

Memory: a fresh process per (configuration, length) (``bench/rss.py``): inference peak, then one
warm-up training step, then the largest training peak of ``--mem-repeats`` steps; bytes above what
was live before the step. Time: one process per length, interleaved rounds (every configuration
once a round), medians of per-round ratios to dense-sdpa.

    python bench/bench_sparse.py                                  # writes BENCHMARKS.md and runs/bench_sparse.json
    python bench/bench_sparse.py --lengths 512 --rounds 1 --no-write --model reference
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rss  # noqa: E402
from results import command_line, markers, publish  # noqa: E402
from sparse_options import add_sparse_options  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DENSE = ("dense-sdpa", "dense-eager")


def configs(args) -> list[str]:
    sparse = [f"{p}@{d:g}" for p in args.patterns.split(",") for d in map(float, args.densities.split(","))]
    flex = [f"{c}/flex" for c in args.flex.split(",") if c] if args.flex else []
    return [*DENSE, *sparse, *flex]


def build(args):
    import torch

    from attnkit.common.loading.registry import load_model

    torch.manual_seed(0)
    model = load_model(args.model).model
    model.set_attn_implementation("sdpa")
    return model.eval()


def steps(model, config: str, length: int, args) -> tuple:
    """(inference step, training step) closures for ``config`` at ``length`` tokens."""
    from contextlib import nullcontext

    import torch

    from attnkit.sparse import SparseConfig, make_gates, sparse_attention

    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(0))
    gates = None
    if config.startswith("dense-"):  # the model's own attention: dense-sdpa, dense-eager, dense-<registered>
        impl = config.split("-", 1)[1]

        def context():
            return nullcontext()
    else:
        spec, _, kernel = config.partition("/")
        pattern, density = spec.split("@")
        cfg = SparseConfig(pattern=pattern, density=float(density), block_size=args.block_size,
                           kernel=kernel or "auto")
        gates = make_gates(model, cfg)
        impl = "sdpa"

        def context():
            return sparse_attention(model, cfg, gates=gates)

    def run(train: bool):
        if train and config.endswith("/flex"):
            return None  # no CPU backward for FlexAttention
        model.set_attn_implementation(impl)
        try:
            if not train:
                with torch.no_grad(), context():
                    return model(input_ids=ids).logits.sum().item()
            model.zero_grad(set_to_none=False)
            if gates is not None:
                gates.zero_grad(set_to_none=False)
            with context():
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
            return loss.item()
        finally:
            model.set_attn_implementation("sdpa")

    for p in model.parameters():
        p.requires_grad_(True)
    return (lambda: run(False)), (lambda: run(True))


def memory_worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    model = build(args)
    infer, train = steps(model, args.worker, args.length, args)
    infer()  # warm-up: one-time allocations (caches, kernels) are not the step's
    inference = max(rss.peak_of(infer) for _ in range(args.mem_repeats))
    training = None
    if not args.worker.endswith("/flex"):
        train()  # warm-up: gradients are allocated once here
        training = max(rss.peak_of(train) for _ in range(args.mem_repeats))
    rss.report({"config": args.worker, "seq_len": args.length, "inference": inference, "train": training})


def measure_memory(config: str, length: int, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", config, "--length", str(length), "--model", args.model,
           "--block-size", str(args.block_size), "--mem-repeats", str(args.mem_repeats), "--threads", str(args.threads),
           "--patterns", args.patterns, "--densities", args.densities]
    return rss.run_fresh(cmd, f"{config} at {length} (memory)")


def time_interleaved(length: int, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    model = build(args)
    names = configs(args)
    fns = {n: steps(model, n, length, args) for n in names}
    for n in names:  # warm-up round
        fns[n][0]()
        fns[n][1]()
    times = {n: {"inference": [], "train": []} for n in names}
    for _ in range(args.rounds):
        for n in names:
            for mode, fn in zip(("inference", "train"), fns[n]):
                t = time.perf_counter()
                ran = fn()
                times[n][mode].append(time.perf_counter() - t if ran is not None else None)
    def ratio(n, m):
        pairs = [(a, b) for a, b in zip(times[n][m], times["dense-sdpa"][m]) if a is not None]
        return statistics.median(a / b for a, b in pairs) if pairs else None

    def median(n, m):
        ts = [t for t in times[n][m] if t is not None]
        return statistics.median(ts) if ts else None

    return {"times": times, "ratio": {n: {m: ratio(n, m) for m in ("inference", "train")} for n in names},
            "median": {n: {m: median(n, m) for m in ("inference", "train")} for n in names}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_sparse_options(p, pattern="moba,learned_gate", density="0.125,0.25,0.5", several=("pattern", "density"))
    p.add_argument("--lengths", default="512,1024,2048,4096")
    p.add_argument("--flex", default="", help="PATTERN@DENSITY,... also run by compiled FlexAttention (inference)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--mem-repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=str(ROOT / "runs" / "bench_sparse.json"))
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--block", default="bench_sparse",
                   help="name of the BENCHMARKS.md block this run replaces (another name keeps the default block's results)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return memory_worker(args)
    started = _dt.datetime.now(_dt.timezone.utc)
    load_before = os.getloadavg()[0]
    lengths = [int(x) for x in args.lengths.split(",")]
    mem, timing = {}, {}
    for n in lengths:
        mem[n] = {c: measure_memory(c, n, args) for c in configs(args)}
        timing[n] = time_interleaved(n, args)
        print(f"{n} tokens done", file=sys.stderr, flush=True)
    load_after = os.getloadavg()[0]
    doc = {"args": {k: v for k, v in vars(args).items() if k not in ("worker", "length")}, "memory": mem,
           "timing": timing, "load": [load_before, load_after], "started": started.isoformat()}
    publish(doc, args.json, render(doc, args, p, started), args.block,
            "## Block-sparse attention: memory and time (`bench/bench_sparse.py`)", not args.no_write)
    if not args.no_write:
        plot(doc, Path(args.json).with_suffix(""))


def render(doc: dict, args, parser, started) -> str:
    import torch
    import transformers

    command = command_line("bench_sparse.py", args, parser, ("worker", "length", "no_write", "json"))
    start, end = markers(args.block)
    lines = [start, f"### Results ({started:%Y-%m-%d %H:%M}–{_dt.datetime.now(_dt.timezone.utc):%H:%M} UTC)", "",
             f"- command: `{command}`",
             f"- machine: {os.cpu_count()} CPU cores ({platform.machine()}), no GPU; torch threads {args.threads}",
             f"- torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}",
             f"- model: `{args.model}`, batch 1, fp32; block size {args.block_size}; training = forward + backward of the "
             "LM loss, every parameter requiring grad",
             f"- load average before {doc['load'][0]:.2f}, after {doc['load'][1]:.2f} (time ratios come from interleaved "
             "rounds; memory does not depend on load)", "",
             "| tokens | configuration | train peak MiB | × SDPA | × eager | infer peak MiB | × SDPA | × eager "
             "| train s | × SDPA | infer s | × SDPA |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n, by_config in doc["memory"].items():
        sd, ea = by_config["dense-sdpa"], by_config["dense-eager"]
        t = doc["timing"][n]
        for c, m in by_config.items():
            tr = m["train"]
            train_cells = (f"{tr / 2**20:,.1f} | {tr / sd['train']:.2f} | {tr / ea['train']:.2f}" if tr is not None
                           else "— | — | —")
            tt, rt = t["median"][c]["train"], t["ratio"][c]["train"]
            lines.append(
                f"| {n} | {c} | {train_cells} "
                f"| {m['inference'] / 2**20:,.1f} | {m['inference'] / sd['inference']:.2f} "
                f"| {m['inference'] / ea['inference']:.2f} | {_f(tt, 3)} | {_f(rt, 2)} "
                f"| {t['median'][c]['inference']:.3f} | {t['ratio'][c]['inference']:.2f} |")
    lines += ["", "<details><summary>raw (JSON)</summary>", "", "```json",
              json.dumps({"memory_bytes": doc["memory"], "times": {n: t["times"] for n, t in doc["timing"].items()}}),
              "```", "</details>", end]
    return "\n".join(lines)


def _f(x, digits: int) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def plot(doc: dict, stem: Path) -> None:
    from attnkit.common.io import write_atomic
    from attnkit.sparse.plots import memory_png

    rows = [{"config": c, "seq_len": int(n), "train": m["train"] / 2**20 if m["train"] is not None else None,
             "inference": m["inference"] / 2**20}
            for n, by_config in doc["memory"].items() for c, m in by_config.items()]
    for mode in ("train", "inference"):
        write_atomic(f"{stem}_{mode}_memory.png",
                     memory_png(rows, mode, f"peak MiB above the model ({mode})", f"{doc['args']['model']}: {mode} step"))


if __name__ == "__main__":
    main()
