"""``split_sdpa`` alone, another commit's against this tree's, in one process: the attention op on one
layer's shapes of ``reference-long`` (4 query / 2 KV heads of 32, fp32, one thread) over ``moba``'s
selection at density 0.25 on random q/k, dense SDPA beside them; inference (forward under ``no_grad``)
and training (forward + backward of a weighted sum), CPU time, interleaved rounds. Before the rounds
the two kernels' outputs and gradients are compared (largest difference printed).

The other commit's ``seam/kernels/split_sdpa.py`` is loaded as a module of its own beside this tree's
attnkit (which it imports from), so commits whose kernel takes the same arguments compare.

    python bench/split_sdpa_ab.py --before 29d0cb0
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import interleave  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KERNEL = "src/attnkit/seam/kernels/split_sdpa.py"


def load_before(commit: str):
    source = subprocess.run(["git", "show", f"{commit}:{KERNEL}"], cwd=ROOT, check=True, capture_output=True,
                            text=True).stdout
    path = Path(tempfile.mkdtemp()) / "split_sdpa_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("split_sdpa_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (its dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, help="the commit to compare with")
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=9)
    args = p.parse_args()

    import torch
    import torch.nn.functional as F

    from attnkit.seam.kernels import split_sdpa as after
    from attnkit.sparse import SparseConfig
    from attnkit.sparse.attention import choose_blocks

    torch.set_num_threads(1)
    before = load_before(args.before)
    T, H, Hk, D = args.length, 4, 2, 32
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, T, h, D, generator=g).transpose(1, 2) for h in (H, Hk, Hk))
    w = torch.randn(1, H, T, D, generator=g)
    sel = choose_blocks(q, k, SparseConfig(pattern="moba", density=0.25, block_size=args.block_size))

    def attention(name: str):
        if name == "sdpa":
            return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        fn = {"before": before, "after": after}[name].split_sdpa_attention
        return lambda q, k, v: fn(q, k, v, sel.indices, sel.valid, sel.geometry, scale=D ** -0.5)

    def step(name: str, train: bool):
        fn = attention(name)

        def run():
            if not train:
                with torch.no_grad():
                    return fn(q, k, v)
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            (fn(*leaves) * w).sum().backward()
            return [t.grad for t in leaves]
        return run

    out_b, out_a = step("before", False)(), step("after", False)()
    grads_b, grads_a = step("before", True)(), step("after", True)()
    print(f"largest difference, forward {(out_b - out_a).abs().max().item():.2e}, gradients "
          f"{max((x - y).abs().max().item() for x, y in zip(grads_b, grads_a)):.2e}")
    for mode, train in (("inference", False), ("training", True)):
        times = {n: t["cpu"] for n, t in interleave({n: step(n, train) for n in ("sdpa", "before", "after")},
                                                      args.rounds).items()}
        ratio = {n: statistics.median(a / b for a, b in zip(ts, times["sdpa"])) for n, ts in times.items()}
        change = statistics.median(a / b for a, b in zip(times["after"], times["before"]))
        print(f"{mode}, {T} tokens, blocks of {args.block_size}, {args.rounds} rounds (CPU time): "
              + ", ".join(f"{n} {statistics.median(ts) * 1e3:.1f} ms ({ratio[n]:.3f}x sdpa)" for n, ts in times.items())
              + f"; after / before {change:.3f}")


if __name__ == "__main__":
    main()
