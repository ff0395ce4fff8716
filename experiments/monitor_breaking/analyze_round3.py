"""Third-round tables of the breaking sweep: prediction by the second failure rule (``sweep.label_v2``)
and, beside it, by the first (``sweep.label``); rescue by the plain test per arm; costs on healthy runs.
The predictor is ``policies.py``'s (its thresholds and schedule, ``NEAR_LIMIT_EVERY`` included),
replayed on the plain runs' every-step recordings.

    PYTHONPATH=src:experiments/monitor_breaking python3 experiments/monitor_breaking/analyze_round3.py \\
        --out runs/breaking4 --seeds 0,1,2 --title "design seeds 0-2"
    ... --seeds 3,4 --title "held out"        # once, after every threshold and the policy were fixed
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections import defaultdict
from pathlib import Path

from analyze import fmt_loss, key, load_runs, pct, quantiles

RESCUE_NATS = 0.1
FALSE_ALARM_COST = 0.02
RULES = {"v2": ("kind_v2", "failed_at_v2"), "v1": ("kind", "failed_at")}
BASELINES = ("clip", "spike_rollback", "zloss", "qknorm")


def first_warning(r: dict, out: Path) -> int | None:
    from attnkit.monitor.replay import first_step, replay
    from policies import EVERY, NEAR_LIMIT_EVERY, OBSERVE_FIRST, PREDICTORS, thresholds_for

    path = out / r["name"] / "monitor.jsonl"
    if not path.exists():
        return None
    issues = replay(path, thresholds_for(None), PREDICTORS, every=EVERY, observe_first=OBSERVE_FIRST,
                    near_limit_every=NEAR_LIMIT_EVERY)
    return first_step(issues, PREDICTORS)


def healthy_end(a: dict) -> bool:
    """An arm's run ended healthy (by rule v2: not stalled either) with a finite final loss."""
    return not a.get("kind_v2", a["kind"]) and math.isfinite(a["final_loss"])


def config_runs(out: Path, seeds: set[int]) -> tuple[dict, dict, dict]:
    """The runs of these seeds under ``out``: (config key -> arm -> run, config key -> plain run,
    config key -> the plain run's first predictor warning, replayed)."""
    by = defaultdict(dict)
    for r in load_runs(out):
        if r["seed"] in seeds:
            by[key(r)][r["arm"]] = r
    plain = {k: a["plain"] for k, a in by.items() if "plain" in a}
    return by, plain, {k: first_warning(r, out) for k, r in plain.items()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/breaking4")
    p.add_argument("--seeds", required=True)
    p.add_argument("--title", default="")
    p.add_argument("--rows", action="store_true", help="per-run rescue rows")
    args = p.parse_args()
    out = Path(args.out)
    by, plain, warn = config_runs(out, {int(s) for s in args.seeds.split(",")})
    print(f"## {args.title or 'seeds ' + args.seeds}: {len(plain)} plain runs (seeds {args.seeds})\n")

    # ---------------------------------------------------------------- prediction, both rules
    print("| rule | failed (kinds) | warned before the failure step | lead, steps: min / p25 / median / p75 / max "
          "| lead 1-3 / 4-7 / 8-15 / 16-31 / 32+ | false alarms on healthy runs |\n|---|---|---|---|---|---|")
    details = []
    for rule, (kind, at) in RULES.items():
        failed = {k: r for k, r in plain.items() if r[kind]}
        healthy = {k: r for k, r in plain.items() if not r[kind]}
        hit = {k for k, r in failed.items() if warn[k] is not None and warn[k] < r[at]}
        leads = sorted(failed[k][at] - warn[k] for k in hit)
        fa = {k for k in healthy if warn[k] is not None}
        kinds = defaultdict(int)
        for r in failed.values():
            kinds[r[kind]] += 1
        bins = ((1, 3), (4, 7), (8, 15), (16, 31), (32, 10 ** 9))
        print(f"| {rule} | {len(failed)} ({', '.join(f'{v} {k}' for k, v in sorted(kinds.items()))}) | "
              f"**{pct(len(hit), len(failed))}** | {quantiles(leads)} | "
              f"{' / '.join(str(sum(lo <= x <= hi for x in leads)) for lo, hi in bins)} | **{pct(len(fa), len(healthy))}** |")
        details.append((rule, failed, healthy, hit, fa, at))
    for rule, failed, healthy, hit, fa, at in details:
        missed = [(failed[k]["name"], warn[k], failed[k][at], failed[k]["kind_v2"]) for k in failed if k not in hit]
        print(f"\n- rule {rule}, missed: " + ("; ".join(f"{n} ({kd}; first warning {w}, failed at {f})"
                                                      for n, w, f, kd in missed) or "none"))
        print(f"- rule {rule}, false alarms: " + ("; ".join(
            f"{healthy[k]['name']} (warned at {warn[k]}; final {fmt_loss(healthy[k]['final_loss'])}, GradScaler scale "
            f"{healthy[k]['grad_scale']:.3g})" for k in fa) or "none"))

    kind, at = RULES["v2"]
    rescue_and_costs(by, {k: r for k, r in plain.items() if r[kind]}, {k: r for k, r in plain.items() if not r[kind]},
                     warn, args.rows)


def rescue_and_costs(by: dict, failed: dict, healthy: dict, warn: dict, rows: bool) -> None:
    """The rescue table by the plain test over ``failed`` (config key -> plain run) for every arm that ran
    on them, per-run rows when ``rows``, and each arm's cost on ``healthy`` runs (``warn``: key -> the
    plain run's first predictor warning, for the acted-on false alarms)."""
    # ---------------------------------------------------------------- rescue by the plain test (rule v2 failures)
    arms = sorted({a for k in failed.keys() | healthy.keys() for a in by[k] if a not in ("plain", "half_lr")},
                  key=lambda a: (not a.startswith("monitor"), a))
    refs = {k: by[k].get("half_lr") for k in failed}
    have_ref = [k for k in failed if refs[k] is not None]
    finite_ref = [k for k in have_ref if math.isfinite(refs[k]["final_loss"])]
    print(f"\n### Rescue (failures by rule v2: {len(failed)}; half-LR reference run for {len(have_ref)}, finite for "
          f"{len(finite_ref)})\n")
    print("| arm | rescued (plain test) | failures run | of them without a finite half-LR reference | ended healthy and "
          "finite | undone steps (mean) | snapshot memory (max) |\n|---|---|---|---|---|---|---|")
    rows_by_arm = {}
    for arm in arms:
        ran = [k for k in failed if arm in by[k]]
        if not ran:
            continue
        arm_rows, done, tried = [], 0, 0
        for k in ran:
            a, ref = by[k][arm], refs[k]
            ok = None
            if ref is not None and math.isfinite(ref["final_loss"]):
                tried += 1
                ok = healthy_end(a) and a["final_loss"] <= ref["final_loss"] + RESCUE_NATS
                done += ok
            arm_rows.append((failed[k]["name"], a, ref, ok))
        rows_by_arm[arm] = arm_rows
        undone = [a.get("undone_steps", 0) for _, a, _, _ in arm_rows]
        snap = max((a.get("snapshot_bytes", 0) for _, a, _, _ in arm_rows), default=0)
        print(f"| {arm} | **{pct(done, tried)}** | {len(ran)} | {sum(ok is None for *_, ok in arm_rows)} | "
              f"{sum(healthy_end(a) for _, a, _, _ in arm_rows)}/{len(ran)} | {statistics.fmean(undone):.1f} | "
              f"{snap / 2 ** 20:.1f} MiB |")
    if rows:
        for arm, arm_rows in rows_by_arm.items():
            print(f"\n{arm}:\n")
            for name, a, ref, ok in arm_rows:
                verdict = "no half-LR run" if ref is None else "no finite reference" if ok is None else \
                    "rescued" if ok else "not rescued"
                print(f"- {name}: {a.get('kind_v2') or 'healthy'}, final {fmt_loss(a['final_loss'])} vs half-LR "
                      f"{fmt_loss(ref['final_loss']) if ref else '—'} → {verdict}; undone {a.get('undone_steps', 0)}")

    # ---------------------------------------------------------------- costs on healthy runs
    print("\n### Cost on healthy runs (rule v2): final loss of the arm minus the plain run's\n")
    for arm in arms:
        costs = sorted(((by[k][arm]["final_loss"] if math.isfinite(by[k][arm]["final_loss"]) else math.inf)
                        - r["final_loss"], k) for k, r in healthy.items() if arm in by[k])
        if not costs:
            continue
        acted = [(c, k) for c, k in costs if warn[k] is not None]
        print(f"- {arm}: {len(costs)} healthy runs; change " + ", ".join(f"{c:+.3f}" for c, _ in costs) + " nats"
              + (f"; acted-on false alarms (warned): {len(acted)}, change " + ", ".join(f"{c:+.3f}" for c, _ in acted)
                 + f", within {FALSE_ALARM_COST}: {sum(c <= FALSE_ALARM_COST for c, _ in acted)}/{len(acted)}"
                 if arm.startswith("monitor") else ""))


if __name__ == "__main__":
    main()
