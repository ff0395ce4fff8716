"""Markdown tables of ``eval.py``'s JSON lines: per length, one row per (name, density) with the
measured density, perplexity (and its ratio to dense), KL against dense and top-1 agreement.

    python experiments/sparse/quality/table.py experiments/sparse/results/quality/eval.jsonl [--names a,b,...]
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("jsonl")
    ap.add_argument("--names", default=None, help="rows to show, in this order (default: all, as measured)")
    ap.add_argument("--labels", default="", help="NAME=LABEL[,NAME=LABEL]: how a row is called in the table")
    a = ap.parse_args()
    rows = [json.loads(line) for line in open(a.jsonl) if line.strip()]
    labels = dict(x.split("=", 1) for x in a.labels.split(",") if x)
    names = a.names.split(",") if a.names else list(dict.fromkeys(r["name"] for r in rows))
    for n in sorted({r["seq_len"] for r in rows}):
        at = {(r["name"], r["density"]): r for r in rows if r["seq_len"] == n}
        dense = at[("dense", 1.0)]
        print(f"\n{n} tokens ({dense['windows']} windows, {dense['windows'] * n:,} tokens; dense perplexity "
              f"{dense['perplexity']:.2f})\n")
        densities = sorted({d for (_, d) in at if d < 1.0})
        print("| pattern | " + " | ".join(f"{d:g}: ppl (×dense) / KL / top-1 agr." for d in densities) + " |")
        print("|---|" + "---:|" * len(densities))
        for name in names:
            if name == "dense" or not any((name, d) in at for d in densities):
                continue
            cells = []
            for d in densities:
                r = at.get((name, d))
                cells.append("–" if r is None else
                             f"{r['perplexity']:.2f} ({r['perplexity_ratio']:.3f}) / {r['kl']:.3f} / {r['top1_agreement']:.3f}")
            print(f"| {labels.get(name, name)} | " + " | ".join(cells) + " |")
        print("\nmeasured density: " + ", ".join(
            f"{d:g} → {next(r['measured_density'] for (nm, dd), r in at.items() if dd == d):.3f}" for d in densities))


if __name__ == "__main__":
    main()
