"""Time and peak memory of a forward with full attention statistics, against the usual ways.

Configurations, all on the same randomly initialised GPT-2-shaped model (no hub), batch 1,
fp32, ``torch.no_grad()``, no KV cache (``use_cache=False``):

  sdpa            plain Hugging Face forward, ``attn_implementation="sdpa"`` (the baseline)
  eager           Hugging Face ``attn_implementation="eager"``, ``output_attentions=True``
  transformerlens TransformerLens ``HookedTransformer.run_with_cache`` (same shape)
  attnkit-all     ``attnkit.analyze(model, inputs)``: statistics of every row, head and layer
  attnkit-sampled ``attnkit.analyze(model, inputs, sample_rows=S)``: S random query rows per call

Method. Every (configuration, length) runs in two fresh Python processes, one for time and one
for memory, so one configuration's allocator state cannot leak into another's. Each builds the
model, makes the input and runs one warm-up forward. Time: the median wall time of
``--repeats`` forwards (default allocator). Memory: the process runs with glibc's mmap threshold
fixed at 128 KiB (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``), so every large
allocation is its own mapping, unmapped when freed, and RSS follows live memory; before each of
``--mem-repeats`` forwards ``gc.collect()`` and ``malloc_trim(0)`` hand freed pages back, the
kernel's peak-RSS counter is reset (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0) and the
current RSS is read; the forward's peak is ``VmHWM - VmRSS`` after it: everything the forward
allocated and touched on top of the model and the input, including what it returns (the logits,
the attention maps of ``eager``, the cache of TransformerLens). The largest of those peaks is
reported. ``tracemalloc`` would not see torch's allocations, hence RSS. All configurations of a
table are measured in one run of this script, so their ratios compare.

TransformerLens is not a dependency of attnkit: ``pip install "transformer-lens==3.9.*"``
(it installs beside torch 2.13 and transformers 5 without changing them).

    python bench/bench_analyze.py                       # the full table, writes BENCHMARKS.md
    python bench/bench_analyze.py --lengths 128 256 --repeats 2 --no-write   # a quick look
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
MARK_START = "<!-- bench_analyze:start -->"
MARK_END = "<!-- bench_analyze:end -->"


# ---------------------------------------------------------------------------- worker side
def _status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(k + r":\s+(\d+)", text).group(1)) * 1024 for k in ("VmRSS", "VmHWM")}


def _trim() -> None:
    """Hand freed heap pages back to the kernel (glibc)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def _hf_model(config: str, n_layer: int, vocab: int, n_ctx: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=n_layer, n_head=12, n_embd=768, n_positions=n_ctx, vocab_size=vocab)
    impl = "eager" if config == "eager" else "sdpa"
    return GPT2LMHeadModel._from_config(cfg, attn_implementation=impl).eval()


def _tl_model(n_layer: int, vocab: int, n_ctx: int):
    import warnings

    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=n_layer, d_model=768, n_heads=12, d_head=64, d_mlp=3072, d_vocab=vocab, n_ctx=n_ctx,
        act_fn="gelu_new", normalization_type="LN", positional_embedding_type="standard", device="cpu",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return HookedTransformer(cfg).eval()


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.manual_seed(0)
    config, length = args.worker, args.length
    if config == "transformerlens":
        model = _tl_model(args.layers, args.vocab, args.n_ctx)
    else:
        model = _hf_model(config, args.layers, args.vocab, args.n_ctx)
    ids = torch.randint(0, args.vocab, (1, length))

    # No KV cache anywhere: it is not part of the job, and it would pad every HF baseline's memory.
    if config == "sdpa":
        forward = lambda: model(input_ids=ids, use_cache=False)  # noqa: E731
    elif config == "eager":
        forward = lambda: model(input_ids=ids, use_cache=False, output_attentions=True)  # noqa: E731
    elif config == "transformerlens":
        forward = lambda: model.run_with_cache(ids)  # noqa: E731
    else:
        from attnkit.analyze.run import analyze

        rows = args.sample_rows if config == "attnkit-sampled" else None
        forward = lambda: analyze(model, {"input_ids": ids, "use_cache": False}, sample_rows=rows)  # noqa: E731

    times, peaks = [], []
    with torch.no_grad():
        out = forward()  # warm-up
        del out
        if args.part == "time":
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                out = forward()
                times.append(time.perf_counter() - t0)
                del out
        else:  # glibc was started with a fixed mmap threshold (see measure): RSS follows live memory
            for _ in range(args.mem_repeats):
                gc.collect()
                _trim()
                _reset_peak()
                base = _status()["VmRSS"]
                out = forward()
                peaks.append(_status()["VmHWM"] - base)
                del out
    print("RESULT " + json.dumps({"config": config, "length": length, "layers": args.layers,
                                  "times": times, "peaks": peaks, "threads": torch.get_num_threads()}))


# ---------------------------------------------------------------------------- driver side
def measure(config: str, length: int, layers: int, args: argparse.Namespace) -> dict:
    """Time in one fresh process, peak memory in another."""
    base = [sys.executable, __file__, "--worker", config, "--length", str(length), "--layers", str(layers),
            "--repeats", str(args.repeats), "--mem-repeats", str(args.mem_repeats), "--vocab", str(args.vocab),
            "--n-ctx", str(args.n_ctx), "--sample-rows", str(args.sample_rows)]
    env = dict(os.environ, PYTHONWARNINGS="ignore", TRANSFORMERS_VERBOSITY="error")
    # For memory, glibc serves every allocation of 128 KiB or more with its own mmap and unmaps it
    # when freed (a fixed threshold, not raised after frees): RSS then follows live memory.
    mem_env = dict(env, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    out = {}
    for part, e in (("time", env), ("mem", mem_env)):
        proc = subprocess.run(base + ["--part", part], capture_output=True, text=True, env=e)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if not lines:
            raise RuntimeError(f"{config} at {length} tokens ({part}) failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        r = json.loads(lines[-1][len("RESULT "):])
        if part == "time":
            out = r
        else:
            out["peaks"] = r["peaks"]
    out["time"] = statistics.median(out["times"])
    out["peak"] = max(out["peaks"])
    return out


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


def _contention() -> str:
    try:
        out = subprocess.run(["pgrep", "-af", "train_reference"], capture_output=True, text=True).stdout.strip()
    except FileNotFoundError:
        return "unknown"
    lines = [x for x in out.splitlines() if "pgrep" not in x]
    load = os.getloadavg()
    return ("none seen" if not lines else f"another process was running: {lines[0][:80]}") + \
        f"; load average before the run {load[0]:.2f}"


def table_markdown(results: list[dict], lengths: list[int], configs: list[str]) -> str:
    by = {(r["config"], r["length"]): r for r in results}
    head = "| configuration | " + " | ".join(f"{n} tok" for n in lengths) + " |"
    sep = "|---|" + "---:|" * len(lengths)
    def table(title: str, key: str, fmt) -> list[str]:
        rows = [title, "", head, sep]
        for c in configs:
            cells = []
            for n in lengths:
                r, base = by.get((c, n)), by.get(("sdpa", n))
                ratio = f" ({r[key] / base[key]:.2f}×)" if r and base else ""
                cells.append(f"{fmt(r[key])}{ratio}" if r else "–")
            rows.append(f"| {c} | " + " | ".join(cells) + " |")
        return rows

    out = table("**Time** (median seconds; × SDPA)", "time", lambda t: f"{t:.3f}")
    out += [""] + table("**Peak memory** above model + input (MiB; × SDPA)", "peak", _mib)
    return "\n".join(out)


def print_rich(results: list[dict], lengths: list[int], configs: list[str], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    by = {(r["config"], r["length"]): r for r in results}
    t = Table(title=title)
    t.add_column("configuration")
    for n in lengths:
        t.add_column(f"{n} tok time s (×)", justify="right")
        t.add_column(f"{n} tok MiB (×)", justify="right")
    for c in configs:
        cells = []
        for n in lengths:
            r, base = by.get((c, n)), by.get(("sdpa", n))
            if r is None:
                cells += ["–", "–"]
                continue
            tr = f" ({r['time'] / base['time']:.2f})" if base else ""
            mr = f" ({r['peak'] / base['peak']:.2f})" if base else ""
            cells += [f"{r['time']:.3f}{tr}", f"{_mib(r['peak'])}{mr}"]
        t.add_row(c, *cells)
    Console().print(t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024, 2048])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    p.add_argument("--layers", type=int, default=12, help="transformer blocks (GPT-2 small: 12)")
    p.add_argument("--vocab", type=int, default=50257, help="vocabulary (GPT-2: 50257)")
    p.add_argument("--n-ctx", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=5, help="measured forwards after one warm-up")
    p.add_argument("--mem-repeats", type=int, default=2, help="forwards whose peak memory is read (the largest is kept)")
    p.add_argument("--sample-rows", type=int, default=64)
    p.add_argument("--layer-check", type=int, nargs="*", default=[2, 8],
                   help="also measure attnkit-all and eager at --layer-check-length with these layer counts")
    p.add_argument("--layer-check-length", type=int, default=1024)
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    p.add_argument("--no-write", action="store_true")
    # worker mode
    p.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    p.add_argument("--part", choices=("time", "mem"), default="time", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    contention = _contention()
    started = _dt.datetime.now()
    results = []
    for n in args.lengths:
        for c in args.configs:
            r = measure(c, n, args.layers, args)
            results.append(r)
            print(f"{c:>16} {n:>5} tok: {r['time']:.3f} s  {_mib(r['peak'])} MiB  "
                  f"(times {', '.join(f'{x:.3f}' for x in r['times'])})", flush=True)
    title = f"GPT-2 shape, {args.layers} layers × 12 heads × 768, vocab {args.vocab}, batch 1, fp32"
    print_rich(results, args.lengths, args.configs, title)

    layer_rows = []
    if args.layer_check:
        n = args.layer_check_length
        counts = sorted(set(args.layer_check) | {args.layers})
        for c in ("sdpa", "eager", "attnkit-all"):
            for L in counts:
                if L == args.layers and any(r["config"] == c and r["length"] == n for r in results):
                    r = next(r for r in results if r["config"] == c and r["length"] == n)
                else:
                    r = measure(c, n, L, args)
                layer_rows.append(r)
                print(f"layer check {c:>12} {L:>2} layers {n} tok: {r['time']:.3f} s  {_mib(r['peak'])} MiB", flush=True)

    finished = _dt.datetime.now()
    targets = target_lines(results, layer_rows, args)
    for line in targets:
        print(line)
    load_after = os.getloadavg()[0]
    if args.no_write:
        return
    cmd = "python bench/bench_analyze.py " + " ".join(sys.argv[1:])
    v = _versions()
    lines = [
        MARK_START,
        f"### Results ({started:%Y-%m-%d %H:%M}–{finished:%H:%M})",
        "",
        f"- command: `{cmd.strip()}`",
        f"- machine: {os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
        f"{_total_ram()} RAM, no GPU; torch threads {results[0]['threads']}",
        f"- torch {v['torch']}, transformers {v['transformers']}, transformer-lens {v['transformer-lens']}, "
        f"Python {v['python']}",
        f"- model: {title}; `attnkit-sampled` = {args.sample_rows} query rows per attention call",
        f"- time: median of {args.repeats} forwards after one warm-up; memory: largest peak of {args.mem_repeats} "
        "forwards after one warm-up, in a second process with a fixed mmap threshold (see the script's docstring)",
        f"- other load: {contention}; load average after the run {load_after:.2f}",
        "",
        table_markdown(results, args.lengths, args.configs),
    ]
    if layer_rows:
        lines += ["", f"**Memory against depth** at {args.layer_check_length} tokens (MiB above model + input; median time s)",
                  "", "| configuration | layers | time s | peak MiB |", "|---|---:|---:|---:|"]
        for r in layer_rows:
            lines.append(f"| {r['config']} | {r['layers']} | {r['time']:.3f} | {_mib(r['peak'])} |")
    if targets:
        lines += ["", "**Targets** (issue 2)", ""] + [f"- {t}" for t in targets]
    lines += ["", "<details><summary>raw measurements (JSON)</summary>", "", "```json",
              json.dumps({"results": results, "layer_check": layer_rows}, indent=None)[:200000], "```", "</details>",
              MARK_END]
    block = "\n".join(lines)
    path = Path(args.out)
    text = path.read_text() if path.exists() else "# Benchmarks\n\n" + MARK_START + "\n" + MARK_END + "\n"
    if MARK_START in text and MARK_END in text:
        pre, rest = text.split(MARK_START, 1)
        post = rest.split(MARK_END, 1)[1]
        text = pre + block + post
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
    print(f"wrote {path}")


def target_lines(results: list[dict], layer_rows: list[dict], args: argparse.Namespace) -> list[str]:
    """The issue's targets, met or missed, with the numbers."""
    by = {(r["config"], r["length"]): r for r in results}
    out = []
    for n in (1024, 2048):
        base, s = by.get(("sdpa", n)), by.get(("attnkit-sampled", n))
        if base and s:
            t, m = s["time"] / base["time"], s["peak"] / base["peak"]
            out.append(f"sampled rows ({args.sample_rows}) at {n} tokens: time {t:.2f}× SDPA (target ≤ 1.2×: "
                       f"{'met' if t <= 1.2 else 'MISSED'}), peak memory {m:.2f}× (target ≤ 1.5×: {'met' if m <= 1.5 else 'MISSED'})")
    a, e = by.get(("attnkit-all", 2048)), by.get(("eager", 2048))
    if a and e:
        out.append(f"all rows at 2048 tokens: {a['time']:.2f} s against eager's {e['time']:.2f} s "
                   f"(target: no slower than eager: {'met' if a['time'] <= e['time'] else 'MISSED'})")
    rows = sorted((r for r in layer_rows if r["config"] == "attnkit-all"), key=lambda r: r["layers"])
    if len(rows) >= 2:
        lo, hi = rows[0], rows[-1]
        grow = hi["peak"] / lo["peak"]
        out.append(f"all rows, memory against depth at {lo['length']} tokens: {_mib(lo['peak'])} MiB with {lo['layers']} "
                   f"layers, {_mib(hi['peak'])} MiB with {hi['layers']} ({grow:.2f}×; target: does not grow with "
                   f"the number of layers: {'met' if grow <= 1.1 else 'MISSED'})")
    return out


def _total_ram() -> str:
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
        return f"{kb / 2**20:.0f} GiB"
    except Exception:  # noqa: BLE001
        return "?"


if __name__ == "__main__":
    main()
