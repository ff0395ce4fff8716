"""Before / after a change to the sparse kernels: another commit's ``src`` against this tree's, in
alternating fresh processes, on the model part of ``bench_block_kernel.py`` (reference-long's
architecture, batch 1, fp32, dense SDPA and ``PATTERN@DENSITY``).

  memory   each process is ``sparse_train_peak.py``'s worker for one configuration (its step peak,
           the resident set at the end of the forward, and the same after ``malloc_trim``);
           processes alternate (commit, configuration), ``--processes`` of each.
  time     each process times dense SDPA and the sparse configuration, prefill and training step,
           in ``--rounds`` interleaved rounds (wall and CPU time of the process); a round's ratio is
           sparse / dense in that round; processes alternate between the commit and this tree.

The other commit's ``src`` is written to a temporary directory (``git archive``) and put first on
``PYTHONPATH``; the benchmark scripts are this tree's.

    python bench/sparse_ab.py --before 1dece70 --what memory --processes 4
    python bench/sparse_ab.py --before 1dece70 --what time --processes 4 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rss  # noqa: E402
from sparse_options import add_sparse_options  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent


def time_worker(args) -> None:
    import torch

    from bench_sparse import build, steps

    torch.set_num_threads(1)
    model = build(args)
    configs = ("dense-sdpa", f"{args.pattern}@{args.density:g}")
    fns = {c: steps(model, c, args.length, args) for c in configs}
    for inference, train in fns.values():  # warm-up
        inference()
        train()
    times = {f"{c} {m}": {"wall": [], "cpu": []} for c in configs for m in ("prefill", "train")}
    for _ in range(args.rounds):
        for c, (inference, train) in fns.items():
            for m, fn in (("prefill", inference), ("train", train)):
                t, p = time.perf_counter(), time.process_time()
                fn()
                times[f"{c} {m}"]["wall"].append(time.perf_counter() - t)
                times[f"{c} {m}"]["cpu"].append(time.process_time() - p)
    rss.report(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, help="the commit to compare with (its src/)")
    p.add_argument("--what", choices=("memory", "time"), default="memory")
    add_sparse_options(p, pattern="moba", block_size=128)
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--processes", type=int, default=4, help="fresh processes of each kind")
    p.add_argument("--rounds", type=int, default=3, help="measured steps of each kind per process")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return time_worker(args)
    sparse = f"{args.pattern}@{args.density:g}"
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.before, "src"], capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        trees = {"before": str(Path(tmp) / "src"), "after": str(ROOT / "src")}
        results: dict = {}
        for i in range(args.processes):
            for tree in (trees if i % 2 == 0 else reversed(list(trees))):
                os.environ["PYTHONPATH"] = trees[tree]
                if args.what == "memory":
                    for config in ("dense-sdpa", sparse):
                        cmd = [sys.executable, str(BENCH / "sparse_train_peak.py"), "--worker", config,
                               "--model", args.model, "--length", str(args.length),
                               "--block-size", str(args.block_size), "--rounds", str(args.rounds)]
                        results.setdefault(f"{tree} {config}", []).append(rss.run_fresh(cmd, f"{tree} {config}"))
                else:
                    cmd = [sys.executable, __file__, "--worker", "--before", args.before, "--model", args.model,
                           "--pattern", args.pattern, "--density", str(args.density),
                           "--block-size", str(args.block_size), "--length", str(args.length),
                           "--rounds", str(args.rounds)]
                    results.setdefault(tree, []).append(rss.run_fresh(cmd, tree))
                print(f"process {i + 1}/{args.processes} ({tree}) done, load {os.getloadavg()[0]:.1f}",
                      file=sys.stderr, flush=True)
    print(json.dumps(summary(results, sparse, args.what), indent=1))
    print(json.dumps(results))


def summary(results: dict, sparse: str, what: str) -> dict:
    """memory: MiB medians over processes, each the median of its steps (KiB for ``fwd_malloc``,
    counts for ``fwd_blocks``); time: medians over every round of sparse / dense, and after /
    before of those medians."""
    if what == "memory":
        return {k: {m: round(statistics.median(r[m] for r in rs) / rss.unit(m), 2) for m in rs[0]}
                for k, rs in results.items()}
    out: dict = {}
    for tree, runs in results.items():
        for m in ("prefill", "train"):
            for clock in ("wall", "cpu"):
                ratios = [s / d for r in runs for s, d in zip(r[f"{sparse} {m}"][clock], r[f"dense-sdpa {m}"][clock])]
                out.setdefault(tree, {})[f"{m} {clock}"] = round(statistics.median(ratios), 3)
    out["after / before"] = {k: round(out["after"][k] / out["before"][k], 3) for k in out["after"]}
    return out


if __name__ == "__main__":
    main()
