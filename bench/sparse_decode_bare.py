"""How much of a sparse decoding step is the Python around its three C++ calls.

Four ways to run the same model's decoding steps, in interleaved rounds (CPU time per step):

  dense    the model's own SDPA
  sparse   ``sparse_attention`` with ``--pattern`` (Quest) at density 0.25, pages of 64: alone on the
           model, a step goes straight to the pattern's pages and the C++ kernel (``paged_step``)
  general  the same with a session that observes nothing attached beside it: every step takes the
           seam's general path (the call built, dispatched, the kernel chosen), same tokens
  bare     (Quest only) an attention function registered with transformers that calls the same
           three C++ ops (pool the new key's page, Quest's scores and top-k, attention over the kept
           pages) with the same selection rule and nothing else: no seam, no selection plumbing, no
           handle. It decodes the same tokens as ``sparse`` (checked before the rounds).

``reference-long``'s architecture (positions raised to fit the cache), batch 1, fp32, one thread.

    python bench/sparse_decode_bare.py --length 16384 --cache static
    python bench/sparse_decode_bare.py --length 4096 --cache static --pattern moba
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
from contextlib import contextmanager, nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

STEPS, PAGE = 16, 64


class BareQuest:
    """A decoding step's attention as the three C++ calls alone; the pages' statistics per layer."""

    name = "bench_bare_quest"

    def __init__(self, density: float) -> None:
        from attnkit.seam.kernels import paged_cpu
        from attnkit.sparse import SparseConfig

        self.cfg = SparseConfig(pattern="quest", density=density, block_size=PAGE)
        self.ops = paged_cpu.load()
        self.stats: dict[int, tuple] = {}  # layer -> (stats (3, B, Hkv, capacity, D), marks)
        self.written: tuple[int, int] | None = None  # (id of the step's mask, written keys)

    def __call__(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        import torch

        from attnkit.sparse.attention import step_budget

        if attention_mask is not None:  # a StaticCache: the written keys end at the last slot the mask shows
            if self.written is None or self.written[0] != id(attention_mask):
                self.written = (id(attention_mask), int(attention_mask[0, 0, 0].nonzero()[-1]) + 1)
            key, value = key[:, :, : self.written[1]], value[:, :, : self.written[1]]
        B, Hk, K, D = key.shape
        pages = -(-K // PAGE)
        held = self.stats.get(module.layer_idx)
        if held is None or held[0].shape[3] < pages:
            held = (torch.zeros(3, B, Hk, pages + 64, D, dtype=key.dtype),
                    torch.zeros(B, Hk, pages + 64, D, dtype=key.dtype))
            self.stats[module.layer_idx] = held
            start = 0
        else:
            start = (K - 1) // PAGE
        stats, marks = held
        self.ops.pool_pages(key, stats, marks, PAGE, start)
        kept, local, first = step_budget(pages, self.cfg.density, self.cfg.sink_blocks, self.cfg.local_blocks,
                                         self.cfg.keeps_sinks)
        q = query.squeeze(2)  # (B, H, D)
        chosen = self.ops.quest_step_pages(q, stats[1, :, :, :pages], stats[2, :, :, :pages], kept, local, first)
        out = self.ops.paged_attention(q, key, value, chosen, PAGE, float(scaling))  # (B, H, Dv)
        return out.unsqueeze(1), None  # (B, 1, H, Dv)

    def register(self) -> str:
        from no_attention import register_attention

        return register_attention(self.name, self)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=int, default=16384, help="cached tokens")
    p.add_argument("--cache", choices=("dynamic", "static"), default="static")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--pattern", default="quest", help="a training-free pattern (bare runs for quest only)")
    args = p.parse_args()

    import torch

    from bench_decode import build, decoder
    from results import OwnTime, interleave

    from attnkit.seam import AttentionSession, Tap, attach
    from attnkit.sparse import SparseConfig, sparse_attention

    class Nothing(Tap):  # beside sparse_attention it makes every call take the general path
        wants_call = wants_chunks = False

    torch.set_num_threads(1)
    L = args.length
    bare = BareQuest(0.25)
    cfg = SparseConfig(pattern=args.pattern, density=0.25, block_size=PAGE)
    model = build(types.SimpleNamespace(model="reference-long"), L + 64)
    decode = decoder(model, args.cache, L, 1, STEPS)

    @contextmanager
    def general():
        with sparse_attention(model, cfg), attach(model, AttentionSession(taps=[Nothing()])):
            yield

    @contextmanager
    def bare_function():
        bare.stats.clear()
        model.set_attn_implementation(bare.register())
        try:
            yield
        finally:
            model.set_attn_implementation("sdpa")

    configurations = {"dense": nullcontext, "sparse": lambda: sparse_attention(model, cfg), "general": general}
    if args.pattern == "quest":
        configurations["bare"] = bare_function

    def step(configuration):
        """(wall, CPU) seconds a step of ``configuration``, after one untimed step (the statistics of
        the pages prefilled outside a sparse session)."""
        def run():
            with configuration():
                decode(1)
                w, c = time.perf_counter(), time.process_time()
                decode(STEPS)
                return OwnTime((time.perf_counter() - w) / STEPS, (time.process_time() - c) / STEPS)
        return run

    with torch.no_grad():
        with sparse_attention(model, cfg):
            expected = decode(8)
        same = {}
        for name in ("general", "bare"):
            if name in configurations:
                with configurations[name]():
                    same[name] = decode(8) == expected
        times = interleave({n: step(c) for n, c in configurations.items()}, args.rounds)
    rounds = {n: t["cpu"] for n, t in times.items()}
    ms = {n: round(statistics.median(r) * 1e3, 3) for n, r in rounds.items()}
    speed = {n: round(statistics.median(d / x for d, x in zip(rounds["dense"], r)), 2) for n, r in rounds.items()}
    print(f"{L} cached tokens, {args.cache} cache, batch 1, {args.pattern}: ms a step {ms}; x dense tokens/s {speed}; "
          f"the same tokens as sparse: {same}")


if __name__ == "__main__":
    main()
