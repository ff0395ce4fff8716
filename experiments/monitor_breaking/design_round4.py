"""Fourth round: the overflow predictor's thresholds chosen again on the DESIGN seeds 0-4, with the
fourth round's outcome (rule v2 over the runs' 200 steps; a healthy run is a false alarm only when
warned at a step below 150), offline on the plain runs' every-step recordings (``run_plain_round4.sh``).

    PYTHONPATH=src:experiments/monitor_breaking python3 experiments/monitor_breaking/design_round4.py \\
        --out runs/breaking5 --seeds 0,1,2,3,4 > experiments/monitor_breaking/results/design_round4.md

The ranking is design_round3.py's (warned share minus false-alarm share, then fewer false alarms, then the
longer median lead, then fewer observations). The grid adds an absolute headroom (a figure this many bits
below the limit at ``overflow_confirm`` observations in a row is warned whatever its trend) and longer
horizons, for figures that drift into the limit at ~1 % a step. Seeds 5 and 6 are never read here.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from attnkit.monitor import replay as replay_mod
from attnkit.monitor.detectors import Thresholds

import design_round3
from design_round3 import plain_runs, rank, table

replay_mod.read_run = functools.lru_cache(maxsize=None)(replay_mod.read_run)  # in each worker too (fork)


def evaluate(runs: list[dict], out: Path, setting: dict, scored_before: int) -> dict:
    return design_round3.evaluate(runs, out, setting, scored_before=scored_before)

SCORED_BEFORE = 150
GRID = {  # the schedule (1 in 2 near the limit), window and first steps as the third round chose them
    "near_limit_every": (2,),
    "observe_first": (16,),
    "overflow_window": (3,),
    "overflow_horizon": (8.0, 16.0, 32.0),
    "overflow_floor_bits": (6.0, 8.0),
    "overflow_headroom_bits": (0.0, 0.1, 0.25, 0.5),
    "overflow_confirm": (2, 3),
}
LIBRARY = {"near_limit_every": 2, "observe_first": 16, **{k: getattr(Thresholds(), k) for k in GRID
                                                          if k not in ("near_limit_every", "observe_first")}}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/breaking5")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args()
    out = Path(args.out)
    seeds = {int(s) for s in args.seeds.split(",")}
    assert not seeds & {5, 6}, "seeds 5 and 6 are held out"
    runs = plain_runs(out, seeds)
    keys = list(GRID)
    settings = [dict(zip(keys, values)) for values in itertools.product(*GRID.values())]
    with ProcessPoolExecutor(args.jobs) as pool:
        results = list(pool.map(functools.partial(evaluate, runs, out, scored_before=SCORED_BEFORE), settings))
    results.sort(key=rank)
    library = next(x for x in results if x["setting"] == LIBRARY)
    nf = sum(1 for r in runs if r["kind_v2"])
    print(f"# Fourth round, design seeds {args.seeds} (rule v2 over all steps; false alarms: healthy runs warned "
          f"below step {SCORED_BEFORE})\n\n{len(runs)} plain fp16 runs, {nf} failed, {len(runs) - nf} healthy.\n")
    print(f"## The grid ({len(results)} settings), best {args.top} by the ranking\n")
    table(results[:args.top], keys)
    print("\n## The library's thresholds now, and the best\n")
    table([library, results[0]], keys)
    best = results[0]
    print(f"\nbest: {json.dumps(best['setting'])}\n\nlead (steps): {best['leads']}\n\nmissed: {best['missed']}\n\n"
          f"false alarms: {best['fa']}\n\nthe library's now: missed {library['missed']}; false alarms {library['fa']}")
    print(f"\nranks above the library's: {rank(best) < rank(library)}")


if __name__ == "__main__":
    main()
