"""Where a sparse decoding step's attention call spends its time, per layer and step: ``perf_counter``
around attnkit's functions on the call's path (the seam's adapter; the selector's ``paged_step``, the
route a step takes when ``sparse_attention`` is alone on the model, or its ``run`` and ``select``,
``choose_blocks`` and the kernel's choice on the general path; the written keys' cut, the page
statistics' upkeep, the handle's record)
and around the three C++ calls (page pooling, Quest's scores and top-k, attention over the kept
pages), in this process only (nothing changes in the library). Each wrapper adds about a
microsecond. ``reference-long``'s architecture (positions raised to fit the cache), batch 1, fp32,
one thread, Quest at density 0.25, pages of 64.

    python bench/sparse_decode_parts.py --length 16384 --cache static
"""

from __future__ import annotations

import argparse
import sys
import time
import types
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

STEPS = 32


def timed(spent: Counter, label: str, fn):
    def wrapped(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[label] += time.perf_counter() - start
    return wrapped


def instrument(spent: Counter) -> None:
    import attnkit.seam.adapters.hf as hf
    import attnkit.seam.kernels.paged_cpu as paged_cpu
    import attnkit.sparse.attention as attention
    import attnkit.sparse.page_stats as page_stats

    for module, name, label in ((hf, "attnkit_attention", "the whole call (seam adapter)"),
                                (attention, "choose_blocks", "choose_blocks"),
                                (attention, "choose_block_kernel", "the kernel's choice"),
                                (paged_cpu, "pool_pages", "C++ page pooling"),
                                (paged_cpu, "step_pages", "C++ Quest scores and top-k"),
                                (paged_cpu, "paged_attention", "C++ attention over the kept pages")):
        setattr(module, name, timed(spent, label, getattr(module, name)))
    for cls, name, label in ((attention.SparseSelector, "paged_step", "SparseSelector.paged_step"),
                             (attention.SparseSelector, "_written_keys", "the written keys' cut"),
                             (attention.SparseSelector, "run", "SparseSelector.run"),
                             (attention.SparseSelector, "select", "SparseSelector.select"),
                             (attention.SparseHandle, "record", "the handle's record"),
                             (page_stats.PageStats, "update", "PageStats.update")):
        setattr(cls, name, timed(spent, label, getattr(cls, name)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=int, default=16384, help="cached tokens")
    p.add_argument("--cache", choices=("dynamic", "static"), default="static")
    args = p.parse_args()

    import torch

    from bench_decode import build, decoder

    from attnkit.sparse import SparseConfig, sparse_attention

    torch.set_num_threads(1)
    spent: Counter = Counter()
    instrument(spent)  # before the model is built: transformers looks the adapter up when it registers it
    model = build(types.SimpleNamespace(model="reference-long"), args.length + 64)
    decode = decoder(model, args.cache, args.length, 1, STEPS + 2)
    with torch.no_grad(), sparse_attention(model, SparseConfig(pattern="quest", density=0.25, block_size=64)):
        decode(2)  # the statistics of the pages prefilled outside the session, and a warm step
        spent.clear()
        start = time.perf_counter()
        decode(STEPS)
        step = (time.perf_counter() - start) / STEPS
    calls = STEPS * model.config.num_hidden_layers
    print(f"{args.length} cached tokens, {args.cache} cache: a step {step * 1e3:.2f} ms; per layer and step (µs; "
          "nested: a function's time includes the calls it makes, so the lines do not add up):")
    for label, seconds in sorted(spent.items(), key=lambda kv: -kv[1]):
        print(f"  {label:>36}: {seconds / calls * 1e6:7.1f}")


if __name__ == "__main__":
    main()
