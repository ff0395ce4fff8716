"""Where a sparse prefill's time goes, against dense SDPA's: ``torch.profiler`` on whole-model
forwards under ``no_grad`` (reference-long's architecture, batch 1, fp32), interleaved rounds.

Each round runs one dense SDPA prefill and one ``PATTERN@DENSITY`` prefill under the profiler, and
before them the same two unprofiled (their wall and CPU times: the profiler's own cost per op is
not in these). The profiled sparse forward is cut by labelled ranges (``record_function``, wrapped
around attnkit's functions by this script, nothing changed in the library):

  attention         the sparse kernel of each attention call (``SparseSelector.run``), of which
    selection       the pattern's block scores and the kept blocks (``choose_blocks``)
    plan            the split kernel's plan (``split_sdpa_plan``)
    own blocks      the one causal SDPA call of every query block on its own key block
    buckets' SDPA   the SDPA calls of the gathered blocks, one per bucket
    gathers         the gathers of the buckets' keys and values (``index_select``)
    merge + rest    the rest of the kernel: the log-sum-exp merge, the output's layout, Python
    call's rest     the rest of the sparse call (the selection's checks, the kernel's choice, ...)
  rest of model     everything else in the forward (projections, RoPE, MLP, norms, LM head; for
                    sparse also the seam's call and entering the ``sparse_attention`` block)

Dense SDPA: ``aten::scaled_dot_product_attention`` and the rest. Times are the profiler's (the
wall time of each range on the thread, Python included, in ms: CPU time with one thread on an idle
core), medians over the rounds; shares are of the dense forward's.

    python bench/sparse_prefill_profile.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sparse_options import add_sparse_options  # noqa: E402

LABELS = ("sparse attention", "selection", "plan", "split kernel", "own blocks", "buckets' SDPA")


def instrument():
    """Wrap attnkit's sparse functions in labelled profiler ranges (for this process)."""
    import torch
    from torch.profiler import record_function

    import attnkit.seam.kernels.split_sdpa as split
    import attnkit.sparse.attention as attention

    def ranged(label, fn):
        def wrapped(*args, **kwargs):
            with record_function(label):
                return fn(*args, **kwargs)
        return wrapped

    attention.choose_blocks = ranged("selection", attention.choose_blocks)
    split.split_sdpa_plan = ranged("plan", split.split_sdpa_plan)
    run = attention.SparseSelector.run
    attention.SparseSelector.run = lambda self, *a, **k: ranged("sparse attention", run)(self, *a, **k)
    apply = split._SplitAttention.apply
    calls = {"n": 0}

    def apply_ranged(*args):
        calls["n"] = 0
        with record_function("split kernel"):
            return apply(*args)

    split._SplitAttention.apply = apply_ranged
    forward = split._forward

    def sdpa(*args, **kwargs):  # the first SDPA call of a kernel's forward is the own blocks' one
        label = "own blocks" if calls["n"] == 0 else "buckets' SDPA"
        calls["n"] += 1
        with record_function(label):
            return forward(*args, **kwargs)

    split._forward = sdpa
    return torch


def attribute(events) -> dict[str, float]:
    """CPU ms by category of one profiled forward (``events``: the profiler's ``events()``)."""
    def total(name):
        return sum(e.cpu_time_total for e in events if e.name == name) / 1e3

    def under(e, label):
        p = e.cpu_parent
        while p is not None:
            if p.name == label:
                return True
            p = p.cpu_parent
        return False

    out = {"forward": total("model forward")}
    attention = "sparse attention" if any(e.name == "sparse attention" for e in events) else "aten::scaled_dot_product_attention"
    ops: dict = {"kernel's other ops": {}, "rest of model's ops": {}}
    for e in events:  # self time by op: of the split kernel's other work, and of the rest of the model
        if e.name.startswith("aten::") or e.name.startswith("_"):
            if under(e, "split kernel") and not (under(e, "own blocks") or under(e, "buckets' SDPA")):
                part = "kernel's other ops"
            elif not under(e, attention) and e.name != attention:
                part = "rest of model's ops"
            else:
                continue
            ops[part][e.name] = ops[part].get(e.name, 0.0) + e.self_cpu_time_total / 1e3
    if any(e.name == "sparse attention" for e in events):
        gathers = sum(e.cpu_time_total for e in events if e.name == "aten::index_select"
                      and under(e, "split kernel") and not under(e, "buckets' SDPA")) / 1e3
        out.update({"attention": total("sparse attention"), "selection": total("selection"), "plan": total("plan"),
                    "kernel": total("split kernel"), "own blocks": total("own blocks"),
                    "buckets' SDPA": total("buckets' SDPA"), "gathers": gathers})
        out["merge + rest"] = out["kernel"] - out["own blocks"] - out["buckets' SDPA"] - out["gathers"]
        out["call's rest"] = out["attention"] - out["selection"] - out["plan"] - out["kernel"]
    else:
        out["attention"] = total("aten::scaled_dot_product_attention")
    out["rest of model"] = out["forward"] - out["attention"]
    return out, ops


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_sparse_options(p, pattern="moba", block_size=128)
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch = instrument()
    from torch.profiler import ProfilerActivity, profile, record_function

    from bench_sparse import build
    from attnkit.sparse import SparseConfig, sparse_attention

    torch.set_num_threads(args.threads)
    model = build(args)
    ids = torch.randint(0, model.config.vocab_size, (1, args.length), generator=torch.Generator().manual_seed(0))
    cfg = SparseConfig(pattern=args.pattern, density=args.density, block_size=args.block_size)
    sparse_name = f"{args.pattern}@{args.density:g}"

    def prefill(sparse: bool):
        with torch.no_grad(), record_function("model forward"):
            if not sparse:
                return model(input_ids=ids).logits
            with sparse_attention(model, cfg) as handle:
                out = model(input_ids=ids).logits
            assert dict(handle.kernels) == {"split_sdpa": model.config.num_hidden_layers}, handle.kernels
            return out

    for sparse in (False, True):  # warm-up
        prefill(sparse)
    plain: dict = {c: {"wall": [], "cpu": []} for c in ("dense-sdpa", sparse_name)}
    parts: dict = {c: [] for c in plain}
    ops: dict = {c: {} for c in plain}
    load = [os.getloadavg()]
    for _ in range(args.rounds):
        for config, sparse in (("dense-sdpa", False), (sparse_name, True)):
            t, c = time.perf_counter(), time.process_time()
            prefill(sparse)
            plain[config]["wall"].append(time.perf_counter() - t)
            plain[config]["cpu"].append(time.process_time() - c)
        for config, sparse in (("dense-sdpa", False), (sparse_name, True)):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                prefill(sparse)
            split, by_op = attribute(prof.events())
            parts[config].append(split)
            for part, times in by_op.items():
                for name, ms in times.items():
                    ops[config].setdefault(part, {}).setdefault(name, []).append(ms)
    load.append(os.getloadavg())
    med = {c: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for c, rs in parts.items()}
    dense_total = med["dense-sdpa"]["forward"]
    ratios = {clock: statistics.median(s / d for s, d in zip(plain[sparse_name][clock], plain["dense-sdpa"][clock]))
              for clock in ("wall", "cpu")}
    print(f"unprofiled {sparse_name} / dense SDPA, medians of {args.rounds} rounds: wall {ratios['wall']:.3f}, "
          f"CPU {ratios['cpu']:.3f}; load {load[0][0]:.1f} -> {load[1][0]:.1f}")
    for config, m in med.items():
        print(f"{config} (profiled, ms; share of dense SDPA's forward):")
        for k, v in m.items():
            print(f"  {k:>14}: {v:9.1f}  {v / dense_total:6.3f}")
        for part, times in ops[config].items():
            top = sorted(((sum(t) / args.rounds, n) for n, t in times.items()), reverse=True)[:10]
            print(f"  {part} (self ms, mean of the rounds): "
                  + ", ".join(f"{n.removeprefix('aten::')} {ms:.1f}" for ms, n in top))
    print(json.dumps({"plain": plain, "parts": parts, "ops": ops, "load": load}))


if __name__ == "__main__":
    main()
