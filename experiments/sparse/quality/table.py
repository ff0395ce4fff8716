"""A markdown table of ``eval.py``'s JSON lines: one row per (density, pattern), for each length the
kept share of the causal blocks (measured), perplexity (× dense), KL against dense and top-1
agreement with dense.

    python experiments/sparse/quality/table.py experiments/sparse/results/quality/eval.jsonl \\
        --names moba,quest,gate --labels gate=learned_gate
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("jsonl")
    ap.add_argument("--names", default=None, help="rows to show, in this order (default: all, as measured)")
    ap.add_argument("--labels", default="", help="NAME=LABEL[,NAME=LABEL]: how a row is called in the table")
    ap.add_argument("--bold", default="", help="NAME[,NAME]: rows set in bold")
    a = ap.parse_args()
    rows = [json.loads(line) for line in open(a.jsonl) if line.strip()]
    labels = dict(x.split("=", 1) for x in a.labels.split(",") if x)
    bold = set(a.bold.split(",")) if a.bold else set()
    names = a.names.split(",") if a.names else [n for n in dict.fromkeys(r["name"] for r in rows) if n != "dense"]
    lengths = sorted({r["seq_len"] for r in rows})
    at = {(r["seq_len"], r["name"], r["density"]): r for r in rows}
    dense = {n: at[(n, "dense", 1.0)] for n in lengths}
    print("Dense: " + "; ".join(f"{n} tokens perplexity {dense[n]['perplexity']:.2f} ({dense[n]['windows']} windows, "
                                 f"{dense[n]['windows'] * n:,} tokens)" for n in lengths) + ".\n")
    head = " | ".join(f"{n}: kept | ppl (× dense) | KL | top-1 agr." for n in lengths)
    print(f"| density | pattern | {head} |")
    print("|---|---|" + "---:|" * (4 * len(lengths)))
    for d in sorted({r["density"] for r in rows if r["name"] != "dense"}):
        for name in names:
            if not any((n, name, d) in at for n in lengths):
                continue
            cells = []
            for n in lengths:
                r = at.get((n, name, d))
                cells += ["–"] * 4 if r is None else [
                    f"{r['measured_density']:.3f}", f"{r['perplexity']:.2f} ({r['perplexity_ratio']:.3f})",
                    f"{r['kl']:.3f}", f"{r['top1_agreement']:.3f}"]
            label = labels.get(name, name)
            if name in bold:
                label, cells = f"**{label}**", [f"**{c}**" if c != "–" else c for c in cells]
            print(f"| {d:g} | {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
