"""Re-score the predictions of finished ``monitor_sweep.py`` runs offline: replay each base run's
recorded ``monitor.jsonl`` through the detectors (``attnkit.monitor.replay``, the same functions
the live monitor runs) and count predictions and false alarms with the sweep's own failure
criteria (``monitor_sweep.summarize``). No training; a second of CPU per run.

    python experiments/monitor_rescore.py runs/monitor_sweep --out experiments/results/monitor_rescore/seeds01.json
    python experiments/monitor_rescore.py runs/monitor_sweep --predictors logit_growth,overflow_risk,entropy_fall,entropy_collapse --horizon 8

Rescue numbers are not re-scored (a rescue is a new training run: ``monitor_sweep.py --rescue-from``);
``--rescues DIR`` summarises such a directory (also one stopped part-way: the rescues it has).

    python experiments/monitor_rescore.py --rescues runs/monitor_s45_clip_rate --out experiments/results/monitor_rescue/seeds45_clip_rate.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from monitor_sweep import OLD_PREDICTORS, PREDICTORS, summarize  # noqa: E402

from attnkit.monitor import Thresholds  # noqa: E402
from attnkit.monitor.replay import first_step, replay  # noqa: E402
from attnkit.common.io import write_atomic  # noqa: E402


def rescore(run_dir: Path, predictors: tuple[str, ...], thresholds: Thresholds, degrade: float) -> dict:
    base = [json.loads(line) for line in open(run_dir / "runs.jsonl")]
    base = [r for r in base if not r["rescue"]]
    for r in base:
        issues = replay(run_dir / r["name"] / "monitor.jsonl", thresholds, predictors)
        r["first_warning"] = first_step(issues, predictors)
        r["warnings"] = [{"type": i.type, "step": i.step, "where": i.where(), "value": i.value} for i in issues]
    summary = summarize(base, degrade)
    for key in ("rescue_tried", "rescued", "rescued_fraction"):
        summary.pop(key, None)
    best = summary["best_final_loss"]
    for row, r in zip(summary["table"], base):
        # how far from the failure line each run ended: a false alarm at +0.45 is not one at +0.05
        row["margin_to_failure_nats"] = round(best[r["arch"]] + degrade - r["final_loss"], 4)
        for key in ("rescue_failed_at", "rescue_final_loss"):
            row.pop(key, None)
    summary["false_alarm_runs"] = [row["name"] for row in summary["table"]
                                   if row["failed_at"] is None and row["first_warning"] is not None]
    summary["missed_runs"] = [row["name"] for row in summary["table"] if row["failed_at"] is not None and (
        row["first_warning"] is None or row["first_warning"] >= row["failed_at"])]
    summary["source"] = str(run_dir)
    summary["predictors"] = list(predictors)
    summary["thresholds"] = vars(thresholds)
    return summary


def rescue_summary(run_dir: Path, degrade: float) -> dict:
    """The sweep's summary of a ``--rescue-from`` directory (base runs re-scored + their rescues)."""
    runs = [json.loads(line) for line in open(run_dir / "runs.jsonl")]
    summary = summarize(runs, degrade)
    rescues = {r["name"].removesuffix("_rescue"): r for r in runs if r["rescue"]}
    best = summary["best_final_loss"]
    for row in summary["table"]:
        r = rescues.get(row["name"])
        row["margin_to_failure_nats"] = round(best[row["name"].split("_lr")[0]] + degrade - row["final_loss"], 4)
        if r is not None:
            row["rescue_actions"] = [f"{i['step']}: {i['action']}: {i['detail']}" for i in r["interventions"]
                                     if i["action"] != "qk_clip"][:12]
    summary["policy"] = next((r.get("policy") for r in runs if r["rescue"]), None)
    summary["source"] = str(run_dir)
    summary["complete"] = (run_dir / "summary.json").exists()
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path, nargs="?")
    p.add_argument("--rescues", type=Path, default=None, help="summarise a monitor_sweep.py --rescue-from directory")
    p.add_argument("--predictors", default=",".join(PREDICTORS),
                   help=f"the first sweeps' set: {','.join(OLD_PREDICTORS)}")
    p.add_argument("--horizon", type=float, default=Thresholds().horizon, help="logit_growth's horizon (window spans)")
    p.add_argument("--degrade", type=float, default=0.5)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    if args.rescues:
        summary = rescue_summary(args.rescues, args.degrade)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(args.out, json.dumps(summary, indent=1) + "\n")
        keys = ("policy", "complete", "unstable", "rescue_tried", "rescued", "rescued_fraction")
        print(json.dumps({k: summary[k] for k in keys}))
        return
    if args.run_dir is None:
        p.error("give a run directory (or --rescues DIR)")
    summary = rescore(args.run_dir, tuple(args.predictors.split(",")), Thresholds(horizon=args.horizon), args.degrade)
    text = json.dumps(summary, indent=1)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(args.out, text + "\n")
    keys = ("runs", "unstable", "stable", "predicted", "predicted_fraction", "median_lead_steps", "false_alarms",
            "false_alarm_fraction", "false_alarm_runs", "missed_runs")
    print(json.dumps({k: summary[k] for k in keys}, indent=1))


if __name__ == "__main__":
    main()
