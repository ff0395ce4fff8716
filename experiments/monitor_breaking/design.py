"""Tune the overflow predictor on the DESIGN seed only, offline: replay the plain runs' monitor JSONL
(recorded on every step, ``run_plain_every1.sh``) under a grid of observation schedules and
predictor thresholds, and print, per setting, how many of the design seed's failures it warns
before the failure step, how many healthy runs it warns (false alarms), and the lead times.

    PYTHONPATH=src:experiments/monitor_breaking python3 experiments/monitor_breaking/design.py \\
        --out runs/breaking3 --seeds 0 [--top 30]

The held-out seeds are never read here (``analyze.py`` scores the chosen setting on them).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import statistics
from dataclasses import replace
from pathlib import Path

from attnkit.monitor import replay as replay_mod
from attnkit.monitor.detectors import Thresholds

PREDICTORS = ("format_overflow", "activation_overflow")

GRID = {  # the first, coarse grid; --refine gives a finer one around a setting
    "observe_first": (0, 32),
    "overflow_window": (2, 3),
    "overflow_horizon": (4.0, 8.0, 16.0),
    "overflow_floor_bits": (3.0, 6.0),
    "overflow_headroom_bits": (0.0, 1.0),  # 0: no "near the limit" rule, the projection alone
    "overflow_confirm": (1, 2),
}
EVERY = 4


def plain_runs(out: Path, seeds: set[int]) -> list[dict]:
    runs = {}
    for line in open(out / "runs.jsonl"):
        r = json.loads(line)
        if r.get("arm") == "plain" and r.get("seed") in seeds and "error" not in r:
            runs[r["name"]] = r
    return [r for r in runs.values() if (out / r["name"] / "monitor.jsonl").exists()]


def first_warning(r: dict, out: Path, t: Thresholds, every: int, observe_first: int) -> int | None:
    issues = replay_mod.replay(out / r["name"] / "monitor.jsonl", t, PREDICTORS, every=every,
                               observe_first=observe_first)
    return replay_mod.first_step(issues, PREDICTORS)


def evaluate(runs: list[dict], out: Path, setting: dict) -> dict:
    t = replace(Thresholds(), **{k: v for k, v in setting.items() if k != "observe_first"})
    failed = [r for r in runs if r["kind"]]
    healthy = [r for r in runs if not r["kind"]]
    warned = {r["name"]: first_warning(r, out, t, EVERY, setting["observe_first"]) for r in runs}
    hit = [r for r in failed if warned[r["name"]] is not None and warned[r["name"]] < r["failed_at"]]
    leads = sorted(r["failed_at"] - warned[r["name"]] for r in hit)
    fa = [r for r in healthy if warned[r["name"]] is not None]
    return {"setting": setting, "predicted": len(hit), "failed": len(failed), "false_alarms": len(fa),
            "healthy": len(healthy), "lead_median": statistics.median(leads) if leads else None,
            "lead_min": leads[0] if leads else None,
            "missed": [r["name"] for r in failed if r not in hit], "fa": [r["name"] for r in fa]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/breaking3")
    p.add_argument("--seeds", default="0")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--grid", default=None, help="JSON: a grid to use instead of GRID (same keys)")
    args = p.parse_args()
    grid = {**GRID, **json.loads(args.grid)} if args.grid else GRID
    out = Path(args.out)
    runs = plain_runs(out, {int(s) for s in args.seeds.split(",")})
    # every replay reads the same files: read each once
    replay_mod.read_run = functools.lru_cache(maxsize=None)(replay_mod.read_run)
    results = []
    keys = list(grid)
    for values in itertools.product(*(grid[k] for k in keys)):
        results.append(evaluate(runs, out, dict(zip(keys, values))))
    # best: most failures warned, then fewest false alarms, then the longest median lead, then the
    # fewest early observations (each costs ~1.3 unobserved steps)
    results.sort(key=lambda x: (-(x["predicted"] / max(x["failed"], 1) - x["false_alarms"] / max(x["healthy"], 1)),
                                x["false_alarms"], -(x["lead_median"] or 0), x["setting"]["observe_first"]))
    print(f"design seed(s) {args.seeds}: {len(runs)} plain runs, "
          f"{sum(1 for r in runs if r['kind'])} failed, {sum(1 for r in runs if not r['kind'])} healthy\n")
    print("| " + " | ".join(keys) + " | warned | false alarms | lead median (min) |")
    print("|" + "---|" * (len(keys) + 3))
    for x in results[:args.top]:
        s = x["setting"]
        print("| " + " | ".join(f"{s[k]:g}" for k in keys) + f" | {x['predicted']}/{x['failed']} | "
              f"{x['false_alarms']}/{x['healthy']} | {x['lead_median']} ({x['lead_min']}) |")
    best = results[0]
    print("\nbest:", json.dumps(best["setting"]), "\nmissed:", best["missed"], "\nfalse alarms:", best["fa"])


if __name__ == "__main__":
    main()
