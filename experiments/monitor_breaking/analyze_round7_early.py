"""Seventh round (README "Seventh round"): can the first steps of a run tell which runs will fail?

The sixth round's cut arms showed that the plain rescue test needs the rate cut within about 25 steps
of the start on the late failures. This reads, from the plain runs' every-step monitor recordings, the
two figures the predictor watches — each head's q·kᵀ product (the largest |logit| ÷ the head's scale,
what eager attention stores in fp16) and the largest module output, as log2 of their fraction of
fp16's largest value (0 = at the limit) — at steps 5, 10, 15, 20, 25 and 30, and asks:

1. **Within a configuration** (architecture, temperature, LR, warm-up; runs differ by seed only) whose
   seeds 0-10 include both failing and healthy runs (rule v2, 200 steps): do the failing runs' early
   figures differ from the healthy runs'? Mann-Whitney AUC of "the failing run's figure is the larger"
   over the pairs (failing, healthy) of the same configuration (0.5: no information).
2. **An early flag** "act at step s if the figure is within m bits of the limit", m chosen as the
   smallest margin that flags at least 90 % of the late-warned scoreable failures (first warning at step
   50 or later, finite half-LR reference): how many healthy runs the same flag marks (false alarms
   before anything nears the limit); and the other way round, m as large as 10 % false alarms allow:
   how many of those failures it flags.

    PYTHONPATH=src:experiments/monitor_breaking python3 experiments/monitor_breaking/analyze_round7_early.py \\
        --out runs/breaking5 --seeds 0,1,2,3,4,5,6,7,8,9,10
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from analyze import config_name
from analyze_round3 import RESCUE_NATS, config_runs, healthy_end
from analyze_round4 import outcome

FP16_MAX = 65504.0
STEPS = (5, 9, 10, 15, 20, 25, 30, 52)  # 9 and 52: the monitor's first observation after the warm-ups end (below)
FIGURES = ("product", "activation", "either")
CATCH = 0.9  # the early flag must mark this share of the late-warned scoreable failures
FALSE_ALARMS = 0.1  # ... or may mark at most this share of the healthy runs (the prediction target)
LATE = 50


def early_figures(path: Path) -> dict[int, dict[str, float]]:
    """step -> figure -> log2(fraction of fp16's largest value), from one every-step recording."""
    scales, out = None, {}
    for line in path.open():
        rec = json.loads(line)
        if rec["type"] == "meta":
            scales = [h["scale"] for h in rec["heads"]]
        elif rec["type"] == "step" and int(rec["step"]) in STEPS:
            m = rec["metrics"]
            logits = [abs(float(v)) / s for key in ("logit_max", "logit_min") for v, s in zip(m[key], scales)
                      if v is not None and math.isfinite(float(v))]
            acts = [float(v) for v in m.get("activation_absmax") or [] if v is not None and math.isfinite(float(v))]
            bits = lambda xs: math.log2(max(xs) / FP16_MAX) if xs and max(xs) > 0 else math.nan  # noqa: E731
            fig = {"product": bits(logits), "activation": bits(acts)}
            fig["either"] = max((x for x in fig.values() if not math.isnan(x)), default=math.nan)
            out[int(rec["step"])] = fig
    return out


def auc(pos: list[float], neg: list[float]) -> tuple[float, int]:
    """P(a failing run's figure > a healthy run's) over finite pairs, ties counting one half."""
    pairs = [(p, n) for p in pos for n in neg if not (math.isnan(p) or math.isnan(n))]
    if not pairs:
        return math.nan, 0
    return sum((p > n) + 0.5 * (p == n) for p, n in pairs) / len(pairs), len(pairs)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/breaking5")
    p.add_argument("--seeds", default="0,1,2,3,4,5,6,7,8,9,10")
    args = p.parse_args()
    out = Path(args.out)
    by, plain, warn = config_runs(out, {int(s) for s in args.seeds.split(",")})
    label = {k: outcome(r, None) for k, r in plain.items()}
    figs = {k: early_figures(out / r["name"] / "monitor.jsonl") for k, r in plain.items()
            if (out / r["name"] / "monitor.jsonl").exists()}
    figs = {k: f for k, f in figs.items() if all(s in f or label[k][1] is not None and label[k][1] <= s for s in STEPS[:2])}

    groups = defaultdict(lambda: ([], []))  # configuration -> (failing keys, healthy keys)
    for k in figs:
        groups[config_name(plain[k]).rsplit("_s", 1)[0]][0 if label[k][0] else 1].append(k)
    edge = {g: v for g, v in groups.items() if v[0] and v[1]}
    print(f"## Early figures of failing and healthy runs (seeds {args.seeds}; {len(figs)} plain runs with every "
          f"step recorded; rule v2 over 200 steps)\n")
    print("Figures: log2 of the largest q·kᵀ product (|logit| ÷ scale) or module output as a fraction of fp16's "
          "65,504 (0 = at the limit); median over the runs, failing / healthy.\n")
    print("### 1. Within a configuration (seeds differ only)\n")
    print("| configuration | failing / healthy runs | "
          + " | ".join(f"step {s}: product" for s in STEPS[1::2]) + " | AUC product (steps " + ", ".join(map(str, STEPS[1::2]))
          + ") | AUC module output |\n|---|---|" + "---|" * (len(STEPS[1::2]) + 2))
    pooled = {(f, s): ([], []) for f in FIGURES for s in STEPS}
    for g, (fail, ok) in sorted(edge.items()):
        med = lambda ks, s, f: _median([figs[k].get(s, {}).get(f, math.nan) for k in ks])  # noqa: E731
        cells = [f"{med(fail, s, 'product'):.1f} / {med(ok, s, 'product'):.1f}" for s in STEPS[1::2]]
        aucs = {f: [auc([figs[k].get(s, {}).get(f, math.nan) for k in fail], [figs[k].get(s, {}).get(f, math.nan) for k in ok])[0]
                    for s in STEPS[1::2]] for f in ("product", "activation")}
        for f in FIGURES:
            for s in STEPS:
                a, n = auc([figs[k].get(s, {}).get(f, math.nan) for k in fail], [figs[k].get(s, {}).get(f, math.nan) for k in ok])
                if n:
                    pooled[f, s][0].append(a * n)
                    pooled[f, s][1].append(n)
        print(f"| {g} | {len(fail)} / {len(ok)} | " + " | ".join(cells) + " | "
              + ", ".join(f"{a:.2f}" for a in aucs["product"]) + " | " + ", ".join(f"{a:.2f}" for a in aucs["activation"]) + " |")
    print("\nPooled within-configuration AUC (pairs of the same configuration only):\n")
    print("| figure | " + " | ".join(f"step {s}" for s in STEPS) + " |\n|---|" + "---|" * len(STEPS))
    for f in FIGURES:
        print(f"| {f} | " + " | ".join(f"{sum(pooled[f, s][0]) / sum(pooled[f, s][1]):.2f}" if pooled[f, s][1] else "–"
                                        for s in STEPS) + " |")

    scoreable_late = [k for k in figs if label[k][0] and warn[k] is not None and warn[k] >= LATE
                      and (ref := by[k].get("half_lr")) is not None and math.isfinite(ref["final_loss"])]
    healthy = [k for k in figs if not label[k][0]]
    print("\n### 2. An early flag: act at step s when a figure is within m bits of the limit\n")
    print(f"m is the smallest margin that flags ≥ {CATCH:.0%} of the {len(scoreable_late)} late-warned (first warning at "
          f"step {LATE}+) scoreable failures; the healthy runs it flags too are false alarms ({len(healthy)} healthy runs, "
          f"{sum(len(v[1]) for v in edge.values())} of them in configurations where other seeds fail).\n")
    print("| step | figure | margin m (bits below the limit) | late scoreable failures flagged | healthy runs flagged "
          "(false alarms) | of them in configurations where other seeds fail |\n|---|---|---|---|---|---|")
    edge_healthy = {k for v in edge.values() for k in v[1]}
    for s in STEPS:
        for f in FIGURES:
            xs = sorted((figs[k].get(s, {}).get(f, math.nan) for k in scoreable_late), reverse=True)
            xs = [x for x in xs if not math.isnan(x)]
            if not xs:
                continue
            need = math.ceil(CATCH * len(scoreable_late))
            threshold = xs[min(need, len(xs)) - 1]
            flagged = [k for k in scoreable_late if figs[k].get(s, {}).get(f, -math.inf) >= threshold]
            fa = [k for k in healthy if figs[k].get(s, {}).get(f, -math.inf) >= threshold]
            print(f"| {s} | {f} | {-threshold:.1f} | {len(flagged)}/{len(scoreable_late)} | "
                  f"**{len(fa)}/{len(healthy)} ({len(fa) / len(healthy):.0%})** | {len(set(fa) & edge_healthy)} |")
    allowed = math.floor(FALSE_ALARMS * len(healthy))
    print(f"\nThe other way round: the widest margin that flags at most {allowed} healthy runs ({FALSE_ALARMS:.0%}).\n")
    print("| step | figure | margin m (bits below the limit) | healthy runs flagged | late scoreable failures flagged "
          "| of those, passing the plain test with the rate cut from that step (oracle arms run on all 41) |"
          "\n|---|---|---|---|---|---|")
    for s in STEPS:
        for f in FIGURES:
            hs = sorted((x for k in healthy if not math.isnan(x := figs[k].get(s, {}).get(f, math.nan))), reverse=True)
            threshold = hs[allowed] if len(hs) > allowed else -math.inf  # flag strictly above the (allowed+1)-th healthy
            fa = sum(x > threshold for x in hs)
            flagged = [k for k in scoreable_late if figs[k].get(s, {}).get(f, -math.inf) > threshold]
            arms = sorted(a for a in {a for k in scoreable_late for a in by[k]} if a.endswith(f"_at{s}")
                          and all(a in by[k] for k in scoreable_late))
            rescued = "; ".join(f"{a}: {sum(_passes(by[k][a], by[k]['half_lr']) for k in flagged)}" for a in arms)
            print(f"| {s} | {f} | {-threshold:.1f} | {fa}/{len(healthy)} | **{len(flagged)}/{len(scoreable_late)}** | "
                  f"{rescued or '–'} |")

    warmup_end_table(by, plain, figs, label, warn, healthy, scoreable_late)
    ceiling_table(by, plain, figs, label, warn, healthy)
    flag_cost(by, plain, figs, healthy)

def warmup_end_observed(warmup: int) -> int:
    """The first step the sweep's monitor observes (every ``EVERY``, all of the first ``OBSERVE_FIRST``) at which
    the optimizer's rate, read after the step, no longer rose: LambdaLR's linear warm-up gives step ``warmup``
    the peak rate, read after step ``warmup - 1``."""
    from policies import EVERY, OBSERVE_FIRST

    step = max(1, warmup - 1)
    while not (step < OBSERVE_FIRST or step % EVERY == 0):
        step += 1
    return step


def warmup_end_table(by: dict, plain: dict, figs: dict, label: dict, warn: dict, healthy: list, late: list) -> None:
    """3. The flag at the end of the warm-up (the first observation at which the rate stopped rising), with the
    predictor's own false alarms (warned at steps 0-149) counted in: margin -> what it marks."""
    at = {k: warmup_end_observed(plain[k]["warmup"]) for k in figs}
    fig = {k: figs[k].get(at[k], {}).get("either", math.nan) for k in figs}
    predictor_fa = {k for k in healthy if warn[k] is not None and warn[k] < 150}
    failed = [k for k in figs if label[k][0]]
    scoreable = [k for k in failed if (ref := by[k].get("half_lr")) is not None and math.isfinite(ref["final_loss"])]
    print(f"\n### 3. The flag at the end of the warm-up (observed step {sorted(set(at.values()))}), figure 'either'\n")
    print(f"The predictor alone warns {len(predictor_fa)} of the {len(healthy)} healthy runs at steps 0-149; a flagged "
          "healthy run counts once. 'Late': scoreable failures first warned at step 50 or later; 'passes at 10': of the "
          "flagged late ones, those the rate cut to a quarter from step 10 (cut0.25_at10) brings within 0.1 nats.\n")
    print("| margin m (bits) | healthy runs flagged or warned (false alarms) | failures flagged | scoreable flagged | "
          "late scoreable flagged | of them passing at 10 (w10 runs) |\n|---|---|---|---|---|---|")
    for m in [x / 2 for x in range(8, 21)]:
        flag = {k for k in figs if fig[k] >= -m}
        fa = (flag & set(healthy)) | predictor_fa
        fl = [k for k in late if k in flag]
        passing = sum(1 for k in fl if "cut0.25_at10" in by[k] and plain[k]["warmup"] == 10
                      and _passes(by[k]["cut0.25_at10"], by[k]["half_lr"]))
        print(f"| {m:.1f} | {len(fa)}/{len(healthy)} ({len(fa) / len(healthy):.0%}) | {len(flag & set(failed))}/{len(failed)} | "
              f"{len(flag & set(scoreable))}/{len(scoreable)} | {len(fl)}/{len(late)} | {passing} |")


LIBRARY_ARMS = ("monitor_library", "monitor_rollback_trend_lr_quarter")  # the library's rule (a quarter), as run


def ceiling_table(by: dict, plain: dict, figs: dict, label: dict, warn: dict, healthy: list) -> None:
    """4. The best an early flag could do on the plain test, chosen in hindsight on these seeds: flag at step s when
    the figure 'either' is within m bits of the limit and cut the rate to a quarter from there (the oracle arm
    ``cut0.25_at<s>``, run on the late-warned scoreable failures); every other scoreable failure keeps what the
    library's rule did on it (a flagged early-warned failure too: an approximation, its early cut was not run).
    For each s, the m rescuing most with at most 10 % of the healthy runs flagged or warned."""
    failed = [k for k in figs if label[k][0]]
    scoreable = [k for k in failed if (ref := by[k].get("half_lr")) is not None and math.isfinite(ref["final_loss"])]
    lib = {k: next((by[k][a] for a in LIBRARY_ARMS if a in by[k]), None) for k in scoreable}
    base = {k: lib[k] is not None and _passes(lib[k], by[k]["half_lr"]) for k in scoreable}
    predictor_fa = {k for k in healthy if warn[k] is not None and warn[k] < 150}
    allowed = math.floor(FALSE_ALARMS * len(healthy))
    print("\n### 4. What an early flag could give on the plain test, in hindsight\n")
    print(f"The library's rule alone: {sum(base.values())}/{len(scoreable)} scoreable failures rescued "
          f"({sum(lib[k] is None for k in scoreable)} without a run of it, counted as not rescued). Flag at step s, "
          f"cut to a quarter from s; m chosen on these same seeds for the most rescued with at most {allowed} of "
          f"{len(healthy)} healthy runs flagged or warned by the predictor ({len(predictor_fa)} are).\n")
    print("| step s | margin m (bits) | false alarms | late failures flagged | rescued (plain test) |\n|---|---|---|---|---|")
    # "end": the first observation after the warm-up ended (step 9 for a 10-step warm-up, 52 for 50), cut from the
    # next step: cut0.25_at10 for the 10-step warm-ups, cut0.25_at50 (two steps early) for the 50-step ones
    end = {k: warmup_end_observed(plain[k]["warmup"]) for k in figs}
    for s in (*STEPS, "end"):
        at = (lambda k: end[k]) if s == "end" else (lambda k, s=s: s)
        arm_of = (lambda k: "cut0.25_at10" if plain[k]["warmup"] == 10 else "cut0.25_at50") if s == "end" else \
            (lambda k, s=s: f"cut0.25_at{s}")
        late = [k for k in scoreable if arm_of(k) in by[k]]
        if not late:
            continue
        arm_for = {k: arm_of(k) for k in late}
        best = None
        for m in sorted({-figs[k].get(at(k), {}).get("either", math.nan) for k in figs}):
            if math.isnan(m):
                continue
            flag = {k for k in figs if figs[k].get(at(k), {}).get("either", -math.inf) >= -m}
            fa = (flag & set(healthy)) | predictor_fa
            if len(fa) > allowed:
                continue
            rescued = sum(_passes(by[k][arm_for[k]], by[k]["half_lr"]) if k in flag and k in arm_for else base[k]
                          for k in scoreable)
            if best is None or rescued > best[0]:
                best = (rescued, m, len(fa), len(flag & set(late)))
        if best:
            print(f"| {s} | {best[1]:.1f} | {best[2]}/{len(healthy)} | {best[3]}/{len(late)} | "
                  f"**{best[0]}/{len(scoreable)} ({best[0] / len(scoreable):.0%})** |")


def flag_cost(by: dict, plain: dict, figs: dict, healthy: list) -> None:
    """5. The seventh round's eligibility test: on the healthy runs the library's ``warmup_headroom`` margin flags
    at the end of the warm-up, the change of the final loss with the rate cut to a quarter from the step after
    (``cut0.25_at10`` for a 10-step warm-up, ``cut0.25_at53`` for 50)."""
    from attnkit.common.findings import threshold

    m = threshold("warmup_headroom_bits")
    end = {k: warmup_end_observed(plain[k]["warmup"]) for k in figs}
    flagged = [k for k in healthy if figs[k].get(end[k], {}).get("either", -math.inf) >= -m]
    print(f"\n### 5. Cost on the healthy runs flagged at the end of the warm-up (m = {m} bits)\n")
    print("| run | plain final loss | a quarter from the step after | change |\n|---|---|---|---|")
    changes = []
    for k in sorted(flagged, key=lambda k: plain[k]["name"]):
        cut = by[k].get(f"cut0.25_at{end[k] + 1}")
        a, b = plain[k]["final_loss"], cut["final_loss"] if cut else math.nan
        change = b - a if math.isfinite(a) and math.isfinite(b) else math.nan
        if cut is not None and math.isfinite(change):
            changes.append(change)
        print(f"| {plain[k]['name']} | {a:.3f} | {'not run' if cut is None else f'{b:.3f}'} | {change:+.3f} |")
    def arm(k):
        return by[k].get(f"cut0.25_at{end[k] + 1}")

    rescued = sum(1 for k in flagged if not math.isfinite(plain[k]["final_loss"]) and arm(k) is not None
                  and math.isfinite(arm(k)["final_loss"]))
    broken = sum(1 for k in flagged if math.isfinite(plain[k]["final_loss"]) and arm(k) is not None
                 and not math.isfinite(arm(k)["final_loss"]))
    if changes:
        print(f"\nMean change where both are finite: **{statistics.fmean(changes):+.3f} nats** over {len(changes)} runs; "
              f"non-finite plain final losses the cut left finite: {rescued}; finite ones it left non-finite: {broken}.")
    every = [(c["final_loss"] - plain[k]["final_loss"]) for k in healthy if (c := by[k].get("cut0.25_at10")) is not None
             and math.isfinite(c["final_loss"]) and math.isfinite(plain[k]["final_loss"])]
    if every:
        print(f"\nFor scale: the same cut from step 10 on every healthy run with a 10-step warm-up ({len(every)} with both "
              f"final losses finite) changed the final loss by {min(every):+.3f} to {max(every):+.3f} nats "
              f"(median {statistics.median(every):+.3f}): at this sweep's rates every run trains better slower.")


def _passes(arm: dict, ref: dict) -> bool:
    return healthy_end(arm) and arm["final_loss"] <= ref["final_loss"] + RESCUE_NATS


def _median(xs: list[float]) -> float:
    xs = sorted(x for x in xs if not math.isnan(x))
    return xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2 if xs else math.nan


if __name__ == "__main__":
    main()
