"""Time of the CPU block-sparse kernel against dense SDPA: the kernel alone, and in a model.

Two parts, each in one process, in interleaved rounds (every configuration once a round), medians
of the per-round ratios to dense SDPA measured in the same round:

  kernel   the attention op alone on the model's shapes (query / KV heads, head dim, block size):
           ``F.scaled_dot_product_attention(is_causal=True)`` against ``split_sdpa`` (the default
           CPU kernel for causal calls) at each density and ``gather_sdpa`` (the previous default) at
           the model's density, over a selection made beforehand (the pattern's, on random q/k; the selection is
           not timed), inference (forward) and training (forward + backward of a weighted sum).
  model    the model (default ``reference-long``'s architecture; the weights do not change the
           cost), batch 1, fp32: its own SDPA attention against ``sparse_attention`` with the pattern
           at the density (the default kernel: ``split_sdpa`` on the CPU), selection included.
           Prefill (forward under ``no_grad``) at ``--lengths``; a training step (forward + backward
           of the LM loss, every parameter requiring grad) at ``--train-lengths``, with its peak
           memory measured in a fresh process per configuration (``bench/rss.py``). In the same
           rounds the model with a stand-in attention at next to no cost: its time is the rest of
           the model, which gives the sparse attention's cost in the model against dense
           attention's, and the floor of the ratio at the pattern's share of kept blocks.

    python bench/bench_block_kernel.py                       # writes its block of BENCHMARKS.md
    python bench/bench_block_kernel.py --lengths 2048 --train-lengths 2048 --rounds 1 --no-write
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rss  # noqa: E402
from bench_sparse import build, steps  # noqa: E402
from no_attention import NO_ATTENTION, register  # noqa: E402
from results import command_line, interleave, markers, median_ratio, publish  # noqa: E402
from sparse_options import add_sparse_options  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BLOCK_HEADING = "## Block-sparse kernel against dense SDPA (`bench/bench_block_kernel.py`)"


def summarise(measured: dict, base: str) -> dict:
    """Medians and median per-round ratios against ``base`` of ``interleave``'s times, wall and CPU."""
    return {n: {"median_s": statistics.median(t["wall"]), "ratio": median_ratio(t["wall"], measured[base]["wall"]),
                "rounds": t["wall"], "cpu_median_s": statistics.median(t["cpu"]),
                "cpu_ratio": median_ratio(t["cpu"], measured[base]["cpu"]), "cpu_rounds": t["cpu"]}
            for n, t in measured.items()}


def attention_step(fn, q, k, v, w, train: bool):
    """One timed call of the attention op ``fn(q, k, v)``: a forward under ``no_grad``, or with
    ``train`` a forward and the backward of ``(out * w).sum()`` from fresh leaves."""
    import torch

    def run():
        if not train:
            with torch.no_grad():
                return fn(q, k, v)
        qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
        (fn(qq, kk, vv) * w).sum().backward()
    return run


def attention_inputs(model, length: int) -> tuple:
    """Random q (1, H, length, D), k and v (1, Hkv, length, D) on the model's shapes, and a weight w
    like q for a training step's loss (seed 0)."""
    import torch

    c = model.config
    H, Hk = c.num_attention_heads, c.num_key_value_heads
    D = getattr(c, "head_dim", None) or c.hidden_size // H
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, length, D, generator=g) for h in (H, Hk, Hk))
    return q, k, v, torch.randn(1, H, length, D, generator=g)


def select(q, k, density: float, args):
    """The pattern's selection at ``density`` for q and k."""
    from attnkit.sparse import SparseConfig
    from attnkit.sparse.attention import choose_blocks

    return choose_blocks(q, k, SparseConfig(pattern=args.pattern, density=density, block_size=args.block_size))


def kernel_part(model, length: int, args) -> dict:
    """The attention op alone on the model's shapes: SDPA against split_sdpa at each density (and
    gather_sdpa at the model's density)."""
    import torch.nn.functional as F

    from attnkit.seam.kernels.gather_sdpa import gather_sdpa_attention
    from attnkit.seam.kernels.split_sdpa import split_sdpa_attention

    q, k, v, w = attention_inputs(model, length)
    H, Hk, D = q.shape[1], k.shape[1], q.shape[-1]
    selections = {d: select(q, k, d, args) for d in args.density_list}

    def attention(name: str):
        if name == "sdpa":
            return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=H != Hk)
        kernel, density = name.split("@")
        sel = selections[float(density)]
        fn = {"split_sdpa": split_sdpa_attention, "gather_sdpa": gather_sdpa_attention}[kernel]
        return lambda q, k, v: fn(q, k, v, sel.indices, sel.valid, sel.geometry, scale=D ** -0.5)

    def step(fn, train: bool):
        return attention_step(fn, q, k, v, w, train)

    model_density = 0.25 if args.model_density is None else args.model_density
    if model_density not in selections:
        selections[model_density] = select(q, k, model_density, args)
    names = ["sdpa", *(f"split_sdpa@{d:g}" for d in args.density_list), f"gather_sdpa@{model_density:g}"]
    out = {"kept": {n: selections[float(n.split("@")[1])].kept_blocks() / selections[float(n.split("@")[1])].candidate_blocks()
                    for n in names[1:]}}
    for mode, train in (("inference", False), ("train", True)):
        out[mode] = summarise(interleave({n: step(attention(n), train) for n in names}, args.rounds), "sdpa")
    return out


def kept_share(model, length: int, density: float, args) -> float:
    """The share of the candidate key blocks the pattern keeps at ``length`` tokens (every pattern's
    budget is a number of blocks per query block, the same whatever the scores)."""
    q, k, _, _ = attention_inputs(model, length)
    sel = select(q, k, density, args)
    return sel.kept_blocks() / sel.candidate_blocks()


def model_part(model, length: int, train: bool, args) -> dict:
    """Dense SDPA against the pattern in the model, interleaved, and in the same rounds the model
    with no attention (``bench/no_attention.py``): its time r is the rest of the model, so a round gives
    dense attention d - r and sparse attention s - r; their ratio, the sparse attention's cost in
    the model against dense attention's, beside the share of blocks kept; and the floor, what a
    sparse attention costing exactly kept × dense attention would give: (r + kept·(d - r)) / d."""
    register()
    density = 0.25 if args.model_density is None else args.model_density
    sparse = f"{args.pattern}@{density:g}"
    names = ["dense-sdpa", sparse, f"dense-{NO_ATTENTION}"]
    fns = {n: steps(model, n, length, args)[1 if train else 0] for n in names}
    out = summarise(interleave(fns, args.rounds), "dense-sdpa")
    kept = kept_share(model, length, density, args)
    d, s_, r = (out[n]["rounds"] for n in names)
    out["floor"] = {"kept": kept, "rest_share": statistics.median(c / a for a, c in zip(d, r)),
                    "attention_ratio": statistics.median((b - c) / (a - c) for a, b, c in zip(d, s_, r)),
                    "ratio": statistics.median((c + kept * (a - c)) / a for a, c in zip(d, r))}
    return out


def memory_worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    model = build(args)
    _, train = steps(model, args.worker, args.length, args)
    train()  # warm-up: gradients are allocated once here
    rss.report({"config": args.worker, "seq_len": args.length, "train": max(rss.peak_of(train) for _ in range(2))})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_sparse_options(p, pattern="moba", density="0.125,0.25,0.5", several=("density",),
                       density_help="densities of the kernel part")
    p.add_argument("--lengths", default="8192,16384", help="prefill and kernel lengths")
    p.add_argument("--train-lengths", default="8192", help="lengths of the model's training step (time and peak memory)")
    p.add_argument("--model-density", type=float, default=None, help="density of the model part (default 0.25)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=str(ROOT / "runs" / "bench_block_kernel.json"))
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--block", default="bench_block_kernel", help="name of the BENCHMARKS.md block this run replaces")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.density_list = [float(d) for d in args.densities.split(",")]
    if args.worker:
        return memory_worker(args)
    import torch

    torch.set_num_threads(args.threads)
    started = _dt.datetime.now(_dt.timezone.utc)
    load = [os.getloadavg()]
    lengths = [int(x) for x in args.lengths.split(",")]
    train_lengths = [int(x) for x in args.train_lengths.split(",") if x]
    model = build(args)
    sparse = f"{args.pattern}@{0.25 if args.model_density is None else args.model_density:g}"
    doc = {"kernel": {}, "prefill": {}, "train": {}, "train_memory": {}}
    for n in lengths:
        doc["prefill"][n] = model_part(model, n, False, args)
        print(f"prefill {n}: {doc['prefill'][n][sparse]['ratio']:.2f}x", file=sys.stderr, flush=True)
    for n in train_lengths:
        doc["train"][n] = model_part(model, n, True, args)
        print(f"train {n}: {doc['train'][n][sparse]['ratio']:.2f}x", file=sys.stderr, flush=True)
    for n in lengths:
        doc["kernel"][n] = kernel_part(model, n, args)
        print(f"kernel {n} done", file=sys.stderr, flush=True)
    load.append(os.getloadavg())
    for n in train_lengths:
        doc["train_memory"][n] = {c: rss.run_fresh(
            [sys.executable, __file__, "--worker", c, "--length", str(n), "--model", args.model,
             "--block-size", str(args.block_size), "--threads", str(args.threads)], f"{c} at {n} (memory)")["train"]
            for c in ("dense-sdpa", sparse)}
    doc["load"] = load
    doc["args"] = {k: v for k, v in vars(args).items() if k not in ("worker", "length", "density_list")}
    publish(doc, args.json, render(doc, args, p, started, sparse), args.block, BLOCK_HEADING, not args.no_write)


def render(doc: dict, args, parser, started, sparse: str) -> str:
    import torch

    command = command_line("bench_block_kernel.py", args, parser, ("worker", "length", "no_write", "json", "density_list"))
    start, end = markers(args.block)
    (b1, b5, b15), (a1, a5, a15) = doc["load"][0], doc["load"][-1]
    lines = [start, f"### Results ({started:%Y-%m-%d %H:%M}–{_dt.datetime.now(_dt.timezone.utc):%H:%M} UTC)", "",
             f"- command: `{command}`",
             f"- machine: {os.cpu_count()} CPU cores ({platform.machine()}), no GPU; torch {torch.__version__}, "
             f"threads {args.threads}, Python {platform.python_version()}",
             f"- load average (1, 5, 15 min) before {b1:.2f}, {b5:.2f}, {b15:.2f}; after the timed parts {a1:.2f}, "
             f"{a5:.2f}, {a15:.2f} (ratios come from interleaved rounds, each against SDPA in the same round)",
             f"- model: `{args.model}`, batch 1, fp32, block size {args.block_size}; `{sparse}` is "
             "`sparse_attention` with its default CPU kernel (`split_sdpa`), selection included; "
             f"medians of {args.rounds} rounds", "",
             "**Model** (prefill = forward under `no_grad`; train = forward + backward of the LM loss, every "
             "parameter requiring grad; peak = bytes above what was live before the step, fresh process; "
             "rest of the model = the step with a stand-in attention at next to no cost, as a share of dense's "
             "(same rounds); sparse / dense attention = (sparse − rest) / (dense − rest), the sparse "
             "attention's cost in the model against dense attention's; floor = what a sparse attention "
             "costing exactly kept × dense attention would give; medians of the rounds)", "",
             "| tokens | step | dense SDPA s | sparse s | × SDPA | rounds (× SDPA) | × SDPA, CPU time | rounds (CPU) "
             "| rest of the model | kept | sparse / dense attention | floor |",
             "|---:|---|---:|---:|---:|---|---:|---|---:|---:|---:|---:|"]
    for step in ("prefill", "train"):
        for n, r in doc[step].items():
            ratios = ", ".join(f"{a / b:.2f}" for a, b in zip(r[sparse]["rounds"], r["dense-sdpa"]["rounds"]))
            cpu = ", ".join(f"{a / b:.2f}" for a, b in zip(r[sparse]["cpu_rounds"], r["dense-sdpa"]["cpu_rounds"]))
            floor = r.get("floor")
            floor = (f"{floor['rest_share']:.2f} | {floor['kept']:.3f} | {floor['attention_ratio']:.2f} "
                     f"| {floor['ratio']:.2f}" if floor else "| | |")
            lines.append(f"| {n} | {step} | {r['dense-sdpa']['median_s']:.2f} | {r[sparse]['median_s']:.2f} "
                         f"| **{r[sparse]['ratio']:.2f}** | {ratios} | **{r[sparse]['cpu_ratio']:.2f}** | {cpu} "
                         f"| {floor} |")
    for n, m in doc["train_memory"].items():
        lines.append(f"| {n} | train peak MiB | {m['dense-sdpa'] / 2**20:,.1f} | {m[sparse] / 2**20:,.1f} "
                     f"| **{m[sparse] / m['dense-sdpa']:.3f}** | | | | | | | |")
    lines += ["", "**Kernel alone** (the attention op on the model's shapes; kept = share of the candidate "
              "key blocks the selection keeps, the ideal ratio's floor)", "",
              "| tokens | configuration | kept | infer s | × SDPA | × SDPA, CPU | train s | × SDPA | × SDPA, CPU |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for n, r in doc["kernel"].items():
        for c in r["inference"]:
            kept = f"{r['kept'][c]:.3f}" if c in r["kept"] else "1 (causal)"
            i, t = r["inference"][c], r["train"][c]
            lines.append(f"| {n} | {c} | {kept} | {i['median_s']:.3f} | {i['ratio']:.2f} | {i['cpu_ratio']:.2f} "
                         f"| {t['median_s']:.3f} | {t['ratio']:.2f} | {t['cpu_ratio']:.2f} |")
    lines += ["", "<details><summary>raw (JSON)</summary>", "", "```json",
              json.dumps({k: doc[k] for k in ("kernel", "prefill", "train", "train_memory", "load")}), "```",
              "</details>", end]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
