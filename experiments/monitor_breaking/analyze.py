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
    from policies import PREDICTORS, thresholds_for
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
    issues = replay(path, thresholds_for(cfg), PREDICTORS, formats=formats, scales=scales)
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
    for arm in ("monitor", "clip", "spike_rollback", "zloss", "qknorm"):
        done, tried, rows = rescued_by(arm)
        costs = cost_on_healthy(arm, set(false_alarms) if arm == "monitor" else None)
        baselines[arm] = {"rescued": done, "tried": tried, "rows": rows,
                          "healthy_cost": costs, "healthy_broken": sum(1 for c in costs if not math.isfinite(c))}
    return {"plain": plain, "failed": failed, "healthy": healthy, "predicted": predicted, "leads": leads,
            "false_alarms": false_alarms, "warn": warn, "baselines": baselines, "by": by}


def check_table(runs: list[dict]) -> list[tuple]:
    """check's verdict for each (arch, precision, temperature) before training vs what happened."""
    from sweep import Shape, build_model

    import attnkit

    verdicts = {}
    rows = []
    groups = defaultdict(list)
    for r in runs:
        if r["arm"] == "plain" and r["precision"] in ("fp16", "bf16"):
            groups[(r["arch"], r["precision"], r["temperature"])].append(r)
    for (arch, prec, t), rs in sorted(groups.items()):
        if (arch, prec, t) not in verdicts:
            model = build_model(arch, 0, 1024, Shape(), t)
            rep = attnkit.check(model, seq_len=Shape().context, dtype=prec)
            verdicts[(arch, prec, t)] = rep.status
        nonfinite = sum(r["kind"] == "nonfinite" for r in rs)
        spike = sum(r["kind"] == "spike" for r in rs)
        rows.append((arch, prec, t, verdicts[(arch, prec, t)], len(rs), nonfinite, spike))
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/breaking")
    p.add_argument("--design", default="0")
    p.add_argument("--heldout", default="1")
    p.add_argument("--no-check", action="store_true")
    args = p.parse_args()
    out = Path(args.out)
    _OUT.append(out)
    runs = load_runs(out)
    plain = [r for r in runs if r["arm"] == "plain"]
    kinds = Counter(r["kind"] for r in plain)
    print(f"plain runs: {len(plain)}; failed: {sum(1 for r in plain if r['kind'])} "
          f"(nonfinite {kinds['nonfinite']}, spike {kinds['spike']}); healthy {kinds[None]}")
    by_axis = defaultdict(Counter)
    for r in plain:
        for axis in ("arch", "precision", "temperature", "lr", "warmup"):
            by_axis[axis][(r[axis], r["kind"] or "healthy")] += 1
    for axis, c in by_axis.items():
        vals = sorted({v for v, _ in c}, key=str)
        print(f"  {axis}: " + "; ".join(f"{v}: {c[(v, 'nonfinite')]} nonfinite, {c[(v, 'spike')]} spike, "
                                        f"{c[(v, 'healthy')]} healthy" for v in vals))
    for name, seeds in (("design", args.design), ("held-out", args.heldout)):
        s = score(runs, {int(x) for x in seeds.split(",")}, out)
        nf = len(s["failed"])
        print(f"\n== {name} seeds {seeds}: {len(s['plain'])} plain runs, {nf} failed, {len(s['healthy'])} healthy")
        print(f"predicted: {pct(len(s['predicted']), nf)}; lead steps: {quantiles(s['leads'])}")
        print(f"false alarms: {pct(len(s['false_alarms']), len(s['healthy']))}")
        missed = [r["name"] for k, r in s["failed"].items() if k not in s["predicted"]]
        if missed:
            print("  missed:", ", ".join(f"{m} (warn {s['warn'][k]}, failed {s['failed'][k]['failed_at']})"
                                         for m, k in zip(missed, [k for k in s["failed"] if k not in s["predicted"]])))
        if s["false_alarms"]:
            print("  false alarms:", ", ".join(f"{r['name']} (warn {s['warn'][k]})" for k, r in s["false_alarms"].items()))
        for arm, b in s["baselines"].items():
            costs = [c for c in b["healthy_cost"] if math.isfinite(c)]
            print(f"  {arm:15s} rescued {pct(b['rescued'], b['tried'])}; on healthy runs: {len(b['healthy_cost'])} runs, "
                  f"{b['healthy_broken']} broken, cost median {statistics.median(costs) if costs else float('nan'):+.3f} "
                  f"max {max(costs) if costs else float('nan'):+.3f} nats")
    if not args.no_check:
        print("\ncheck verdicts before training vs outcome:")
        for row in check_table(runs):
            print("  ", row)


if __name__ == "__main__":
    main()
