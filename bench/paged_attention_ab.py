"""The C++ decoding attention over kept pages (``paged_decode.cpp``'s ``paged_attention``), another
commit's build against this tree's, in one process, dense SDPA over every key beside them: one query
per head at the end of a cache of ``--length`` keys, ``reference-long``'s heads (4 query / 2 KV of 32),
fp32, one thread; a quarter of the pages kept (random pages, the same for both builds), four
layers' caches visited in turn as a model's step visits them (so the caches are as cold as in the
model). CPU time per layer, interleaved rounds; before the rounds the two builds' outputs are
compared (largest difference printed).

The other commit's ``paged_decode.cpp`` (with its ``vec_math.h``) is built under a namespace of its
own (``torch.ops.attnkit_paged_before``), with this tree's compiler flags, in a temporary directory.

    python bench/paged_attention_ab.py --before 51592c9 --lengths 4096,16384,32768
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import interleave, median_ratio  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "src/attnkit/seam/kernels/paged_decode.cpp"
HEADER = "src/attnkit/metrics/vec_math.h"
LAYERS = 4


def build_before(commit: str):
    """torch.ops.attnkit_paged_before: ``commit``'s kernel, built here."""
    import torch
    from torch.utils import cpp_extension

    from attnkit.metrics.native import FLAGS

    def show(path: str) -> str:
        return subprocess.run(["git", "show", f"{commit}:{path}"], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout

    top = Path(tempfile.mkdtemp())
    source = top / "seam" / "kernels" / "paged_decode_before.cpp"  # its include is ../../metrics/vec_math.h
    source.parent.mkdir(parents=True)
    (top / "metrics").mkdir()
    (top / "metrics" / "vec_math.h").write_text(show(HEADER))
    source.write_text(show(SOURCE).replace("TORCH_LIBRARY(attnkit_paged,", "TORCH_LIBRARY(attnkit_paged_before,"))
    (top / "build").mkdir()
    cpp_extension.load(name="paged_decode_before", sources=[str(source)], extra_cflags=FLAGS,
                       build_directory=str(top / "build"), is_python_module=False)
    return torch.ops.attnkit_paged_before


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, help="the commit to compare with")
    p.add_argument("--lengths", default="4096,16384,32768", help="cached tokens")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--calls", type=int, default=20, help="calls per layer timed in a round")
    args = p.parse_args()

    import torch
    import torch.nn.functional as F

    from attnkit.seam.kernels import paged_cpu

    torch.set_num_threads(1)
    before, after = build_before(args.before), paged_cpu.load()
    B, H, Hk, D, bs = args.batch, 4, 2, 32, args.page_size
    for K in (int(x) for x in args.lengths.split(",")):
        g = torch.Generator().manual_seed(0)
        caches = [(torch.randn(B, Hk, K, D, generator=g), torch.randn(B, Hk, K, D, generator=g)) for _ in range(LAYERS)]
        q = torch.randn(B, H, D, generator=g)
        n_pages, kept = -(-K // bs), max(1, -(-K // bs) // 4)
        pages = torch.stack([torch.stack([torch.randperm(n_pages, generator=g)[:kept] for _ in range(Hk)])
                             for _ in range(B)])  # (B, Hkv, kept)
        largest = max(float((before.paged_attention(q, k, v, pages, bs, D ** -0.5)
                             - after.paged_attention(q, k, v, pages, bs, D ** -0.5)).abs().max()) for k, v in caches)

        def run(fn):
            def calls():
                for _ in range(args.calls):
                    for k, v in caches:
                        fn(k, v)
            return calls

        fns = {"sdpa": run(lambda k, v: F.scaled_dot_product_attention(q[:, :, None], k, v, enable_gqa=True)),
               "before": run(lambda k, v: before.paged_attention(q, k, v, pages, bs, D ** -0.5)),
               "after": run(lambda k, v: after.paged_attention(q, k, v, pages, bs, D ** -0.5))}
        times = {n: [c / (args.calls * LAYERS) for c in t["cpu"]] for n, t in interleave(fns, args.rounds).items()}
        us = ", ".join(f"{n} {statistics.median(t) * 1e6:.1f} µs" for n, t in times.items())
        print(f"{K} cached tokens, batch {B}, pages of {bs}, {kept} of {n_pages} kept, {args.rounds} rounds (CPU time "
              f"a layer): {us}; after / before {median_ratio(times['after'], times['before']):.3f}, after × sdpa "
              f"{median_ratio(times['after'], times['sdpa']):.3f}; largest difference {largest:.1e}", flush=True)


if __name__ == "__main__":
    main()
