"""Decoding with a KV cache: sparse attention (Quest's page selection) against dense SDPA, tokens per second.

Two parts, each in one process, in interleaved rounds (every configuration once a round), medians
of the per-round ratios to dense measured in the same round:

  model      the model (default ``reference-long``'s architecture with its positions raised to fit the
             longest cache; its weights loaded: they do not change the cost), fp32, at each batch size
             of ``--batches``, with each of Hugging Face's caches in ``--caches`` (dense and sparse
             always with the same one):
             ``DynamicCache`` (grows by a new tensor of the whole cache per layer and step) and
             ``StaticCache`` (preallocated to the cached length + the decoded tokens, written in
             place; the model's SDPA then reads every slot under a mask). Each cached length is
             prefilled once per cache (dense SDPA, not timed); a round then decodes ``--steps``
             greedy tokens from that cache with each configuration and goes back to the cached
             length (crops a DynamicCache; a StaticCache's slots are written over):
               dense          the model's own SDPA attention
               PATTERN@D      ``sparse_attention`` with the pattern at the density: page statistics
                              kept across steps, the block kernel ``auto`` picks (on the CPU the C++
                              step, ``paged_cpu``); one untimed step first (the statistics of a
                              cache prefilled outside the session)
  attention  the attention op alone on the model's shapes (query / KV heads, head dim) with a cache
             of that length: dense ``F.scaled_dot_product_attention`` (as transformers calls it for a
             decoding step: ``enable_gqa``, no mask) against the sparse step's whole work (the last
             page's statistics, the pattern's selection, the kernel ``auto`` picks), and the kernels
             alone: the C++ step (``cpp``) and the eager one with each way of fetching the kept pages
             (``paged_decode.GATHERS``); and what ``DynamicCache`` does per layer and step (a new
             tensor of the whole cache plus the new key, for K and V). Then one more round of dense
             steps under the profiler: the shares of SDPA and of the cache's append in a dense step.
  In the model part's rounds a third configuration, the model with a stand-in attention at next
  to no cost (``bench/no_attention.py``), gives the ceiling (what attention at no cost would give)
  and the sparse attention's time in the model against dense attention's.

Times are wall-clock and the process's CPU time; on a shared machine the CPU time's ratio is the
less disturbed one (other processes do not count in it).

    python bench/bench_decode.py                                   # writes its block of BENCHMARKS.md
    python bench/bench_decode.py --lengths 4096 --batches 1 --rounds 2 --steps 4 --no-write
    python bench/bench_decode.py --caches static      # one cache only
    python bench/bench_decode.py --batches 4 --lengths 4096,16384 --left-padding 256 --block bench_decode_padded
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
from no_attention import NO_ATTENTION, register  # noqa: E402
from results import OwnTime, command_line, interleave, markers, median_ratio, publish  # noqa: E402
from sparse_options import add_sparse_options  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BLOCK_HEADING = "## Decoding with a KV cache: sparse against dense SDPA (`bench/bench_decode.py`)"


def summarise(times: dict, base: str) -> dict:
    """Medians and the median per-round ratio base / name (a speed-up: > 1 = faster than base)."""
    out = {}
    for n, t in times.items():
        out[n] = {k: {"median_s": statistics.median(t[k]), "rounds": t[k],
                      "speedup": median_ratio(times[base][k], t[k])} for k in ("wall", "cpu")}
    return out


def build(args, max_length: int):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from attnkit.common.loading.builtin import resolve_model_path

    path = resolve_model_path(args.model)
    config = AutoConfig.from_pretrained(path)
    config.max_position_embeddings = max(config.max_position_embeddings, max_length)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, config=config, attn_implementation="sdpa")
    return model.eval()


def new_cache(model, kind: str, max_length: int):
    from transformers import DynamicCache, StaticCache

    if kind == "static":
        return StaticCache(config=model.config, max_cache_len=max_length)
    return DynamicCache(config=model.config)


def decoder(model, kind: str, length: int, batch: int, steps: int, left_padding: int = 0):
    """``decode(n)``: n greedy tokens per sequence (a list of per-step lists) from a cache of ``kind``
    prefilled once with ``length`` random tokens (dense SDPA, not timed; seed ``length``), then back to
    the cached length (a DynamicCache cropped, a StaticCache's slots written over next time); room
    for ``steps`` tokens and one more. ``left_padding``: the batch's last sequence starts with that
    many padding tokens, hidden by the attention mask the model gets at every step."""
    import torch

    g = torch.Generator().manual_seed(length)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=g)
    mask = None
    if left_padding:
        mask = torch.ones(batch, length + steps + 1, dtype=torch.long)
        mask[-1, :left_padding] = 0
        ids[-1, :left_padding] = model.config.pad_token_id or 0

    def mask_to(end: int):
        return None if mask is None else mask[:, :end]

    with torch.no_grad():
        cache = new_cache(model, kind, length + steps + 1)
        out = model(input_ids=ids, attention_mask=mask_to(length), cache=cache, use_cache=True,
                    cache_position=torch.arange(length), logits_to_keep=1)
    cache, first = out.past_key_values, out.logits[:, -1:].argmax(-1)

    def decode(n: int) -> list:
        tok, toks = first, []
        for i in range(n):
            position = torch.tensor([length + i])
            tok = model(input_ids=tok, attention_mask=mask_to(length + i + 1), cache=cache, use_cache=True,
                        cache_position=position).logits[:, -1:].argmax(-1)
            toks.append(tok.flatten().tolist())
        if kind == "dynamic":
            cache.crop(-n)
        else:  # the next decode writes over the same slots
            for layer in cache.layers:
                layer.cumulative_length.fill_(length)
        return toks
    return decode


def model_part(model, length: int, args, kind: str, batch: int) -> dict:
    import torch

    from attnkit.sparse import SparseConfig, sparse_attention

    # room for the timed steps and the sparse configuration's untimed one
    decode = decoder(model, kind, length, batch, args.steps, args.left_padding)
    cfg = SparseConfig(pattern=args.pattern, density=args.density, block_size=args.block_size)
    kernels: dict = {}

    def timed(steps: int) -> OwnTime:
        w, c = time.perf_counter(), time.process_time()
        decode(steps)
        return OwnTime(time.perf_counter() - w, time.process_time() - c)

    def dense():
        with torch.no_grad():
            return timed(args.steps)

    def sparse():
        with torch.no_grad(), sparse_attention(model, cfg) as handle:
            decode(1)  # the statistics of the pages prefilled outside the session
            own = timed(args.steps)
        kernels.update(handle.kernels)
        return own

    def no_attention():
        model.set_attn_implementation(register())
        try:
            with torch.no_grad():
                return timed(args.steps)
        finally:
            model.set_attn_implementation("sdpa")

    name = f"{args.pattern}@{args.density:g}"
    result = summarise(interleave({"dense": dense, name: sparse, NO_ATTENTION: no_attention}, args.rounds), "dense")
    result["kernels"] = dict(kernels)
    result["dense_profile"] = dense_profile(lambda: decode(args.steps))
    return result


def dense_profile(decode) -> dict:
    """Where a dense decoding step's time goes, in the model: the self time of SDPA's kernel and of
    the cache's append (``DynamicCache``: ``torch.cat`` of the whole cache and the new key, for K and V;
    ``StaticCache``: ``index_copy_`` of the new key) as shares of the profiled steps' wall time."""
    import torch
    from torch.profiler import profile

    with torch.no_grad(), profile() as prof:
        start = time.perf_counter()
        decode()
        wall = time.perf_counter() - start
    own = {e.key: e.self_cpu_time_total / 1e6 for e in prof.key_averages()}
    return {"wall_s": wall, "sdpa_s": own.get("aten::_scaled_dot_product_flash_attention_for_cpu", 0.0),
            "cat_s": own.get("aten::cat", 0.0), "index_copy_s": own.get("aten::index_copy_", 0.0)}


def attention_part(model, length: int, args, batch: int) -> dict:
    import torch
    import torch.nn.functional as F

    from attnkit.seam.kernels import paged_cpu
    from attnkit.seam.kernels.block_kernels import BlockCall, choose_block_kernel
    from attnkit.seam.kernels.paged_decode import GATHERS, paged_decode_attention
    from attnkit.seam.sites import Site
    from attnkit.sparse import SparseConfig
    from attnkit.sparse.attention import choose_blocks
    from attnkit.sparse.page_stats import PageStats

    c = model.config
    H, Hk = c.num_attention_heads, c.num_key_value_heads
    D = getattr(c, "head_dim", None) or c.hidden_size // H
    g = torch.Generator().manual_seed(0)
    q = torch.randn(batch, H, 1, D, generator=g)
    k, v = (torch.randn(batch, Hk, length, D, generator=g) for _ in range(2))
    cfg = SparseConfig(pattern=args.pattern, density=args.density, block_size=args.block_size)
    pages, site, scale = PageStats(), Site(0), D ** -0.5
    pages.update(site, k, args.block_size, past=0)

    def page_stats():  # the step's new key went to the last page
        return pages.update(site, k, args.block_size, past=length - 1)

    sel = choose_blocks(q, k, cfg, key_pages=page_stats)

    def sparse_step():  # what sparse_attention runs for a layer's decoding step, without the seam
        call = BlockCall(q, k, v, choose_blocks(q, k, cfg, key_pages=page_stats), scale)
        return choose_block_kernel(call).run(call)

    def kernel(gather: str):
        return lambda: paged_decode_attention(q, k, v, sel.indices, sel.valid, sel.geometry, scale=scale, gather=gather)

    def repeat(fn):
        def run():
            with torch.no_grad():
                for _ in range(args.op_repeats):
                    fn()
        return run

    new_k, new_v = torch.randn(batch, Hk, 1, D, generator=g), torch.randn(batch, Hk, 1, D, generator=g)
    native = {}
    if paged_cpu.load() is not None:
        native["kernel/cpp"] = lambda: paged_cpu.paged_attention(q, k, v, sel.indices, args.block_size, scale)
    fns = {"dense_sdpa": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=H != Hk),
           "cache_append": lambda: (torch.cat([k, new_k], 2), torch.cat([v, new_v], 2)),  # DynamicCache.update's work
           "sparse_step": sparse_step, **native, **{f"kernel/{name}": kernel(name) for name in GATHERS}}
    out = summarise(interleave({n: repeat(f) for n, f in fns.items()}, args.rounds), "dense_sdpa")
    out["kept"] = sel.kept_blocks() / (batch * Hk * sel.geometry.n_key_blocks)  # every page is a candidate
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_sparse_options(p)
    p.add_argument("--lengths", default="4096,16384,32768", help="cached tokens")
    p.add_argument("--caches", default="dynamic,static", help="Hugging Face caches: dynamic, static")
    p.add_argument("--batches", default="1,4", help="batch sizes (sequences decoded at once)")
    p.add_argument("--steps", type=int, default=16, help="decoded tokens per configuration and round")
    p.add_argument("--op-repeats", type=int, default=20, help="calls of the attention op per round")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--left-padding", type=int, default=0,
                   help="the last sequence of each batch starts with this many padding tokens (a padding mask)")
    p.add_argument("--json", default=str(ROOT / "runs" / "bench_decode.json"))
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--block", default="bench_decode", help="name of the BENCHMARKS.md block this run replaces")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    started = _dt.datetime.now(_dt.timezone.utc)
    load = [os.getloadavg()]
    lengths = [int(x) for x in args.lengths.split(",")]
    model = build(args, max(lengths) + args.steps + 8)
    caches = args.caches.split(",")
    if not set(caches) <= {"dynamic", "static"}:
        p.error(f"--caches: dynamic and/or static, got {args.caches}")
    batches = [int(x) for x in args.batches.split(",")]
    doc = {"model": {f"{c}/{b}": {} for b in batches for c in caches}, "attention": {f"{b}": {} for b in batches},
           "layers": model.config.num_hidden_layers}
    sparse = f"{args.pattern}@{args.density:g}"
    for b in batches:
        for n in lengths:
            doc["attention"][f"{b}"][n] = attention_part(model, n, args, b)
            a = doc["attention"][f"{b}"][n]["sparse_step"]
            for kind in caches:
                doc["model"][f"{kind}/{b}"][n] = model_part(model, n, args, kind, b)
                m = doc["model"][f"{kind}/{b}"][n][sparse]
                print(f"batch {b} {n} {kind}: model {m['wall']['speedup']:.2f}x (cpu {m['cpu']['speedup']:.2f}x), "
                      f"attention {a['wall']['speedup']:.2f}x (cpu {a['cpu']['speedup']:.2f}x)", file=sys.stderr, flush=True)
    load.append(os.getloadavg())
    doc["load"] = load
    doc["args"] = vars(args)
    publish(doc, args.json, render(doc, args, p, started, sparse), args.block, BLOCK_HEADING, not args.no_write)


def kernels_seen(doc: dict) -> set:
    """The block kernels the sparse runs used."""
    return {k for rs in doc["model"].values() for r in rs.values() for k in r.get("kernels", {})}


def render(doc: dict, args, parser, started, sparse: str) -> str:
    import torch

    command = command_line("bench_decode.py", args, parser, ("no_write", "json"))
    start, end = markers(args.block)
    (b1, b5, b15), (a1, a5, a15) = doc["load"][0], doc["load"][-1]
    lines = [start, f"### Results ({started:%Y-%m-%d %H:%M}–{_dt.datetime.now(_dt.timezone.utc):%H:%M} UTC)", "",
             f"- command: `{command}`",
             f"- machine: {os.cpu_count()} CPU cores ({platform.machine()}), no GPU; torch {torch.__version__}, "
             f"threads {args.threads}, Python {platform.python_version()}",
             f"- load average (1, 5, 15 min) before {b1:.2f}, {b5:.2f}, {b15:.2f}; after {a1:.2f}, {a5:.2f}, {a15:.2f} "
             "(ratios come from interleaved rounds, each against dense in the same round)",
             f"- model: `{args.model}`'s architecture (positions raised to the longest cache), batch {args.batches}, fp32, "
             + (f"the last sequence of each batch left-padded by {args.left_padding} tokens (the model's padding mask "
                "reaches attention at every step; the attention-alone part has no mask), " if args.left_padding else "") +
             f"dense and sparse with the same Hugging Face cache; `{sparse}` is `sparse_attention` with block (page) size {args.block_size} "
             f"(kernels: {', '.join(sorted(kernels_seen(doc)))}); "
             f"{args.steps} greedy tokens per sequence, configuration and round; medians of {args.rounds} rounds", "",
             "**Model** (tokens per second of the whole decoding step, all sequences of the batch; × dense = dense "
             "time / sparse time, median of the per-round ratios; ceiling = what attention at no cost gives: the "
             "model with a stand-in attention that costs next to nothing, timed in the same rounds (CPU time); "
             "attention × dense = dense attention's time in the model over the sparse attention's, each the step "
             "less the stand-in's)", "",
             f"| cache | batch | cached tokens | dense tok/s (wall) | {sparse} tok/s (wall) | × dense (wall) | dense tok/s (CPU) "
             f"| {sparse} tok/s (CPU) | × dense (CPU time) | ceiling | attention × dense | rounds (wall) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for key, n, r in ((key, n, r) for key, rs in doc["model"].items() for n, r in rs.items()):
        kind, batch = key.split("/")
        d, s, tokens = r["dense"], r[sparse], args.steps * int(batch)
        rounds = ", ".join(f"{b / a:.2f}" for a, b in zip(s["wall"]["rounds"], d["wall"]["rounds"]))
        rest = r[NO_ATTENTION]["cpu"]["rounds"]
        attention = statistics.median((a - c) / (b - c) for a, b, c in zip(d["cpu"]["rounds"], s["cpu"]["rounds"], rest))
        lines.append(f"| {kind} | {batch} | {n} | {tokens / d['wall']['median_s']:.1f} | {tokens / s['wall']['median_s']:.1f} "
                     f"| **{s['wall']['speedup']:.2f}** | {tokens / d['cpu']['median_s']:.1f} "
                     f"| {tokens / s['cpu']['median_s']:.1f} | **{s['cpu']['speedup']:.2f}** "
                     f"| {r[NO_ATTENTION]['cpu']['speedup']:.2f} | {attention:.2f} | {rounds} |")
    lines += ["", "**Attention alone** (one decoding step's attention op of one layer on the model's shapes; "
              "sparse step = the last page's statistics + the selection + the kernel `auto` picks; kernel/cpp = the C++ "
              "step's attention; kernel/pages, kernel/tokens = the eager step's two ways of copying the kept pages; "
              "kept = share of the pages kept)", "",
              "| batch | cached tokens | configuration | kept | ms (CPU time) | × dense (CPU time) | × dense (wall) |",
              "|---:|---:|---|---:|---:|---:|---:|"]
    for batch, rs in doc["attention"].items():
        for n, r in rs.items():
            for c, t in r.items():
                if c == "kept":
                    continue
                kept = {"dense_sdpa": "1", "cache_append": ""}.get(c, f"{r['kept']:.3f}")
                lines.append(f"| {batch} | {n} | {c} | {kept} | {t['cpu']['median_s'] / args.op_repeats * 1e3:.3f} "
                             f"| {t['cpu']['speedup']:.2f} | {t['wall']['speedup']:.2f} |")
    lines += ["", "**Where a dense step's time goes** (the dense steps of one more round under the profiler: the self "
              "time of SDPA's kernel and of the cache's append — `torch.cat` for `DynamicCache`, `index_copy_` for "
              "`StaticCache` — as shares of the steps' wall time; the rest: projections, MLP, norms, rotary, the LM "
              "head and Python)", "",
              "| cache | batch | cached tokens | attention (SDPA) | cache append | the rest |", "|---|---:|---:|---:|---:|---:|"]
    for key, n, r in ((key, n, r) for key, rs in doc["model"].items() for n, r in rs.items()):
        kind, batch = key.split("/")
        p = r["dense_profile"]
        attn, append = p["sdpa_s"] / p["wall_s"], (p["cat_s"] + p["index_copy_s"]) / p["wall_s"]
        lines.append(f"| {kind} | {batch} | {n} | {attn:.0%} | {append:.0%} | {1 - attn - append:.0%} |")
    lines += ["", "<details><summary>raw (JSON)</summary>", "", "```json",
              json.dumps({k: doc[k] for k in ("model", "attention", "load")}), "```", "</details>", end]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
