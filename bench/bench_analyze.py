"""Time and peak memory of a forward with full attention statistics, against the usual ways.

Configurations, all on the same randomly initialised GPT-2-shaped model (no hub), batch 1,
fp32, ``torch.no_grad()``, no KV cache (``use_cache=False``):

  sdpa            plain Hugging Face forward, ``attn_implementation="sdpa"`` (the baseline)
  eager           Hugging Face eager attention, ``output_attentions=True`` (keeps every n x n map)
  transformerlens TransformerLens ``HookedTransformer.run_with_cache`` (same shape), if installed
  attnkit-all     ``attnkit.analyze(model, inputs)``: statistics of every row, head and layer
  attnkit-sampled ``attnkit.analyze(model, inputs, sample_rows=S)``: S random query rows per call

Time, in one process with interleaved rounds. The machine is shared, and its load changes
by the minute: configurations measured one after another in separate processes see different
machines, so their ratios are not trustworthy. Here every configuration runs once per round, in
the order given (sdpa, eager, ..., sdpa, eager, ...), on one model object (eager switches its
attention implementation for its forward and back), after one warm-up round; ``gc.collect()``
runs before each timed forward, outside the timing. Each configuration's time is the median over
rounds, and its ratio to SDPA is the median over rounds of (its time / SDPA's time in the same
round): load that comes and goes hits both sides of a ratio alike. The warm-up round includes
what happens once per process (``torch.compile`` of attnkit's statistics kernel at large
calls): it is reported apart, with the kernel's compile time.

Memory, in fresh processes (one per configuration and length): allocator state and what a
previous configuration left behind cannot leak in. The process runs with glibc's mmap threshold
fixed at 128 KiB (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``), so every large
allocation is its own mapping, unmapped when freed, and RSS follows live memory; after one
warm-up forward, before each of ``--mem-repeats`` forwards ``gc.collect()`` and
``malloc_trim(0)`` hand freed pages back, the kernel's peak-RSS counter is reset
(``echo 5 > /proc/self/clear_refs``, Linux >= 4.0) and the current RSS is read; the forward's
peak is ``VmHWM - VmRSS`` after it: everything the forward allocated and touched on top of the
model and the input, including what it returns (the logits, the maps of ``eager``, the cache of
TransformerLens). The largest of those peaks is reported. Memory does not depend on the load,
so separate processes are right for it. ``tracemalloc`` would not see torch's allocations, and
torch's own memory profiler covers CUDA, not CPU, allocations; hence RSS.

TransformerLens is not a dependency of attnkit: ``pip install "transformer-lens==3.9.*"``
(it installs beside torch 2.13 and transformers 5 without changing them); without it that
configuration is left out, and the results say so.

    python bench/bench_analyze.py                                  # 1024 and 2048 tokens, writes BENCHMARKS.md
    python bench/bench_analyze.py --lengths 128 256 --rounds 3 --no-write --no-memory   # a quick look
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = ("sdpa", "eager", "transformerlens", "attnkit-all", "attnkit-sampled")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import rss  # noqa: E402
from results import OwnTime, interleave, markers, write_block  # noqa: E402

MARK_START, MARK_END = markers("bench_analyze")


# ---------------------------------------------------------------------------- models and forwards
def _hf_model(n_layer: int, vocab: int, n_ctx: int):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=n_layer, n_head=12, n_embd=768, n_positions=n_ctx, vocab_size=vocab)
    return GPT2LMHeadModel._from_config(cfg, attn_implementation="sdpa").eval()


def _tl_model(n_layer: int, vocab: int, n_ctx: int):
    import warnings

    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=n_layer, d_model=768, n_heads=12, d_head=64, d_mlp=3072, d_vocab=vocab, n_ctx=n_ctx,
        act_fn="gelu_new", normalization_type="LN", positional_embedding_type="standard", device="cpu",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return HookedTransformer(cfg).eval()


def has_transformerlens() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformer_lens") is not None


def forwards(configs: list[str], n_layer: int, args: argparse.Namespace, models: dict | None = None) -> dict:
    """{config: f(ids)} on one shared HF model (and a TransformerLens model when asked for)."""
    models = models if models is not None else {}
    if "hf" not in models and any(c != "transformerlens" for c in configs):
        models["hf"] = _hf_model(n_layer, args.vocab, args.n_ctx)
    if "transformerlens" in configs and "tl" not in models:
        models["tl"] = _tl_model(n_layer, args.vocab, args.n_ctx)
    hf = models.get("hf")

    def eager(ids):
        # The same weights as sdpa's: switch the implementation for this forward only.
        hf.set_attn_implementation("eager")
        try:
            return hf(input_ids=ids, use_cache=False, output_attentions=True)
        finally:
            hf.set_attn_implementation("sdpa")

    def attnkit(rows):
        from attnkit.analyze.run import analyze

        return lambda ids: analyze(hf, {"input_ids": ids, "use_cache": False}, sample_rows=rows)

    table = {
        "sdpa": lambda ids: hf(input_ids=ids, use_cache=False),
        "eager": eager,
        "transformerlens": lambda ids: models["tl"].run_with_cache(ids),
        "attnkit-all": attnkit(None),
        "attnkit-sampled": attnkit(args.sample_rows),
    }
    return {c: table[c] for c in configs}


# ---------------------------------------------------------------------------- time: interleaved rounds
def _other_load() -> list[str]:
    """Processes other than this one using a noticeable share of a CPU right now."""
    try:
        out = subprocess.run(["ps", "-eo", "pid,pcpu,etime,args", "--sort=-pcpu"], capture_output=True, text=True).stdout
    except FileNotFoundError:
        return []
    seen = []
    for line in out.splitlines()[1:]:
        parts = line.split(None, 3)
        if len(parts) < 4 or int(parts[0]) == os.getpid() or parts[3].startswith("ps "):
            continue
        if float(parts[1]) < 20:
            break
        seen.append(f"{parts[3][:70]} ({parts[1]} % CPU)")
    return seen[:4]


def interleaved_rounds(fns: dict, configs, ids, rounds: int, label: str, load: list[float]):
    """One warm-up round (compiles, caches, first-touch of buffers), then ``rounds`` rounds that run
    every configuration once in a fixed order under ``torch.no_grad()``, a ``gc.collect`` before each
    and its result freed outside its time: (wall times, process CPU times, warm-up times), each
    {config: ...}. The 1-minute load is appended to ``load`` before the rounds and after each."""
    import torch

    def call(c: str):
        def run() -> OwnTime:
            wall, cpu = time.perf_counter(), time.process_time()
            res = fns[c](ids)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            del res
            return OwnTime(wall, cpu)
        return run

    def progress(i: int, times: dict) -> None:
        load.append(os.getloadavg()[0])
        line = "  ".join(f"{c} {times[c]['wall'][-1]:.2f}" for c in configs)
        print(f"{label} round {i + 1}/{rounds}: {line}  (load {load[-1]:.2f})", flush=True)

    load.append(os.getloadavg()[0])  # with one after each round: the load at every round's start and end
    with torch.no_grad():
        measured = interleave({c: call(c) for c in configs}, rounds, before=gc.collect, after_round=progress)
    return ({c: measured[c]["wall"] for c in configs}, {c: measured[c]["cpu"] for c in configs},
            {c: measured[c]["warmup"][0] for c in configs})


def time_interleaved(lengths: list[int], configs: list[str], args: argparse.Namespace) -> dict:
    import torch

    from attnkit.metrics import fused

    fns = forwards(configs, args.layers, args)
    out = {"lengths": {}, "load": [], "threads": torch.get_num_threads()}
    for n in lengths:
        ids = torch.randint(0, args.vocab, (1, n), generator=torch.Generator().manual_seed(n))
        times, cpu, warm = interleaved_rounds(fns, configs, ids, args.rounds, f"{n} tok", out["load"])
        base = times.get("sdpa")
        out["lengths"][n] = {
            c: {
                "times": times[c], "time": statistics.median(times[c]), "warmup": warm[c],
                "ratio": statistics.median(t / b for t, b in zip(times[c], base)) if base else None,
                "ratio_spread": (min(t / b for t, b in zip(times[c], base)), max(t / b for t, b in zip(times[c], base))) if base else None,
                "cpu_times": cpu[c],
                "cpu_ratio": statistics.median(t / b for t, b in zip(cpu[c], cpu["sdpa"])) if base else None,
            }
            for c in configs
        }
    out["compile_seconds"] = fused.compile_seconds
    out["compile_failed"] = fused._compile_failed
    return out


# ---------------------------------------------------------------------------- memory: fresh processes
def memory_worker(args: argparse.Namespace) -> None:
    import torch

    fn = forwards([args.worker], args.layers, args)[args.worker]
    ids = torch.randint(0, args.vocab, (1, args.length), generator=torch.Generator().manual_seed(args.length))
    peaks = []
    with torch.no_grad():
        del_out = fn(ids)  # warm-up
        del del_out
        for _ in range(args.mem_repeats):  # glibc was started with a fixed mmap threshold: RSS follows live memory
            peaks.append(rss.peak_of(lambda: fn(ids)))
    rss.report({"config": args.worker, "length": args.length, "layers": args.layers, "peaks": peaks})


def measure_memory(config: str, length: int, layers: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", config, "--length", str(length), "--layers", str(layers),
           "--mem-repeats", str(args.mem_repeats), "--vocab", str(args.vocab), "--n-ctx", str(args.n_ctx),
           "--sample-rows", str(args.sample_rows)]
    # glibc serves every allocation of 128 KiB or more with its own mmap and unmaps it when freed
    # (a fixed threshold, not raised after frees): RSS then follows live memory.
    r = rss.run_fresh(cmd, f"{config} at {length} tokens (memory)")
    r["peak"] = max(r["peaks"])
    return r


# ---------------------------------------------------------------------------- report
def _mib(b: float) -> str:
    return f"{b / 2**20:,.0f}"


def _versions() -> dict[str, str]:
    import torch
    import transformers

    try:
        from importlib.metadata import version

        tl = version("transformer-lens")
    except Exception:  # noqa: BLE001
        tl = "not installed"
    return {"torch": torch.__version__, "transformers": transformers.__version__, "transformer-lens": tl,
            "python": platform.python_version()}


def _total_ram() -> str:
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        return f"{kb / 2**20:.0f} GiB"
    except Exception:  # noqa: BLE001
        return "?"


def time_table(timing: dict, lengths: list[int], configs: list[str]) -> list[str]:
    head = "| configuration | " + " | ".join(f"{n} tok" for n in lengths) + " |"
    rows = ["**Time** (median wall seconds over rounds; in brackets the median over rounds of the wall time / "
            "SDPA's wall time in the same round, then the smallest and largest such ratio, then the same median "
            "ratio of process CPU time)", "", head, "|---|" + "---:|" * len(lengths)]
    for c in configs:
        cells = []
        for n in lengths:
            r = timing["lengths"][n][c]
            lo, hi = r["ratio_spread"]
            cells.append(f"{r['time']:.3f} (**{r['ratio']:.2f}×**; {lo:.2f}–{hi:.2f}; CPU {r['cpu_ratio']:.2f}×)")
        rows.append(f"| {c} | " + " | ".join(cells) + " |")
    return rows


def memory_table(mem: dict, lengths: list[int], configs: list[str]) -> list[str]:
    head = "| configuration | " + " | ".join(f"{n} tok" for n in lengths) + " |"
    rows = ["**Peak memory** above model + input (MiB; × SDPA), fresh process each", "", head, "|---|" + "---:|" * len(lengths)]
    for c in configs:
        cells = []
        for n in lengths:
            r, base = mem.get((c, n)), mem.get(("sdpa", n))
            if r is None:
                cells.append("–")
                continue
            ratio = f" ({r['peak'] / base['peak']:.2f}×)" if base else ""
            cells.append(f"{_mib(r['peak'])}{ratio}")
        rows.append(f"| {c} | " + " | ".join(cells) + " |")
    return rows


def target_lines(timing: dict, mem: dict, depth: list[dict], args: argparse.Namespace) -> list[str]:
    """Issue 8's targets, met or missed, with the numbers."""
    out = []
    L = timing["lengths"] if timing else {}
    if 2048 in L and "attnkit-all" in L[2048]:
        t = L[2048]["attnkit-all"]["ratio"]
        out.append(f"all rows at 2048 tokens: time {t:.2f}× SDPA (target ≤ 1.3×: {'met' if t <= 1.3 else 'MISSED'}; "
                   f"CPU time {L[2048]['attnkit-all']['cpu_ratio']:.2f}×)")
    if 2048 in L and "attnkit-sampled" in L[2048]:
        t = L[2048]["attnkit-sampled"]["ratio"]
        out.append(f"sampled rows ({args.sample_rows}) at 2048 tokens: time {t:.2f}× SDPA (target ≤ 1.1×: "
                   f"{'met' if t <= 1.1 else 'MISSED'}; CPU time {L[2048]['attnkit-sampled']['cpu_ratio']:.2f}×)")
    rows = sorted((r for r in depth if r["config"] == "attnkit-all"), key=lambda r: r["layers"])
    if len(rows) >= 2:
        lo, hi = rows[0], rows[-1]
        grow = hi["peak"] / lo["peak"]
        out.append(f"all rows, memory against depth at {lo['length']} tokens: {_mib(lo['peak'])} MiB with {lo['layers']} "
                   f"layers, {_mib(hi['peak'])} MiB with {hi['layers']} ({grow:.2f}×; target: does not grow with "
                   f"the number of layers: {'met' if grow <= 1.1 else 'MISSED'})")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS,
                   help="in the order each round runs them; sdpa is always included (ratios are to it)")
    p.add_argument("--layers", type=int, default=12, help="transformer blocks (GPT-2 small: 12)")
    p.add_argument("--vocab", type=int, default=50257, help="vocabulary (GPT-2: 50257)")
    p.add_argument("--n-ctx", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=7, help="interleaved timed rounds after one warm-up round")
    p.add_argument("--mem-repeats", type=int, default=2, help="forwards whose peak memory is read (the largest is kept)")
    p.add_argument("--sample-rows", type=int, default=64)
    p.add_argument("--no-memory", action="store_true", help="time only")
    p.add_argument("--depth-check", type=int, nargs="*", default=[2, 8],
                   help="also measure peak memory of sdpa, eager and attnkit-all with these layer counts")
    p.add_argument("--depth-check-length", type=int, default=1024)
    p.add_argument("--warm-cache", action="store_true",
                   help="keep the user's inductor cache (default: a fresh one, so the compile time is a first run's)")
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    p.add_argument("--no-write", action="store_true")
    # memory worker mode
    p.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        memory_worker(args)
        return

    if not args.warm_cache:
        # A fresh inductor cache: the compile time reported is a first run's, not a cache hit's.
        import tempfile

        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="attnkit-bench-inductor-")
    configs = list(dict.fromkeys(["sdpa"] + args.configs))
    notes = []
    if "transformerlens" in configs and not has_transformerlens():
        configs.remove("transformerlens")
        notes.append("TransformerLens is not installed here: its configuration is left out")
    started = _dt.datetime.now(_dt.timezone.utc)
    load_before, others_before = os.getloadavg(), _other_load()

    timing = time_interleaved(args.lengths, configs, args)
    others_after = _other_load()
    mem, depth = {}, []
    if not args.no_memory:
        for n in args.lengths:
            for c in configs:
                mem[(c, n)] = r = measure_memory(c, n, args.layers, args)
                print(f"memory {c:>16} {n:>5} tok: {_mib(r['peak'])} MiB", flush=True)
        for c in ("sdpa", "eager", "attnkit-all"):
            for L in sorted(set(args.depth_check) | {args.layers}) if args.depth_check else []:
                n = args.depth_check_length
                r = mem.get((c, n)) if L == args.layers else None
                r = r or measure_memory(c, n, L, args)
                depth.append(r)
                print(f"memory {c:>12} {L:>2} layers {n} tok: {_mib(r['peak'])} MiB", flush=True)
    finished = _dt.datetime.now(_dt.timezone.utc)
    load_after = os.getloadavg()

    targets = target_lines(timing, mem, depth, args)
    for line in time_table(timing, args.lengths, configs):
        print(line)
    for line in targets:
        print(line)
    if args.no_write:
        return

    v = _versions()
    loads = timing["load"]
    cmd = "python bench/bench_analyze.py " + " ".join(sys.argv[1:])
    title = f"GPT-2 shape, {args.layers} layers × 12 heads × 768, vocab {args.vocab}, batch 1, fp32, `torch.no_grad()`"
    cache = "the user's inductor cache" if args.warm_cache else "a fresh inductor cache"
    compile_note = (f"attnkit's statistics kernel compiled once in the process in {timing['compile_seconds']:.1f} s "
                    f"with {cache} (inside the warm-up round, not in the timed rounds)" if timing["compile_seconds"] is not None
                    else f"attnkit's statistics kernel ran eagerly ({timing['compile_failed'] or 'calls below the compile threshold'})")
    lines = [
        MARK_START,
        f"### Results ({started:%Y-%m-%d %H:%M}–{finished:%H:%M} UTC)",
        "",
        f"- command: `{cmd.strip()}`",
        f"- machine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
        f"{_total_ram()} RAM, no GPU; torch threads {timing['threads']}",
        f"- torch {v['torch']}, transformers {v['transformers']}, transformer-lens {v['transformer-lens']}, "
        f"Python {v['python']}",
        f"- model: {title}; `attnkit-sampled` = {args.sample_rows} query rows per attention call",
        f"- time: {args.rounds} interleaved rounds in one process after one warm-up round, order "
        f"{', '.join(configs)}; memory: largest peak of {args.mem_repeats} forwards after one warm-up, a fresh process "
        "per configuration and length, fixed mmap threshold (see the script's docstring)",
        f"- load average (1 min): {load_before[0]:.2f} before, {min(loads):.2f}–{max(loads):.2f} during the timed rounds, "
        f"{load_after[0]:.2f} after",
        f"- other load seen: {'; '.join(others_before) or 'none above 20 % CPU'} (start); "
        f"{'; '.join(others_after) or 'none above 20 % CPU'} (end of timing)",
        f"- {compile_note}; warm-up forwards (s): "
        + ", ".join(f"{c} {timing['lengths'][n][c]['warmup']:.2f} at {n}" for n in args.lengths for c in configs if c.startswith("attnkit")),
    ] + [f"- {x}" for x in notes] + ["", *time_table(timing, args.lengths, configs)]
    if mem:
        lines += ["", *memory_table(mem, args.lengths, configs)]
    if depth:
        lines += ["", f"**Memory against depth** at {args.depth_check_length} tokens (MiB above model + input)", "",
                  "| configuration | layers | peak MiB |", "|---|---:|---:|"]
        lines += [f"| {r['config']} | {r['layers']} | {_mib(r['peak'])} |" for r in depth]
    if targets:
        lines += ["", "**Targets** (issue 8)", ""] + [f"- {t}" for t in targets]
    raw = {"timing": {str(n): d for n, d in timing["lengths"].items()}, "load_during": loads,
           "compile_seconds": timing["compile_seconds"],
           "memory": [dict(r) for r in mem.values()], "depth": depth}
    lines += ["", "<details><summary>raw measurements (JSON)</summary>", "", "```json",
              json.dumps(raw, indent=None), "```", "</details>", MARK_END]
    write_block(Path(args.out), "bench_analyze", "\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
