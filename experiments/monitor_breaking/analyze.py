"""Tables of the breaking sweep (see sweep.py): failures by the written rule, prediction on held-out
seeds (replayed from the plain runs' monitor JSONL with the predictor of ``policies.py``), rescue by
the plain test, baselines, and check's verdicts before training.

    python experiments/monitor_breaking/analyze.py --out runs/breaking --design 0 --heldout 1,2
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import Counter, defaultdict
from pathlib import Path

RESCUE_NATS = 0.1  # rescued: ends finite, healthy, final loss within this of the same config at half the LR
FALSE_ALARM_COST = 0.02  # an acted-on false alarm may cost at most this
STALLED_SCALE = 1e-20  # a GradScaler scale below this: every update has been skipped for ~70+ steps


def load_runs(out: Path) -> list[dict]:
    runs = {}
    for line in open(out / "runs.jsonl"):
        r = json.loads(line)
        runs[r["name"]] = r
    return [r for r in runs.values() if "error" not in r]


def config_name(r: dict) -> str:
    return r["name"].rsplit("_", 1)[0] if not r["name"].endswith("_lr") else r["name"]


def key(r: dict) -> tuple:
    return (r["arch"], r["precision"], r["temperature"], r["lr"], r["warmup"], r["seed"])


_OUT: list[Path] = []


def predicted_first(r: dict, out: Path | None = None) -> int | None:
    """The step of the plain run's first predictor warning, replayed from its monitor JSONL with the
    predictor and thresholds of ``policies.py`` (so the predictor can be judged on finished runs)."""
    from attnkit.monitor.replay import first_step, replay
    from policies import EVERY, OBSERVE_FIRST, PREDICTORS, thresholds_for
    from sweep import Config

    out = out or _OUT[0]
    cfg = Config(r["arch"], r["precision"], r["temperature"], r["lr"], r["warmup"], r["seed"])
    path = out / r["name"] / "monitor.jsonl"
    if not path.exists():
        return None
    with open(path) as f:
        heads = json.loads(f.readline())["heads"]
    # runs recorded before the monitor wrote each head's format and scale: from the configuration
    formats = [h.get("format") or r["precision"] for h in heads]
    scales = [h.get("scale") or (64 // 4) ** -0.5 / r["temperature"] for h in heads]
    # the monitor's schedule (every step for the first OBSERVE_FIRST, then 1 in EVERY), kept from the
    # recording (every=1 in run_plain_every1.sh)
    issues = replay(path, thresholds_for(cfg), PREDICTORS, formats=formats, scales=scales, every=EVERY,
                    observe_first=OBSERVE_FIRST)
    return first_step(issues, PREDICTORS)


def pct(a: int, b: int) -> str:
    return f"{a}/{b} ({100 * a / b:.0f} %)" if b else "0/0"


def quantiles(xs: list[float]) -> str:
    if not xs:
        return "—"
    xs = sorted(xs)
    q = lambda p: xs[min(len(xs) - 1, int(p * (len(xs) - 1) + 0.5))]  # noqa: E731
    return f"min {xs[0]}, p25 {q(0.25)}, median {q(0.5)}, p75 {q(0.75)}, max {xs[-1]}"


def score(runs: list[dict], seeds: set[int], out: Path) -> dict:
    """Prediction, rescue and baselines on the runs of ``seeds``."""
    by = defaultdict(dict)  # config key -> arm -> run
    for r in runs:
        if r["seed"] in seeds:
            by[key(r)][r["arm"]] = r
    plain = {k: a["plain"] for k, a in by.items() if "plain" in a}
    failed = {k: r for k, r in plain.items() if r["kind"]}
    healthy = {k: r for k, r in plain.items() if not r["kind"]}
    warn = {k: predicted_first(r, out) for k, r in plain.items()}
    predicted = {k: r for k, r in failed.items() if warn[k] is not None and warn[k] < r["failed_at"]}
    leads = [r["failed_at"] - warn[k] for k, r in predicted.items()]
    false_alarms = {k: r for k, r in healthy.items() if warn[k] is not None}

    def rescued_by(arm: str) -> tuple[int, int, list]:
        done, tried, rows = 0, 0, []
        for k, r in failed.items():
            a, ref = by[k].get(arm), by[k].get("half_lr")
            if a is None or ref is None:
                continue
            if not math.isfinite(ref["final_loss"]):  # no finite target: the half-LR run broke too
                rows.append((r["name"], a["kind"], a["final_loss"], ref["final_loss"], None, a.get("undone_steps", 0),
                             a.get("snapshot_bytes", 0)))
                continue
            tried += 1
            ok = (not a["kind"]) and math.isfinite(a["final_loss"]) and math.isfinite(ref["final_loss"]) and \
                a["final_loss"] <= ref["final_loss"] + RESCUE_NATS
            done += ok
            rows.append((r["name"], a["kind"], a["final_loss"], ref["final_loss"], ok, a.get("undone_steps", 0),
                         a.get("snapshot_bytes", 0)))
        return done, tried, rows

    def cost_on_healthy(arm: str, only: set | None = None) -> list[float]:
        out_ = []
        for k, r in healthy.items():
            if only is not None and k not in only:
                continue
            a = by[k].get(arm)
            if a is not None:
                out_.append((a["final_loss"] if math.isfinite(a["final_loss"]) else math.inf) - r["final_loss"])
        return out_

    baselines = {}
    monitor_arms = sorted({a for arms in by.values() for a in arms if a.startswith("monitor")})
    for arm in monitor_arms + ["clip", "spike_rollback", "zloss", "qknorm"]:
        done, tried, rows = rescued_by(arm)
        costs = cost_on_healthy(arm, set(false_alarms) if arm.startswith("monitor") else None)
        baselines[arm] = {"rescued": done, "tried": tried, "rows": rows,
                          "healthy_cost": costs, "healthy_broken": sum(1 for c in costs if not math.isfinite(c))}
    return {"plain": plain, "failed": failed, "healthy": healthy, "predicted": predicted, "leads": leads,
            "false_alarms": false_alarms, "warn": warn, "baselines": baselines, "by": by}


def cost_on_every_healthy(s: dict, arm: str) -> list[float]:
    """Final loss of ``arm`` minus the plain run's, on every healthy run the arm ran on."""
    return [(a["final_loss"] if math.isfinite(a["final_loss"]) else math.inf) - r["final_loss"]
            for k, r in s["healthy"].items() if (a := s["by"][k].get(arm)) is not None]


def check_table(runs: list[dict]) -> list[tuple]:
    """``attnkit.check``'s verdict for each (arch, precision, temperature) before training (the freshly
    initialised model, seq_len 64, its temperature) and its largest safe weight growth, against what
    the plain runs of that configuration did (every LR, warm-up and seed)."""
    import attnkit
    from attnkit.check import FORMATS
    from sweep import Shape, build_model

    groups = defaultdict(list)
    for r in runs:
        if r["arm"] == "plain" and r["precision"] in ("fp16", "bf16"):
            groups[(r["arch"], r["precision"], r["temperature"])].append(r)
    rows = []
    for (arch, prec, t), rs in sorted(groups.items()):
        model = build_model(arch, 0, 1024, Shape(), 1.0)  # the temperature goes to check, not into the model
        rep = attnkit.check(model, seq_len=Shape().context, dtype=prec, temperature=t, regions=False)
        growth = min(c.max_growth[prec] for c in rep.primary)
        # the largest logit before the stored product reaches the format's limit (eager: 65,504 x scale)
        est = rep.primary[0].estimate
        line = FORMATS[prec].max_finite * min(1.0, est.scale) if rep.shape.kernel in (None, "eager") else \
            FORMATS[prec].max_finite
        rows.append((arch, prec, t, rep.status, growth, line, len(rs), sum(r["kind"] == "nonfinite" for r in rs),
                     sum(r["kind"] == "spike" for r in rs)))
    return rows


def fmt_loss(x) -> str:
    return "NaN" if x is None or not math.isfinite(x) else f"{x:.3f}"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/breaking2")
    p.add_argument("--design", default="0")
    p.add_argument("--heldout", default="1")
    p.add_argument("--no-check", action="store_true")
    p.add_argument("--rows", action="store_true", help="per-run rescue rows")
    args = p.parse_args()
    out = Path(args.out)
    _OUT.append(out)
    runs = load_runs(out)
    plain = [r for r in runs if r["arm"] == "plain"]
    kinds = Counter(r["kind"] for r in plain)
    print(f"plain runs: {len(plain)}; failed: {sum(1 for r in plain if r['kind'])} "
          f"(non-finite {kinds['nonfinite']}, unrecovered spike {kinds['spike']}); healthy {kinds[None]}\n")
    print("| axis | value | runs | non-finite | spike | healthy |\n|---|---|---|---|---|---|")
    for axis in ("arch", "precision", "temperature", "lr", "warmup", "seed"):
        c = Counter((r[axis], r["kind"] or "healthy") for r in plain)
        for v in sorted({r[axis] for r in plain}, key=str):
            n = sum(c[(v, k)] for k in ("nonfinite", "spike", "healthy"))
            print(f"| {axis} | {v} | {n} | {c[(v, 'nonfinite')]} | {c[(v, 'spike')]} | {c[(v, 'healthy')]} |")
    for name, seeds in (("design", args.design), ("held-out", args.heldout)):
        s = score(runs, {int(x) for x in seeds.split(",")}, out)
        nf = len(s["failed"])
        print(f"\n### {name} seed(s) {seeds}: {len(s['plain'])} plain runs, {nf} failed, {len(s['healthy'])} healthy\n")
        print(f"- predicted (warned before the failure step): {pct(len(s['predicted']), nf)}")
        print(f"- lead, steps from the first warning to the failure step: {quantiles(s['leads'])}")
        bins = ((1, 3), (4, 7), (8, 15), (16, 31), (32, 10**9))
        print("  - lead histogram: " + ", ".join(
            f"{lo}-{hi if hi < 10**9 else ''} steps: {sum(lo <= x <= hi for x in s['leads'])}" for lo, hi in bins))
        print(f"- false alarms on healthy runs: {pct(len(s['false_alarms']), len(s['healthy']))}")
        for prec in ("fp16", "bf16", "fp32"):
            h = [k for k in s["healthy"] if k[1] == prec]
            f = [k for k in s["failed"] if k[1] == prec]
            if h or f:
                print(f"  - {prec}: predicted {pct(sum(k in s['predicted'] for k in f), len(f))}, "
                      f"false alarms {pct(sum(k in s['false_alarms'] for k in h), len(h))}")
        missed = [(r["name"], s["warn"][k], r["failed_at"]) for k, r in s["failed"].items() if k not in s["predicted"]]
        if missed:
            print("- missed: " + "; ".join(f"{n} (first warning {w}, failed at {f})" for n, w, f in missed))
        if s["false_alarms"]:
            print("- false alarms: " + "; ".join(
                f"{r['name']} (warned at {s['warn'][k]}; final loss {fmt_loss(r['final_loss'])}, GradScaler scale "
                f"{r['grad_scale']:.3g})" if r.get("grad_scale") is not None else
                f"{r['name']} (warned at {s['warn'][k]})" for k, r in s["false_alarms"].items()))
            # healthy by the rule, but every update skipped: the scaler's scale collapsed (fp16 overflow in
            # the backward); a post-hoc figure, stated beside the rule's, never instead of it
            stalled = [k for k, r in s["healthy"].items() if (r.get("grad_scale") or 1.0) < STALLED_SCALE]
            print(f"- healthy runs whose GradScaler scale fell below {STALLED_SCALE:g} (updates skipped, training "
                  f"stalled): {len(stalled)}, of them warned: {sum(k in s['false_alarms'] for k in stalled)}; false "
                  f"alarms among the other healthy runs: "
                  f"{pct(sum(k in s['false_alarms'] for k in s['healthy'] if k not in stalled), len(s['healthy']) - len(stalled))}")
        print("\n| arm | failed runs rescued (plain test) | runs | ended healthy and finite | undone steps (mean) | "
              "snapshot memory (max) |\n|---|---|---|---|---|---|")
        for arm, b in s["baselines"].items():
            undone = [row[5] for row in b["rows"]]
            snap = max((row[6] for row in b["rows"]), default=0)
            healthy_end = sum(1 for row in b["rows"] if not row[1] and math.isfinite(row[2]))
            no_ref = sum(1 for row in b["rows"] if row[4] is None)
            print(f"| {arm} | {pct(b['rescued'], b['tried'])} | {len(b['rows'])} ({no_ref} without a finite half-LR "
                  f"reference) | {healthy_end}/{len(b['rows'])} | "
                  f"{statistics.fmean(undone) if undone else 0:.1f} | {snap / 2**20:.1f} MiB |")
            if args.rows:
                for row in b["rows"]:
                    verdict = "no finite reference" if row[4] is None else "rescued" if row[4] else "not rescued"
                    print(f"|   | {row[0]}: {row[1] or 'healthy'}, final {fmt_loss(row[2])} vs half-LR "
                          f"{fmt_loss(row[3])} → {verdict} | | | {row[5]} | |")
        for arm in ("clip", "spike_rollback", "zloss", "qknorm"):
            costs = s["baselines"][arm]["healthy_cost"]
            if costs:
                print(f"- {arm} on healthy runs: {len(costs)}; final-loss change vs the plain run: "
                      + ", ".join(f"{c:+.3f}" for c in sorted(costs)) + " nats")
        for arm in [a for a in s["baselines"] if a.startswith("monitor")]:
            every = cost_on_every_healthy(s, arm)
            if len(every) > len(s["baselines"][arm]["healthy_cost"]):
                print(f"- {arm} on every healthy run it ran on: {len(every)}; final-loss change vs the plain run: "
                      + ", ".join(f"{c:+.3f}" for c in sorted(every)) + " nats")
            fa_costs = s["baselines"][arm]["healthy_cost"]
            if fa_costs:
                print(f"- {arm}, acted-on false alarms: {len(fa_costs)}; final-loss change vs the plain run: "
                      + ", ".join(f"{c:+.3f}" for c in sorted(fa_costs))
                      + f" nats; within {FALSE_ALARM_COST}: {sum(c <= FALSE_ALARM_COST for c in fa_costs)}/{len(fa_costs)}")
    if not args.no_check:
        print("\n| arch | format | t | check before training | largest safe weight growth | logits may reach "
              "(stored product at the limit) | runs | non-finite | spike |\n|---|---|---|---|---|---|---|---|---|")
        for arch, prec, t, status, growth, line, n, nf, sp in check_table(runs):
            print(f"| {arch} | {prec} | {t:g} | {status} | {growth:.3g}x | {line:,.0f} | {n} | {nf} | {sp} |" if line < 1e6
                  else f"| {arch} | {prec} | {t:g} | {status} | {growth:.3g}x | {line:.3g} | {n} | {nf} | {sp} |")


if __name__ == "__main__":
    main()
