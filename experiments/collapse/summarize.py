"""Markdown tables from robustness_evaluation_results.json files: the last epoch, mean ± spread over seeds.

    python experiments/collapse/summarize.py runs/collapse/seed_settings runs/collapse/lr1e-2
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = [("normalized_entropy", "H/ln50", 3), ("dist_from_uniform", "mean abs(p-0.02)", 4),
           ("max_over_uniform", "max weight x50", 2), ("uniqueness", "uniqueness", 2), ("diversity", "diversity", 3),
           ("wasserstein", "W1", 4), ("merged_accuracy", "merged acc", 3)]


def _fmt(values: list[float], digits: int) -> str:
    m = sum(values) / len(values)
    if len(values) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}]"


def _row(label: str, rows: list[dict]) -> str:
    cells = [_fmt([r[k] for r in rows], d) for k, _, d in COLUMNS]
    g = [r["grad_norm"] for r in rows if r.get("grad_norm")]
    cells.append(_fmt([x["mean"] for x in g], 3) if g else "–")
    cells.append(_fmt([x["max"] for x in g], 1) if g else "–")
    gates = [r["gates"]["mean_gate"] for r in rows if r.get("gates")]
    cells.append(_fmt(gates, 3) if gates else "–")
    return f"| {label} | " + " | ".join(cells) + " |"


def header() -> str:
    names = [n for _, n, _ in COLUMNS] + ["grad norm (mean)", "grad norm (max)", "mean gate"]
    return "| run | " + " | ".join(names) + " |\n|---|" + "---:|" * len(names)


def main(dirs: list[str]) -> None:
    for d in dirs:
        res = json.loads((Path(d) / "robustness_evaluation_results.json").read_text())
        a = res["args"]
        print(f"\n### {d}: lr {a['lr']}, d_model {a['d_model']}, {a['n_layer']} layers, weight decay {a['weight_decay']}, "
              f"{a['epochs']} epochs x {a['steps']} steps, gate {a['gate']}, seeds {a['seeds']}\n")
        b = res["baselines"]
        print(f"baselines on the {a['eval_pairs']} evaluation pairs: input A alone {b['model_a']:.3f}, B alone "
              f"{b['model_b']:.3f}, weight averaging {b['weight_averaging']:.3f} (uniqueness {b['averaging_uniqueness']:.2f}, "
              f"W1 {b['averaging_wasserstein']:.4f})\n")
        print(header())
        for label, runs in res["runs"].items():
            if not runs:
                continue
            first = [h[0] for h in runs.values()]
            print(_row(f"{label}, epoch 0", first))
            for e in sorted({len(h) - 1 for h in runs.values()}):
                last = [h[e] for h in runs.values() if len(h) > e]
                print(_row(f"{label}, epoch {e} ({len(last)} seeds)", last))
        for label, hist in res.get("recovery", {}).items():
            print(_row(f"recovery {label}, epoch {hist[0]['epoch']} (checkpoint)", [hist[0]]))
            print(_row(f"recovery {label}, epoch {hist[-1]['epoch']}", [hist[-1]]))


if __name__ == "__main__":
    main(sys.argv[1:])
