"""Long context and real widths: ``analyze`` (statistics of every row) against a plain SDPA forward.

Two parts, each writing its own block of BENCHMARKS.md:

``--part lengths`` (default): a small Llama where attention dominates (4 layers, width 256, 8
heads, 2 key/value heads, MLP 1024, a 256-symbol vocabulary so the logits do not dominate time
or memory), random weights, fp32, batch 1, ``torch.no_grad()``, at 1k-32k tokens.

  time    one process, interleaved rounds (sdpa, attnkit-all, sdpa, ...) on one model object
          after one warm-up round; a configuration's ratio is the median over rounds of its time
          / SDPA's time in the same round (``bench_analyze.py`` explains why).
  memory  a fresh process per (configuration, length) with glibc's mmap threshold fixed
          (``rss.py``): the peak above model + input of the process's first forward (cold: what
          a user pays on each run, compile included if anything compiles) and the largest of
          ``--mem-repeats`` later ones (warm). The first forward's wall time is recorded too
          (a cold process; these processes run one after another, so their ratio follows load).

``--part widths``: a Llama-3.2-1B shape (16 layers, width 2048, 32 heads, 8 key/value heads,
MLP 8192, vocab 128256) and a Llama-2-7B shape (32 layers, 4096, 32 heads, MLP 11008, vocab
32000) in bf16 with random weights (built directly in bf16: no float32 copy, init in seconds),
one fresh process per shape: interleaved rounds of sdpa and attnkit-all, each forward's time and
peak memory (``rss.peak_of``) in that process. It also checks that the statistics ran in the
model's dtype (``Analysis.dtype``, and ``qk_absmax`` taken from bf16 scores: every head's value
is a bf16 number).

    python bench/bench_long_context.py --part lengths                      # 1k-32k, writes BENCHMARKS.md
    python bench/bench_long_context.py --part lengths --lengths 1024 2048 --rounds 2 --no-memory --no-write
    python bench/bench_long_context.py --part widths --width-tokens 512
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import rss  # noqa: E402
from bench_analyze import _mib, _other_load, _total_ram, _versions, interleaved_rounds  # noqa: E402
from results import markers, write_block  # noqa: E402

CONFIGS = ("sdpa", "attnkit-all")
SMALL = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2)
SHAPES = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    "llama-2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32000),
}


# ---------------------------------------------------------------------------- models and forwards
def build(shape: str, vocab: int, positions: int):
    """A randomly initialised LlamaForCausalLM of ``shape`` ("small" or a key of SHAPES)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if shape == "small":
        cfg, dtype = LlamaConfig(**SMALL, vocab_size=vocab, max_position_embeddings=positions), torch.float32
    else:
        cfg, dtype = LlamaConfig(**SHAPES[shape], max_position_embeddings=positions), torch.bfloat16
    if shape == "small":
        return LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=dtype).eval()
    # Built on the meta device in bf16 (a 7B model is 13 GiB in bf16; float32 would not fit beside
    # it), then filled: transformers' own initialisation takes minutes at these sizes on 2 cores,
    # so each tensor is tiled with one block of N(0, 0.02) numbers (norm weights 1). The cost of a
    # forward does not depend on the values.
    with torch.device("meta"):
        model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    model.to_empty(device="cpu")
    block = (torch.randn(1 << 20) * 0.02).to(dtype)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if "rotary" in name:
                continue
            if name.endswith("norm.weight"):
                t.fill_(1.0)
                continue
            flat = t.view(-1)
            for start in range(0, flat.numel(), block.numel()):
                n = min(block.numel(), flat.numel() - start)
                flat[start : start + n].copy_(block[:n])
        rotary = model.model.rotary_emb  # its inv_freq was made on the meta device: remake it
        inv_freq, rotary.attention_scaling = rotary.compute_default_rope_parameters(rotary.config)
        rotary.inv_freq.copy_(inv_freq)
        rotary.original_inv_freq.copy_(inv_freq)
    return model.eval()


def forwards(model) -> dict:
    from attnkit.analyze.run import analyze

    return {
        "sdpa": lambda ids: model(input_ids=ids, use_cache=False),
        "attnkit-all": lambda ids: analyze(model, {"input_ids": ids, "use_cache": False}),
    }


def _ids(vocab: int, n: int):
    import torch

    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(n))


# ---------------------------------------------------------------------------- lengths: time
def time_lengths(args: argparse.Namespace) -> dict:
    import torch

    model = build("small", args.vocab, max(args.lengths))
    fns = forwards(model)
    out = {"lengths": {}, "load": [], "threads": torch.get_num_threads()}
    for n in args.time_lengths or args.lengths:
        ids = _ids(args.vocab, n)
        rounds = args.rounds_long if n >= args.long_from else args.rounds
        times, cpu, warm = interleaved_rounds(fns, CONFIGS, ids, rounds, f"{n} tok", out["load"])
        base, cbase = times["sdpa"], cpu["sdpa"]
        out["lengths"][n] = {
            c: {"times": times[c], "time": statistics.median(times[c]), "warmup": warm[c], "rounds": rounds,
                "ratio": statistics.median(t / b for t, b in zip(times[c], base)),
                "ratio_spread": (min(t / b for t, b in zip(times[c], base)), max(t / b for t, b in zip(times[c], base))),
                "cpu_times": cpu[c], "cpu_ratio": statistics.median(t / b for t, b in zip(cpu[c], cbase))}
            for c in CONFIGS
        }
    return out


# ---------------------------------------------------------------------------- lengths: memory, fresh processes
def memory_worker(args: argparse.Namespace) -> None:
    import torch

    fn = forwards(build("small", args.vocab, args.length))[args.worker]
    ids = _ids(args.vocab, args.length)
    with torch.no_grad():
        t0 = time.perf_counter()
        cold = rss.peak_of(lambda: fn(ids))  # the first forward of a fresh process
        cold_s = time.perf_counter() - t0
        peaks = [rss.peak_of(lambda: fn(ids)) for _ in range(args.mem_repeats)]
    rss.report({"config": args.worker, "length": args.length, "cold_peak": cold, "cold_seconds": cold_s,
                "peaks": peaks, "peak": max(peaks)})


def measure_memory(config: str, n: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", config, "--length", str(n), "--vocab", str(args.vocab),
           "--mem-repeats", str(args.mem_repeats)] + (["--threads", str(args.threads)] if args.threads else [])
    return rss.run_fresh(cmd, f"{config} at {n} tokens (memory)")


# ---------------------------------------------------------------------------- widths: one fresh process per shape
def width_worker(args: argparse.Namespace) -> None:
    import torch

    t0 = time.perf_counter()
    model = build(args.shape, 0, max(args.width_tokens, 2048))
    built = time.perf_counter() - t0
    vocab = model.config.vocab_size
    fns = forwards(model)
    ids = _ids(vocab, args.width_tokens)
    times = {c: [] for c in CONFIGS}
    peaks = {c: [] for c in CONFIGS}
    warm, analysis = {}, None
    with torch.no_grad():
        for c in CONFIGS if args.width_warmup else ():  # warm-up round (first forward of the process)
            t0 = time.perf_counter()
            res = fns[c](ids)
            warm[c] = time.perf_counter() - t0
            if c == "attnkit-all":
                analysis = res
            del res
        for rnd in range(args.width_rounds):
            for c in CONFIGS:
                t0 = time.perf_counter()
                box = []
                peaks[c].append(rss.peak_of(lambda: box.append(fns[c](ids))))
                times[c].append(time.perf_counter() - t0)
                if c == "attnkit-all":
                    analysis = box[0]
                del box
            print(f"{args.shape} round {rnd + 1}: " + "  ".join(f"{c} {times[c][-1]:.1f} s" for c in CONFIGS),
                  file=sys.stderr, flush=True)
    heads = analysis.heads
    absmax = [h["qk_absmax"] for h in heads if h.get("qk_absmax") is not None]
    in_bf16 = all(torch.tensor(v, dtype=torch.float32).to(torch.bfloat16).float().item() == v for v in absmax)
    rss.report({
        "shape": args.shape, "tokens": args.width_tokens, "build_seconds": built,
        "parameters": sum(p.numel() for p in model.parameters()),
        "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "times": times, "peaks": peaks, "warmup": warm, "load_end": os.getloadavg()[0],
        "analysis_dtype": str(analysis.dtype), "heads": len(heads), "qk_absmax_is_bf16": in_bf16,
        "qk_absmax_max": max(absmax) if absmax else None,
    })


# ---------------------------------------------------------------------------- report
def _header(args, started, finished, extra: list[str]) -> list[str]:
    v = _versions()
    import torch

    return [
        f"### Results ({started:%Y-%m-%d %H:%M}–{finished:%H:%M} UTC)", "",
        f"- command: `python bench/bench_long_context.py {' '.join(sys.argv[1:])}`",
        f"- machine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), {_total_ram()} RAM, "
        f"no GPU; torch threads {torch.get_num_threads()}",
        f"- torch {v['torch']}, transformers {v['transformers']}, Python {v['python']}",
        *extra,
    ]


def write_lengths(args, timing, mem, started, finished, load_before, others) -> None:
    L = args.lengths
    head = "| configuration | " + " | ".join(f"{n:,} tok" for n in L) + " |"
    sep = "|---|" + "---:|" * len(L)
    TL = list(timing["lengths"]) if timing else []
    thead = "| configuration | " + " | ".join(f"{n:,} tok" for n in TL) + " |"
    tsep = "|---|" + "---:|" * len(TL)
    loads = timing["load"] if timing else [0.0]
    extra = [
        f"- model: Llama, {SMALL['num_hidden_layers']} layers, width {SMALL['hidden_size']}, "
        f"{SMALL['num_attention_heads']} heads, {SMALL['num_key_value_heads']} key/value heads, MLP "
        f"{SMALL['intermediate_size']}, vocab {args.vocab}, random weights, batch 1, fp32, `torch.no_grad()`",
        f"- time: interleaved rounds in one process after one warm-up round ({args.rounds} rounds; "
        f"{args.rounds_long} at {args.long_from:,} tokens and more), order {', '.join(CONFIGS)}",
        f"- memory: a fresh process per configuration and length; cold = the process's first forward, warm = "
        f"largest of {args.mem_repeats} later forwards",
        f"- load average (1 min): {load_before:.2f} before, {min(loads):.2f}–{max(loads):.2f} during the timed rounds",
        f"- other load seen at the start: {'; '.join(others) or 'none above 20 % CPU'}",
        f"- `ATTNKIT_COMPILE`: {os.environ.get('ATTNKIT_COMPILE', 'unset (auto)')}",
    ]
    lines = [markers("bench_long_context")[0], *_header(args, started, finished, extra), ""]
    if timing:
        lines += ["**Time**: median wall s over rounds (**median of per-round ratio to SDPA**; smallest–largest "
                  "ratio; median CPU-time ratio)", "", thead, tsep]
        for c in CONFIGS:
            cells = []
            for n in TL:
                r = timing["lengths"][n][c]
                lo, hi = r["ratio_spread"]
                cells.append(f"{r['time']:.2f} (**{r['ratio']:.2f}×**; {lo:.2f}–{hi:.2f}; CPU {r['cpu_ratio']:.2f}×)")
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
        lines.append("")
    if mem:
        for key, title in (("peak", "warm"), ("cold_peak", "cold (first forward of a fresh process)")):
            lines += [f"**Peak memory above model + input, {title}** (MiB; × SDPA)", "", head, sep]
            for c in CONFIGS:
                cells = [f"{_mib(mem[(c, n)][key])} ({mem[(c, n)][key] / mem[('sdpa', n)][key]:.2f}×)" for n in L]
                lines.append(f"| {c} | " + " | ".join(cells) + " |")
            lines.append("")
        lines += ["**First forward of a fresh process** (wall s; processes one after another, so the ratio follows "
                  "the load)", "", head, sep]
        for c in CONFIGS:
            cells = [f"{mem[(c, n)]['cold_seconds']:.2f} ({mem[(c, n)]['cold_seconds'] / mem[('sdpa', n)]['cold_seconds']:.2f}×)"
                     for n in L]
            lines.append(f"| {c} | " + " | ".join(cells) + " |")
        lines.append("")
    targets = []
    if timing and 16384 in timing["lengths"]:
        t = timing["lengths"][16384]["attnkit-all"]["ratio"]
        targets.append(f"time at 16,384 tokens: {t:.2f}× SDPA (target ≤ 2×: {'met' if t <= 2 else 'MISSED'})")
    if mem:
        worst = max(max(mem[("attnkit-all", n)][k] / mem[("sdpa", n)][k] for k in ("peak", "cold_peak")) for n in L)
        targets.append(f"peak memory, worst of cold and warm over {L[0]:,}–{L[-1]:,} tokens: {worst:.2f}× SDPA "
                       f"(target ≤ 1.2×: {'met' if worst <= 1.2 else 'MISSED'})")
    if targets:
        lines += ["**Targets**", ""] + [f"- {t}" for t in targets] + [""]
    raw = {"timing": {str(n): d for n, d in timing["lengths"].items()} if timing else None,
           "load_during": loads, "memory": [dict(r) for r in mem.values()]}
    lines += ["<details><summary>raw measurements (JSON)</summary>", "", "```json", json.dumps(raw), "```",
              "</details>", markers("bench_long_context")[1]]
    write_block(Path(args.out), "bench_long_context", "\n".join(lines),
                heading="## Long context and real widths (`bench/bench_long_context.py`)")


def write_widths(args, results, started, finished) -> None:
    extra = [f"- each shape in its own fresh process (fixed mmap threshold): one warm-up round, then "
             f"{args.width_rounds} interleaved rounds of {', '.join(CONFIGS)}; each forward's time and its peak "
             "memory above what was live before it (`rss.peak_of`)",
             f"- {args.width_tokens} tokens, batch 1, bf16, random weights, `torch.no_grad()`"]
    lines = [markers("bench_long_context_widths")[0], *_header(args, started, finished, extra), "",
             "| shape | parameters | config | median s | × SDPA (median of per-round ratios) | peak MiB above model | × SDPA |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in results:
        for c in CONFIGS:
            ratio = statistics.median(t / b for t, b in zip(r["times"][c], r["times"]["sdpa"]))
            pk, pb = max(r["peaks"][c]), max(r["peaks"]["sdpa"])
            lines.append(f"| {r['shape']} | {r['parameters'] / 1e9:.2f} B | {c} | {statistics.median(r['times'][c]):.1f} | "
                         f"{ratio:.2f}× | {_mib(pk)} | {pk / pb:.2f}× |")
    lines.append("")
    for r in results:
        lines.append(f"- {r['shape']}: built in {r['build_seconds']:.0f} s ({_mib(r['model_bytes'])} MiB of bf16 "
                     f"weights); first forwards {r['warmup'].get('sdpa', 0):.1f} s (sdpa), {r['warmup'].get('attnkit-all', 0):.1f} s "
                     f"(attnkit-all; 0 = no warm-up round); statistics dtype {r['analysis_dtype']}, {r['heads']} heads, every qk_absmax a "
                     f"bf16 value: {r['qk_absmax_is_bf16']} (largest {r['qk_absmax_max']}); load at the end "
                     f"{r['load_end']:.1f}")
    lines += ["", "<details><summary>raw measurements (JSON)</summary>", "", "```json", json.dumps(results), "```",
              "</details>", markers("bench_long_context_widths")[1]]
    write_block(Path(args.out), "bench_long_context_widths", "\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=("lengths", "widths"), default="lengths")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    p.add_argument("--time-lengths", type=int, nargs="+", help="lengths timed (default: --lengths)")
    p.add_argument("--threads", type=int, help="torch threads in every process (default: torch's)")
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--rounds-long", type=int, default=3, help="rounds at --long-from tokens and more")
    p.add_argument("--long-from", type=int, default=32768)
    p.add_argument("--mem-repeats", type=int, default=2)
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-time", action="store_true")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--width-tokens", type=int, default=512)
    p.add_argument("--width-rounds", type=int, default=2)
    p.add_argument("--width-warmup", type=int, default=1, help="1: one warm-up round before the timed ones")
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    p.add_argument("--width-worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--shape", help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.worker:
        return memory_worker(args)
    if args.width_worker:
        return width_worker(args)

    started = _dt.datetime.now(_dt.timezone.utc)
    if args.part == "widths":
        results = []
        for shape in args.shapes:
            cmd = [sys.executable, __file__, "--width-worker", "--shape", shape, "--width-tokens", str(args.width_tokens),
                   "--width-rounds", str(args.width_rounds), "--width-warmup", str(args.width_warmup)]
            cmd += ["--threads", str(args.threads)] if args.threads else []
            r = rss.run_fresh(cmd, f"{shape} at {args.width_tokens} tokens")
            print(json.dumps(r), flush=True)
            results.append(r)
        if not args.no_write:
            write_widths(args, results, started, _dt.datetime.now(_dt.timezone.utc))
        return

    load_before, others = os.getloadavg()[0], _other_load()
    timing = None if args.no_time else time_lengths(args)
    mem = {}
    if not args.no_memory:
        for n in args.lengths:
            for c in CONFIGS:
                mem[(c, n)] = r = measure_memory(c, n, args)
                print(f"memory {c:>12} {n:>6} tok: warm {_mib(r['peak'])} MiB, cold {_mib(r['cold_peak'])} MiB, "
                      f"first forward {r['cold_seconds']:.2f} s", flush=True)
    if not args.no_write:
        write_lengths(args, timing, mem, started, _dt.datetime.now(_dt.timezone.utc), load_before, others)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
