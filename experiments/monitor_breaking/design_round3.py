"""Third round: the overflow predictor and the near-limit observation setting, chosen on the DESIGN
seeds 0, 1, 2 only, under the second failure rule (``sweep.label_v2``), offline: the plain runs'
every-step monitor JSONL (``run_plain_round3.sh``) replayed under a grid of schedules and thresholds.

    PYTHONPATH=src:experiments/monitor_breaking python3 experiments/monitor_breaking/design_round3.py \\
        --out runs/breaking4 --seeds 0,1,2 > experiments/monitor_breaking/results/design_round3.md

The ranking is design.py's, written before the second round: warned share minus false-alarm share,
then fewer false alarms, then the longer median lead, then fewer observations (here: the mean share of
steps observed, which the near-limit setting raises). Seeds 3 and 4 are never read here.
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
from attnkit.monitor.monitor import observes

import design

PREDICTORS = design.PREDICTORS
EVERY = 4
GRID = {
    "near_limit_every": (None, 1, 2),
    "observe_first": (16,),
    "overflow_window": (3,),
    "overflow_horizon": (4.0, 8.0, 16.0),
    "overflow_floor_bits": (3.0, 5.0, 6.0, 8.0),
    "overflow_headroom_bits": (0.0,),
    "overflow_confirm": (1, 2, 3),
}
# one threshold at a time around the best setting of GRID
AROUND = [("overflow_window", 2), ("overflow_window", 4), ("observe_first", 0), ("observe_first", 32),
          ("overflow_headroom_bits", 0.25), ("overflow_headroom_bits", 1.0)]


def plain_runs(out: Path, seeds: set[int]) -> list[dict]:
    return design.plain_runs(out, seeds)


def observed_share(r: dict, out: Path, setting: dict, t: Thresholds) -> float:
    """The share of the run's steps the monitor would observe on this schedule (its cost)."""
    run = replay_mod.read_run(out / r["name"] / "monitor.jsonl")
    heads = run.meta["heads"]
    formats, scales = [h.get("format") for h in heads], [h.get("scale") or 1.0 for h in heads]
    from attnkit.monitor.detectors import near_limit

    near, seen = False, 0
    for i, step in enumerate(run.steps):
        if observes(step, EVERY, setting["observe_first"], near, setting["near_limit_every"]):
            seen += 1
            near = near_limit({m: v[i] for m, v in run.metrics.items() if m != "grad_norm"}, formats, scales,
                              t.overflow_floor_bits)
    return seen / max(len(run.steps), 1)


def evaluate(runs: list[dict], out: Path, setting: dict, rule: str = "v2", scored_before: int | None = None) -> dict:
    """``scored_before``: a healthy run is a false alarm only when warned at a step below it (None: any)."""
    kind, at = ("kind_v2", "failed_at_v2") if rule == "v2" else ("kind", "failed_at")
    t = replace(Thresholds(), **{k: v for k, v in setting.items() if k not in ("observe_first", "near_limit_every")})
    failed = [r for r in runs if r[kind]]
    healthy = [r for r in runs if not r[kind]]
    warned = {}
    for r in runs:
        issues = replay_mod.replay(out / r["name"] / "monitor.jsonl", t, PREDICTORS, every=EVERY,
                                   observe_first=setting["observe_first"], near_limit_every=setting["near_limit_every"])
        warned[r["name"]] = replay_mod.first_step(issues, PREDICTORS)
    hit = [r for r in failed if warned[r["name"]] is not None and warned[r["name"]] < r[at]]
    leads = sorted(r[at] - warned[r["name"]] for r in hit)
    fa = [r for r in healthy if warned[r["name"]] is not None
          and (scored_before is None or warned[r["name"]] < scored_before)]
    return {"setting": setting, "predicted": len(hit), "failed": len(failed), "false_alarms": len(fa),
            "healthy": len(healthy), "lead_median": statistics.median(leads) if leads else None,
            "lead_min": leads[0] if leads else None, "leads": leads,
            "observed": statistics.fmean(observed_share(r, out, setting, t) for r in runs),
            "missed": [(r["name"], warned[r["name"]], r[at]) for r in failed if r not in hit],
            "fa": [(r["name"], warned[r["name"]]) for r in fa]}


def rank(x: dict) -> tuple:
    return (-(x["predicted"] / max(x["failed"], 1) - x["false_alarms"] / max(x["healthy"], 1)), x["false_alarms"],
            -(x["lead_median"] or 0), x["observed"])


def fmt(v) -> str:
    return "off" if v is None else f"{v:g}"


def table(results: list[dict], keys: list[str]) -> None:
    print("| " + " | ".join(keys) + " | warned | false alarms | lead median (min) | steps observed |")
    print("|" + "---|" * (len(keys) + 4))
    for x in results:
        s = x["setting"]
        print("| " + " | ".join(fmt(s[k]) for k in keys) + f" | {x['predicted']}/{x['failed']} | "
              f"{x['false_alarms']}/{x['healthy']} | {x['lead_median']} ({x['lead_min']}) | {x['observed']:.0%} |")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/breaking4")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--top", type=int, default=20)
    args = p.parse_args()
    out = Path(args.out)
    seeds = {int(s) for s in args.seeds.split(",")}
    assert not seeds & {3, 4}, "seeds 3 and 4 are held out"
    runs = plain_runs(out, seeds)
    replay_mod.read_run = functools.lru_cache(maxsize=None)(replay_mod.read_run)
    keys = list(GRID)
    results = [evaluate(runs, out, dict(zip(keys, values))) for values in itertools.product(*GRID.values())]
    results.sort(key=rank)
    nf = sum(1 for r in runs if r["kind_v2"])
    print(f"# Third round, design seeds {args.seeds} (rule v2)\n\n{len(runs)} plain fp16 runs, {nf} failed by rule v2 "
          f"({sum(1 for r in runs if r['kind'])} by rule v1), {len(runs) - nf} healthy. Schedule: 1 step in {EVERY}, "
          f"every step for the first observe_first, and one in near_limit_every while a figure is within "
          f"overflow_floor_bits of its format's limit.\n")
    print(f"## The grid ({len(results)} settings), best {args.top} by the ranking\n")
    table(results[:args.top], keys)
    best = results[0]["setting"]
    print("\n## The best setting with the near-limit observation off / every step / 1 in 2\n")
    same = [x for x in results if all(x["setting"][k] == best[k] for k in keys if k != "near_limit_every")]
    table(same, keys)
    print("\n## The best setting of each near-limit choice\n")
    table([next(x for x in results if x["setting"]["near_limit_every"] == n) for n in GRID["near_limit_every"]], keys)
    print("\n## One threshold at a time around the best\n")
    around = [evaluate(runs, out, dict(best, **{k: v})) for k, v in AROUND]
    table([results[0]] + around, keys)
    b = results[0]
    print(f"\nbest: {json.dumps(best)}\n\nlead (steps): {b['leads']}\n\nmissed: {b['missed']}\n\nfalse alarms: {b['fa']}")
    one_v1 = evaluate(runs, out, best, rule="v1")
    print(f"\nthe same setting by rule v1: warned {one_v1['predicted']}/{one_v1['failed']}, false alarms "
          f"{one_v1['false_alarms']}/{one_v1['healthy']} ({one_v1['fa']})")


if __name__ == "__main__":
    main()
