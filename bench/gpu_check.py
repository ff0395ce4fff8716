"""One run that checks attnkit's GPU branches and measures them: ≤ 8 minutes on one H100.

Parts, each with its own time budget (seconds, full / ``--quick``); a part starts no new item once
its budget is spent and says how many it left out, so the whole run stays within the sum of the
budgets plus one item per part:

  maps         captured maps equal the model's own eager maps, 5 architectures     (tests/gpu/device_checks.py)
  conformance  the flex conformance table: torch's flex_attention on the device, attnkit's kernels
               (compiled FlexAttention, dense, block-sparse) forward and backward
  training     the training contract: tapped gradients equal plain ones; a soft-cap through the seam
               (the flex kernel on CUDA) equals a float64 reference attention's gradients
  statistics   the fused statistics kernel, eager and compiled, float32/float16/bfloat16, vs float64
  sparse       block-sparse FlexAttention vs dense attention restricted to the kept blocks
  bench_stats  time and peak memory of a forward with every row's statistics (``attnkit.analyze``)
               against the same forward on SDPA (PyTorch's choice of backend) and on SDPA's
               FlashAttention backend alone, a Llama-shaped model in bfloat16 at 8k and 32k tokens
  bench_sparse the block-sparse flex kernel at densities 1/8, 1/4, 1/2 against dense causal SDPA,
               forward and forward+backward, at 8k and 32k tokens in bfloat16

Timing: interleaved rounds (every configuration once a round, after a warm-up round that is
reported apart: it includes compiles), ``torch.cuda.synchronize()`` around each call; medians, and
the median over rounds of each configuration's time over the baseline's in the same round. Peak
memory: ``torch.cuda.max_memory_allocated()`` above what was allocated before the call (the model
and inputs), in the warm-up round.

The checks are the functions ``tests/gpu`` asserts with; here a failing check is recorded (its
message) and the run goes on. Output: a JSON document (``--json``) and a markdown block
(``--markdown``, printed too); ``--write-benchmarks`` puts the block into BENCHMARKS.md, from a CUDA
run only. On the CPU the same code runs (``--device cpu --quick``: small shapes, float32, no
FlashAttention-only or backward-only configurations that the CPU lacks) to test the script itself.

    python bench/gpu_check.py                           # on a GPU machine: everything
    python bench/gpu_check.py --quick                   # a subset of every part, about 2 minutes
    python bench/gpu_check.py --write-benchmarks        # and put the results into BENCHMARKS.md
    python bench/gpu_check.py --device cpu --quick --parts statistics,training   # the script on the CPU
    python bench/gpu_check.py --dry-run                 # the plan: parts, budgets, items; runs nothing
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
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests" / "gpu"))
sys.path.insert(0, str(ROOT / "tests"))
from results import interleave, markers, median_ratio, write_block  # noqa: E402

BLOCK = "gpu_check"
HEADING = "## GPU: checks and benchmarks (`bench/gpu_check.py`)"
TOTAL_BUDGET_S = 8 * 60  # the promise: one H100, eight minutes


@dataclass(frozen=True)
class Part:
    name: str
    budget_s: float  # full run
    quick_budget_s: float
    items: Callable[[argparse.Namespace], list[tuple[str, Callable[[], dict]]]]
    what: str


# ---------------------------------------------------------------------------- the checks, as items
def _maps(args) -> list:
    from device_checks import MAP_ARCHS, maps_vs_eager

    archs = MAP_ARCHS[:2] if args.quick and args.device == "cpu" else MAP_ARCHS
    return [(a, lambda a=a: maps_vs_eager(a, args.device)) for a in archs]


def _conformance(args) -> list:
    from device_checks import conformance_case, conformance_table

    table = conformance_table(quick=args.quick)
    if args.quick and args.device == "cpu":
        table = table[:2]
    return [(f"{c} [{s}]", lambda c=c, s=s: conformance_case(c, s, args.device)) for c, s in table]


def _training(args) -> list:
    from device_checks import training_contract

    return [("llama-gqa soft-cap", lambda: training_contract(args.device))]


def _statistics(args) -> list:
    import torch

    from device_checks import statistics_case

    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    modes = (False,) if args.device == "cpu" and args.quick else (False, True)  # no C++ compile in a quick CPU run
    return [(f"{str(d).removeprefix('torch.')} {'compiled' if c else 'eager'}",
             lambda d=d, c=c: statistics_case(d, c, args.device)) for c in modes for d in dtypes]


def _sparse(args) -> list:
    from device_checks import SPARSE_SHAPES, sparse_flex_case

    shapes = list(SPARSE_SHAPES)[:1] if args.quick else list(SPARSE_SHAPES)
    densities = (0.25,) if args.quick else (0.25, 1.0)
    return [(f"{s} d={d} {'causal' if c else 'bidirectional'}", lambda s=s, d=d, c=c: sparse_flex_case(s, d, c, args.device))
            for s in shapes for d in densities for c in (True, False)]


# ---------------------------------------------------------------------------- benchmarks
def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fns: dict[str, Callable[[], object]], rounds: int, device, baseline: str) -> dict:
    """Each closure once a round after a warm-up round (``results.interleave``, the device synchronised
    around each call): {name: {median_ms, ratio, warmup_ms, peak_mib, error}}; a closure whose warm-up
    fails (out of memory, a backend that is not there) is recorded with its error and left out of the rounds."""
    import torch

    out: dict[str, dict] = {}
    live = {}
    for name, fn in fns.items():  # warm-up, with peak memory above what is allocated now
        try:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            out[name] = {"warmup_ms": 1e3 * (time.perf_counter() - t)}
            if device.type == "cuda":
                out[name]["peak_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
            live[name] = fn
        except Exception as exc:  # noqa: BLE001 - recorded: e.g. out of memory, a backend that is not there
            out[name] = {"error": _one_line(exc)}
            if device.type == "cuda":
                torch.cuda.empty_cache()
    def discard(fn):  # what a closure returns is not timing information
        def run():
            fn()
        return run

    times = interleave({n: discard(fn) for n, fn in live.items()}, rounds, warmup=0, sync=lambda: _sync(device))
    for name, t in times.items():
        out[name]["median_ms"] = 1e3 * statistics.median(t["wall"])
        if baseline in times:
            out[name]["ratio"] = median_ratio(t["wall"], times[baseline]["wall"])
        if baseline in out and "peak_mib" in out[name] and out[baseline].get("peak_mib"):
            out[name]["peak_ratio"] = out[name]["peak_mib"] / out[baseline]["peak_mib"]
    return out


def _bench_shapes(args) -> dict:
    """The Llama-shaped model and lengths: real widths on a GPU, a toy on the CPU."""
    if args.device == "cpu":
        return dict(layers=1, hidden=64, heads=4, kv_heads=2, inter=128, lengths=[256], dtype="float32", rounds=1)
    return dict(layers=2, hidden=2048, heads=16, kv_heads=8, inter=5632, dtype="bfloat16",
                lengths=[8192] if args.quick else [8192, 32768], rounds=2 if args.quick else 3)


def _stats_model(shape: dict, device, length: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=shape["hidden"], intermediate_size=shape["inter"],
                      num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                      num_key_value_heads=shape["kv_heads"], max_position_embeddings=max(length, 64))
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=getattr(torch, shape["dtype"]))
    return model.to(device).eval()


def _bench_stats(args) -> list:
    shape = _bench_shapes(args)
    return [(f"{n} tokens", lambda n=n: bench_stats_at(n, shape, args)) for n in shape["lengths"]]


def bench_stats_at(length: int, shape: dict, args) -> dict:
    """sdpa, flash (SDPA's FlashAttention backend only) and attnkit-stats (``attnkit.analyze``) at one length."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import attnkit

    device = _device(args)
    model = _stats_model(shape, device, length)
    ids = torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(0)).to(device)

    def sdpa():
        with torch.no_grad():
            model(ids, use_cache=False)

    def flash():
        with torch.no_grad(), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            model(ids, use_cache=False)

    def stats():
        return attnkit.analyze(model, {"input_ids": ids, "use_cache": False})

    result = measure({"sdpa": sdpa, "flash": flash, "attnkit-stats": stats}, shape["rounds"], device, "sdpa")
    from attnkit.metrics import fused

    return {"length": length, "model": {k: v for k, v in shape.items() if k not in ("lengths", "rounds")},
            "rounds": shape["rounds"], "configs": result, "stats_compile_s": fused.compile_seconds,
            "stats_compiled": fused._compiled is not None and fused._compile_failed is None}


def _bench_sparse(args) -> list:
    shape = _bench_shapes(args)
    return [(f"{n} tokens", lambda n=n: bench_sparse_at(n, shape, args)) for n in shape["lengths"]]


def bench_sparse_at(length: int, shape: dict, args) -> dict:
    """Dense causal SDPA against the block-sparse flex kernel at densities 1/8, 1/4, 1/2 (selection made
    beforehand, not timed), forward and, where FlexAttention has a backward, forward + backward."""
    import torch
    import torch.nn.functional as F

    from attnkit.seam.kernels.flex_block import flex_block_attention
    from attnkit.sparse import SparseConfig
    from attnkit.sparse.attention import choose_blocks
    from bench_block_kernel import attention_step

    device = _device(args)
    dtype = getattr(torch, shape["dtype"])
    H, Hk = shape["heads"], shape["kv_heads"]
    D = shape["hidden"] // H
    block = 128 if device.type == "cuda" else 64
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, length, D, generator=g).to(device, dtype) for h in (H, Hk, Hk))
    w = torch.randn(1, H, length, D, generator=g).to(device, dtype)
    densities = (0.125, 0.25, 0.5)
    selections = {d: choose_blocks(q, k, SparseConfig(pattern="sinks_window", density=d, block_size=block))
                  for d in densities}

    def attention(name: str):
        if name == "sdpa":
            return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != Hk)
        sel = selections[float(name.split("@")[1])]
        return lambda q, k, v: flex_block_attention(q, k, v, sel, scale=D ** -0.5)

    def step(fn, train: bool):
        return attention_step(fn, q, k, v, w, train)

    names = ["sdpa", *(f"flex@{d:g}" for d in densities)]
    out = {"length": length, "heads": H, "kv_heads": Hk, "head_dim": D, "block_size": block, "dtype": shape["dtype"],
           "kept": {f"flex@{d:g}": s.kept_blocks() / s.candidate_blocks() for d, s in selections.items()}}
    modes = (("forward", False), ("train", True)) if device.type == "cuda" else (("forward", False),)
    for mode, train in modes:
        out[mode] = measure({n: step(attention(n), train) for n in names}, shape["rounds"], device, "sdpa")
    return out


PARTS = {p.name: p for p in (
    Part("maps", 30, 20, _maps, "captured maps vs the model's own eager maps"),
    Part("conformance", 150, 60, _conformance, "flex conformance table: torch flex_attention vs attnkit kernels"),
    Part("training", 30, 30, _training, "training contract (tapped = plain; soft-cap = float64 reference)"),
    Part("statistics", 15, 10, _statistics, "fused statistics kernel vs float64 rows"),
    Part("sparse", 40, 20, _sparse, "block-sparse FlexAttention vs restricted dense"),
    Part("bench_stats", 130, 45, _bench_stats, "statistics vs SDPA and FlashAttention (time, memory)"),
    Part("bench_sparse", 55, 20, _bench_sparse, "block-sparse flex vs dense SDPA (time, memory)"),
)}


# ---------------------------------------------------------------------------- running
def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:400]}"


def _device(args):
    import torch

    return torch.device(args.device)


def run_part(part: Part, args) -> dict:
    budget = part.quick_budget_s if args.quick else part.budget_s
    started = time.perf_counter()
    try:
        items = part.items(args)
    except Exception as exc:  # noqa: BLE001 - a part that cannot even start is recorded, not fatal
        return {"what": part.what, "budget_s": budget, "error": _one_line(exc), "items": {}, "passed": 0, "failed": 0,
                "not_run": 0, "seconds": time.perf_counter() - started}
    results: dict[str, dict] = {}
    not_run = []
    for name, fn in items:
        if time.perf_counter() - started > budget:
            not_run.append(name)
            continue
        t = time.perf_counter()
        try:
            results[name] = {"ok": True, **fn()}
        except Exception as exc:  # noqa: BLE001 - a failing check is a result
            results[name] = {"ok": False, "error": _one_line(exc)}
            if args.verbose:
                traceback.print_exc()
        results[name]["seconds"] = round(time.perf_counter() - t, 3)
        print(f"  {part.name}: {name}: {'ok' if results[name]['ok'] else 'FAILED ' + results[name]['error']} "
              f"({results[name]['seconds']:.1f} s)", file=sys.stderr, flush=True)
    return {"what": part.what, "budget_s": budget, "seconds": time.perf_counter() - started, "items": results,
            "passed": sum(r["ok"] for r in results.values()), "failed": sum(not r["ok"] for r in results.values()),
            "not_run": len(not_run), "not_run_items": not_run}


def environment(args) -> dict:
    import torch
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "device": args.device, "platform": platform.platform()}
    if args.device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(torch.device(args.device))
        env["cuda"] = torch.version.cuda
        env["matmul_tf32"] = torch.backends.cuda.matmul.allow_tf32
    return env


# ---------------------------------------------------------------------------- rendering
def _ms(x) -> str:
    return "—" if x is None else f"{x:.1f}"


def _r(x) -> str:
    return "—" if x is None else f"{x:.2f}×"


def render(doc: dict) -> str:
    start, end = markers(BLOCK)
    env = doc["environment"]
    lines = [start, "", f"Command: `{doc['command']}` — {doc['date']}, {env.get('gpu', env['device'])}, "
             f"torch {env['torch']}, transformers {env['transformers']}; {doc['seconds']:.0f} s in all.", ""]
    lines += ["| part | what | passed | failed | not run (budget) | seconds |", "|---|---|---|---|---|---|"]
    for name, part in doc["parts"].items():
        lines.append(f"| {name} | {part['what']} | {part['passed']} | {part['failed']} | {part['not_run']} | "
                     f"{part['seconds']:.0f} |")
    failures = [(name, item, r.get("error", "")) for name, part in doc["parts"].items()
                for item, r in part["items"].items() if not r["ok"]]
    failures += [(name, "(part)", part["error"]) for name, part in doc["parts"].items() if part.get("error")]
    if failures:
        lines += ["", "Failures:", ""] + [f"- {n} / {i}: {e}" for n, i, e in failures]
    maps = doc["parts"].get("maps", {}).get("items", {})
    if maps:
        lines += ["", "| architecture | kind | maps | largest \\|captured − eager\\| |", "|---|---|---|---|"]
        lines += [f"| {n} | {r.get('category', '')} | {r.get('maps', '')} | "
                  f"{r['max_abs_diff']:.1e} |" if r["ok"] else f"| {n} | | | failed |" for n, r in maps.items()]
    training = doc["parts"].get("training", {}).get("items", {})
    for name, r in training.items():
        if r["ok"]:
            lines += ["", f"Training ({name}, {r['dtype']}): tapped gradients equal plain ones; soft-capped through the "
                      f"{r['modified_kernel']} kernel, largest gradient difference from the float64 reference "
                      f"{r['max_grad_diff_vs_float64']:.1e} over {r['parameters']} parameters."]
    for key, title in (("bench_stats", "Statistics of every row against SDPA and FlashAttention"),):
        items = doc["parts"].get(key, {}).get("items", {})
        rows = [r for r in items.values() if r["ok"]]
        if rows:
            m = rows[0]["model"]
            lines += ["", f"{title}: Llama-shaped, {m['layers']} layers, width {m['hidden']}, {m['heads']} heads "
                      f"({m['kv_heads']} KV), {m['dtype']}, batch 1, forward under no_grad; {rows[0]['rounds']} "
                      "interleaved rounds; ratios are medians of per-round ratios to `sdpa`.", "",
                      "| tokens | config | median ms | × sdpa | warm-up ms | peak MiB above model | × sdpa |",
                      "|---|---|---|---|---|---|---|"]
            for r in rows:
                for cfg, c in r["configs"].items():
                    if "error" in c:
                        lines.append(f"| {r['length']} | {cfg} | {c['error'][:80]} | | | | |")
                        continue
                    peak = c.get("peak_mib")
                    lines.append(f"| {r['length']} | {cfg} | {_ms(c.get('median_ms'))} | {_r(c.get('ratio'))} | "
                                 f"{_ms(c.get('warmup_ms'))} | {'—' if peak is None else f'{peak:.0f}'} | "
                                 f"{_r(c.get('peak_ratio'))} |")
    items = doc["parts"].get("bench_sparse", {}).get("items", {})
    rows = [r for r in items.values() if r["ok"]]
    if rows:
        r0 = rows[0]
        lines += ["", f"Block-sparse flex kernel against dense causal SDPA: {r0['heads']} heads ({r0['kv_heads']} KV), "
                  f"head dim {r0['head_dim']}, blocks of {r0['block_size']}, {r0['dtype']}, sinks_window selection made "
                  "beforehand.", "", "| tokens | mode | config | kept | median ms | × sdpa | peak MiB | × sdpa |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            for mode in ("forward", "train"):
                for cfg, c in r.get(mode, {}).items():
                    if "error" in c:
                        lines.append(f"| {r['length']} | {mode} | {cfg} | | {c['error'][:80]} | | | |")
                        continue
                    kept = r["kept"].get(cfg)
                    peak = c.get("peak_mib")
                    lines.append(f"| {r['length']} | {mode} | {cfg} | {'1' if kept is None else f'{kept:.2f}'} | "
                                 f"{_ms(c.get('median_ms'))} | {_r(c.get('ratio'))} | "
                                 f"{'—' if peak is None else f'{peak:.0f}'} | {_r(c.get('peak_ratio'))} |")
    lines += ["", end]
    return "\n".join(lines)


def _write_whole(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


# ---------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (to test this script; default: cuda)")
    p.add_argument("--quick", action="store_true", help="a subset of every part, with smaller budgets")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of: {', '.join(PARTS)} (default: all)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (parts, budgets, items) and run nothing")
    p.add_argument("--json", default=str(ROOT / "runs" / "gpu_check.json"), help="where the JSON results go")
    p.add_argument("--markdown", default=str(ROOT / "runs" / "gpu_check.md"), help="where the markdown block goes")
    p.add_argument("--write-benchmarks", action="store_true", help="put the block into BENCHMARKS.md (CUDA runs only)")
    p.add_argument("--verbose", action="store_true", help="print the traceback of a failing check")
    return p


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    wanted = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in wanted if p not in PARTS]
    if unknown or not wanted:
        parser.error(f"--parts: unknown {', '.join(unknown) or '(none given)'}; parts: {', '.join(PARTS)}")
    args.part_list = wanted
    import re

    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.device):
        parser.error(f"--device {args.device}: use cuda, cuda:N or cpu")
    if args.write_benchmarks and not args.device.startswith("cuda"):
        parser.error("--write-benchmarks records GPU figures: it needs --device cuda")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    budgets = {name: (PARTS[name].quick_budget_s if args.quick else PARTS[name].budget_s) for name in args.part_list}
    if args.dry_run:
        print(f"gpu_check plan ({'quick' if args.quick else 'full'}, device {args.device}); budgets add up to "
              f"{sum(budgets.values()):.0f} s of {TOTAL_BUDGET_S} s:")
        for name in args.part_list:
            print(f"  {name:<13} {budgets[name]:>4.0f} s  {PARTS[name].what}")
        return 0
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: CUDA is not available on this machine; use --device cpu to test the script", file=sys.stderr)
        return 2
    if args.device == "cpu":
        torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    started = time.perf_counter()
    doc = {"command": " ".join(["python bench/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
           "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "quick": args.quick,
           "environment": environment(args), "budgets_s": budgets, "parts": {}}
    from device_checks import recompiles_allowed

    # The conformance table compiles FlexAttention once per modifier: without a higher limit, every
    # later part's FlexAttention (the same compiled function) would fall back to eager and time that.
    with recompiles_allowed():
        for name in args.part_list:
            print(f"gpu_check: {name} (budget {budgets[name]:.0f} s)", file=sys.stderr, flush=True)
            doc["parts"][name] = run_part(PARTS[name], args)
    doc["seconds"] = time.perf_counter() - started
    block = render(doc)
    _write_whole(Path(args.json), json.dumps(doc, indent=1, default=str))
    _write_whole(Path(args.markdown), block + "\n")
    if args.write_benchmarks:
        write_block(ROOT / "BENCHMARKS.md", BLOCK, block, HEADING)
    print(block)
    failed = sum(p["failed"] + bool(p.get("error")) for p in doc["parts"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
