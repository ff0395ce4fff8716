"""Fourth-round tables of the breaking sweep (README "Fourth round"): outcomes labelled over all of a
run's steps (200), warnings scored on steps 0-149 for false alarms; beside it, the third round's protocol
on the same runs (losses and skipped updates cut at 150 steps, labelled there). Rescue by the plain test
per arm and costs on healthy runs as in the third round (``analyze_round3.rescue_and_costs``).

    PYTHONPATH=src:experiments/monitor_breaking python3 experiments/monitor_breaking/analyze_round4.py \\
        --out runs/breaking5 --seeds 0,1,2,3,4 --title "design seeds 0-4"
    ... --seeds 5,6 --title "held out"        # once, after the policy was fixed
    ... --seeds 0,1,2,3,4 --near-limit-every 1   # the warnings with every step observed near the limit (off: none)
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections import defaultdict
from pathlib import Path

from analyze import fmt_loss, pct, quantiles
from analyze_round3 import RESCUE_NATS, config_runs, healthy_end, rescue_and_costs
from sweep import label_v2

SCORED_WARNINGS = 150  # a healthy run warned at a step below this is a false alarm
BINS = ((1, 3), (4, 7), (8, 15), (16, 31), (32, 10 ** 9))


def outcome(r: dict, steps: int | None) -> tuple[str | None, int | None]:
    """Rule v2 on the run's first ``steps`` steps (None: all of them)."""
    losses, skipped = r["losses"][:steps], (r.get("skipped") or [])[:steps]
    return label_v2(losses, r["warmup"], skipped or None)


def prediction_row(title: str, plain: dict, warn: dict, labels: dict) -> tuple[dict, dict, set, set]:
    failed = {k: r for k, r in plain.items() if labels[k][0]}
    healthy = {k: r for k, r in plain.items() if not labels[k][0]}
    hit = {k for k in failed if warn[k] is not None and warn[k] < labels[k][1]}
    leads = sorted(labels[k][1] - warn[k] for k in hit)
    fa = {k for k in healthy if warn[k] is not None and warn[k] < SCORED_WARNINGS}
    kinds = defaultdict(int)
    for k in failed:
        kinds[labels[k][0]] += 1
    print(f"| {title} | {len(failed)} ({', '.join(f'{v} {k}' for k, v in sorted(kinds.items()))}) | "
          f"**{pct(len(hit), len(failed))}** | {quantiles(leads)} | "
          f"{' / '.join(str(sum(lo <= x <= hi for x in leads)) for lo, hi in BINS)} | **{pct(len(fa), len(healthy))}** |")
    return failed, healthy, hit, fa


def same_failures_table(by: dict, failed: dict) -> None:
    """The monitor arms that ran on every failure with a finite half-LR reference, compared on exactly those."""
    scoreable = [k for k in failed if (ref := by[k].get("half_lr")) is not None and math.isfinite(ref["final_loss"])]
    arms = sorted(a for a in {a for k in scoreable for a in by[k]} if a.startswith("monitor")
                  and all(a in by[k] for k in scoreable))
    if not scoreable or not arms:
        return
    print(f"\n### The monitor arms on the same {len(scoreable)} failures with a finite half-LR reference\n")
    print("| arm | rescued (plain test) | ended healthy and finite | undone steps (mean) |\n|---|---|---|---|")
    for arm in arms:
        runs = [(by[k][arm], by[k]["half_lr"]) for k in scoreable]
        rescued = sum(healthy_end(a) and a["final_loss"] <= ref["final_loss"] + RESCUE_NATS for a, ref in runs)
        print(f"| {arm} | **{pct(rescued, len(runs))}** | {sum(healthy_end(a) for a, _ in runs)}/{len(runs)} | "
              f"{statistics.fmean(a.get('undone_steps', 0) for a, _ in runs):.1f} |")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/breaking5")
    p.add_argument("--seeds", required=True)
    p.add_argument("--title", default="")
    p.add_argument("--rows", action="store_true", help="per-run rescue rows")
    p.add_argument("--near-limit-every", default=None,
                   help="replay the warnings with this near-limit schedule (an integer, or 'off') instead of policies'")
    args = p.parse_args()
    if args.near_limit_every is not None:
        import policies

        policies.NEAR_LIMIT_EVERY = None if args.near_limit_every == "off" else int(args.near_limit_every)
    out = Path(args.out)
    by, plain, warn = config_runs(out, {int(s) for s in args.seeds.split(",")})
    steps = sorted({r["steps"] for r in plain.values()})
    print(f"## {args.title or 'seeds ' + args.seeds}: {len(plain)} plain runs (seeds {args.seeds}; steps run: {steps})\n")
    print("| protocol | failed (kinds) | warned before the failure step | lead, steps | lead 1-3 / 4-7 / 8-15 / 16-31 / 32+ "
          "| false alarms (healthy runs warned at steps 0-149) |\n|---|---|---|---|---|---|")
    horizon = {k: outcome(r, None) for k, r in plain.items()}
    cut = {k: outcome(r, SCORED_WARNINGS) for k, r in plain.items()}
    failed, healthy, hit, fa = prediction_row("**outcome over all steps** (this round's)", plain, warn, horizon)
    _, healthy150, _, fa150 = prediction_row("outcome over steps 0-149 (the third round's)", plain, warn, cut)
    print(f"\n- missed: " + ("; ".join(f"{failed[k]['name']} ({horizon[k][0]} at {horizon[k][1]}; first warning {warn[k]})"
                                       for k in failed if k not in hit) or "none"))
    print("- false alarms: " + ("; ".join(f"{healthy[k]['name']} (warned at {warn[k]}; final "
                                          f"{fmt_loss(healthy[k]['final_loss'])}, GradScaler scale {healthy[k]['grad_scale']:.3g})"
                                          for k in sorted(fa)) or "none"))
    late = sorted((horizon[k][1], k) for k in failed if horizon[k][1] >= SCORED_WARNINGS)
    print(f"- failures at steps {SCORED_WARNINGS}+ (healthy by the 150-step protocol): "
          + ("; ".join(f"{plain[k]['name']} ({horizon[k][0]} at {at}; first warning {warn[k]})" for at, k in late) or "none"))
    print(f"- 150-step protocol's false alarms: " + ("; ".join(
        f"{healthy150[k]['name']} (warned at {warn[k]}; over all steps: {horizon[k][0] or 'healthy'}"
        + (f" at {horizon[k][1]}" if horizon[k][0] else "") + ")" for k in sorted(fa150)) or "none"))
    rescue_and_costs(by, failed, healthy, warn, args.rows)
    same_failures_table(by, failed)
    behind_at_warning(by, failed, warn)


def behind_at_warning(by: dict, failed: dict, warn: dict, window: int = 20) -> None:
    """How far each scoreable failure's plain run already trailed its half-LR run before the first warning
    (mean training loss over the ``window`` steps before it): a rescue acting at the warning starts there."""
    rows, unwarned = [], []
    for k, r in failed.items():
        ref = by[k].get("half_lr")
        if ref is None or not math.isfinite(ref["final_loss"]):
            continue
        if warn[k] is None:
            unwarned.append(r["name"])
            continue
        at = warn[k]
        lo = max(0, at - window)
        mean = lambda xs: statistics.fmean([x for x in xs[lo:at] if math.isfinite(x)] or [math.nan])  # noqa: E731
        rows.append((r["name"], at, mean(r["losses"]) - mean(ref["losses"])))
    if not rows:
        return
    late = [x for x in rows if x[1] >= 50]  # past the first steps, where the loss falls by nats and any gap is noise
    behind = [x for x in late if x[2] > RESCUE_NATS]
    print(f"\n### Behind the half-LR run before the first warning (training loss, mean of the {window} steps before it)\n")
    print(f"- of the {len(late)} scoreable failures first warned at step 50 or later, {len(behind)} already trailed their "
          f"half-LR run by more than {RESCUE_NATS} nats before that warning (a rescue acting at the warning starts behind); "
          f"{len(rows) - len(late)} were warned in the first 50 steps"
          + (f"; never warned (not counted): {', '.join(unwarned)}." if unwarned else "."))
    for name, at, gap in sorted(rows, key=lambda x: x[1]):
        print(f"  - {name}: first warning {at}, {gap:+.3f} nats")


if __name__ == "__main__":
    main()
