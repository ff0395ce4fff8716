"""Print one plain run's trace: per observed step, loss, largest |logit| over heads, mean entropy,
q/k gradient norm (for designing the predictor on the design seed)."""
import json, math, sys


def num(x):
    return math.nan if x is None else (math.inf if x == "inf" else -math.inf if x == "-inf" else float(x))


def trace(path):
    rows = []
    for line in open(path):
        d = json.loads(line)
        if d.get("type") != "step":
            continue
        m = d["metrics"]
        mag = max(max(abs(num(a)), abs(num(b))) for a, b in zip(m["logit_max"], m["logit_min"]))
        ent = sum(num(e) for e in m["entropy"]) / len(m["entropy"])
        g = max(num(x) for x in d["grad_norm"]) if d.get("grad_norm") else math.nan
        rows.append((d["step"], num(d["loss"]), mag, ent, g))
    return rows


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(p)
        for r in trace(p):
            print("  step %4d loss %7.3f max|logit| %10.1f entropy %5.2f grad %9.3g" % r)
