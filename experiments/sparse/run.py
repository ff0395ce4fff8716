"""Issue 14's measurements on ``reference-long``: distil the learned gate, evaluate every pattern against
dense attention, benchmark memory and time, and summarise what the issue asks to show.

Each stage is one command of attnkit's own CLI or benchmark (printed before it runs, so any of them
can be rerun by hand); results go to experiments/sparse/results/ (committed), logs to runs/sparse/.

    python experiments/sparse/run.py                       # every stage, in order
    python experiments/sparse/run.py --stages eval,summary # some of them
    python experiments/sparse/run.py --model /path/to/checkpoint --steps 20 --quick   # a smoke run

Stages:
  train    attnkit sparse train MODEL --pattern learned_gate at each --train-densities (1024 tokens)
  eval     attnkit sparse eval MODEL, every pattern at --densities, at 1024 tokens (+ --extra-lengths
           with fewer tokens), the trained gates as learned_gate
  eval_extra  only the --extra-lengths part of eval (into results/--extra-out)
  gate_eval   each trained gate directory (every --train-densities x --seeds) alone, as learned_gate at
              every --densities, 1024 tokens (results/eval_1024_gates/NAME/): a gate at its own density
              and at the others, and the spread over seeds
  minilm   attnkit sparse eval minilm: attention replaced with no fine-tuning, embedding cosine
  bench    python bench/bench_sparse.py: peak memory (fresh processes) and time (interleaved rounds)
  summary  results/summary.md: learned vs training-free at equal density, the smallest density meeting
           each fidelity target and the training-step memory reduction there
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "experiments" / "sparse" / "results"
LOGS = ROOT / "runs" / "sparse"
STAGES = ("train", "eval", "eval_extra", "gate_eval", "minilm", "bench", "summary")


def run(cmd: list[str], log: str) -> None:
    LOGS.mkdir(parents=True, exist_ok=True)
    print("$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TRANSFORMERS_VERBOSITY="error")
    with open(LOGS / log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if code:
        raise SystemExit(f"failed ({code}): see {LOGS / log}")


def attnkit(*args: str) -> list[str]:
    return [sys.executable, "-m", "attnkit.cli.main", *args]


def gates_dir(density: float, seed: int = 0) -> Path:
    return RESULTS / (f"gates_{density:g}" + (f"_seed{seed}" if seed else ""))


def trained(a) -> list[tuple[float, int]]:
    return [(d, s) for d in a.train_densities for s in a.seeds]


def stage_train(a) -> None:
    for d, seed in trained(a):
        out = gates_dir(d, seed)
        resume = ["--resume"] if out.exists() else []
        run(attnkit("sparse", "train", a.model, "--pattern", "learned_gate", "--density", f"{d:g}", "--block-size",
                    str(a.block_size), "--seq-len", str(a.seq_len), "--batch-size", str(a.batch_size), "--steps",
                    str(a.steps), "--lr", f"{a.lr:g}", "--map-loss", f"{a.map_loss:g}", "--gate-bias", f"{a.gate_bias:g}", "--gate-grad", a.gate_grad, "--gate-init", a.gate_init,
                    *(["--no-sinks"] if a.no_sinks else []), "--checkpoint-every", "50", "--seed", str(seed),
                    "--no-progress", "--out", str(out), *resume), f"{out.name}.log")


def stage_eval(a) -> None:
    run(attnkit("sparse", "eval", a.model, "--densities", _densities(a), "--seq-lens", str(a.seq_len), "--block-size",
                str(a.block_size), "--tokens", str(a.tokens), "--grad-windows", "1", *_gates(a),
                "--out", str(RESULTS / f"eval_{a.seq_len}")), "eval.log")
    if a.extra_lengths:
        stage_eval_extra(a)


def stage_eval_extra(a) -> None:
    run(attnkit("sparse", "eval", a.model, "--densities", _densities(a), "--seq-lens", a.extra_lengths,
                "--block-size", str(a.block_size), "--tokens", str(a.extra_tokens), "--grad-windows", "1", *_gates(a),
                "--out", str(RESULTS / a.extra_out)), f"{a.extra_out}.log")


def stage_gate_eval(a) -> None:
    for d, seed in trained(a):
        gates = gates_dir(d, seed)
        run(attnkit("sparse", "eval", a.model, "--patterns", "learned_gate", "--gates", str(gates),
                    "--densities", _densities(a), "--seq-lens", str(a.seq_len), "--block-size", str(a.block_size),
                    "--tokens", str(a.tokens), "--grad-windows", "1",
                    "--out", str(RESULTS / f"eval_{a.seq_len}_gates" / gates.name)), "gate_eval.log")


def _densities(a) -> str:
    return ",".join(f"{d:g}" for d in a.densities)


def _gates(a) -> list[str]:
    """--gates with the seed-0 gates of every trained density (eval picks the one nearest each density)."""
    dirs = [str(gates_dir(d)) for d in a.train_densities if (gates_dir(d) / "sparse_gates.safetensors").exists()]
    return ["--gates", ",".join(dirs)] if dirs else []


def stage_minilm(a) -> None:
    run(attnkit("sparse", "eval", "minilm", "--densities", "0.25,0.5,0.75", "--block-size", "32",
                "--sentences", str(a.sentences), "--max-length", "256", "--out", str(RESULTS / "minilm")), "minilm.log")


def stage_bench(a) -> None:
    run([sys.executable, "bench/bench_sparse.py", "--model", a.model, "--lengths", a.bench_lengths,
         "--densities", a.bench_densities or _densities(a), "--block-size", str(a.block_size),
         "--flex", a.flex,
         "--rounds", str(a.rounds), "--block", a.bench_name, "--json", str(RESULTS / f"{a.bench_name}.json")]
        + (["--no-write"] if a.quick else []), "bench.log")


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _pattern_table(rows: list[dict]) -> list[str]:
    lines = ["| density | pattern | measured density | KL (nats) | perplexity | × dense | top-1 agree | acc. ratio "
             "| prob MSE | dropped mass | grad cos (min) |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for d in sorted({r["density"] for r in rows}):
        for r in sorted((r for r in rows if r["density"] == d), key=lambda r: r["kl"]):
            lines.append(f"| {d:g} | {r['pattern']} | {r['measured_density']:.3f} | {r['kl']:.4f} | {r['perplexity']:.3f} "
                         f"| {r['perplexity_ratio']:.3f} | {r['top1_agreement']:.3f} | {r['top1_accuracy_ratio']:.3f} "
                         f"| {r['prob_mse']:.2e} | {r['prob_dropped_mass']:.3f} | {r.get('grad_cosine_min', float('nan')):.3f} |")
    return lines


def _best_free(rows: list[dict], density: float) -> tuple[dict, dict] | None:
    """(lowest-KL, lowest-perplexity) training-free rows at ``density``."""
    free = [r for r in rows if r["density"] == density and r["pattern"] != "learned_gate"]
    return (min(free, key=lambda r: r["kl"]), min(free, key=lambda r: r["perplexity"])) if free else None


def _learned_vs_free(rows: list[dict]) -> list[str]:
    lines = ["| density | learned KL | best training-free (KL) | learned ppl | best training-free (ppl) | learned wins both |",
             "|---:|---:|---|---:|---|---|"]
    for d in sorted({r["density"] for r in rows}):
        learned = next((r for r in rows if r["density"] == d and r["pattern"] == "learned_gate"), None)
        best = _best_free(rows, d)
        if learned is None or best is None:
            continue
        bk, bp = best
        wins = learned["kl"] < bk["kl"] and learned["perplexity"] < bp["perplexity"]
        lines.append(f"| {d:g} | {learned['kl']:.4f} | {bk['pattern']} ({bk['kl']:.4f}) | {learned['perplexity']:.3f} "
                     f"| {bp['pattern']} ({bp['perplexity']:.3f}) | {'yes' if wins else 'no'} |")
    return lines


def _memory_table(bench: dict) -> list[str]:
    lines = ["| tokens | configuration | train MiB | vs SDPA | vs eager | inference MiB | vs SDPA | vs eager | train s × SDPA |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for n, by_config in bench["memory"].items():
        sd, ea = by_config["dense-sdpa"], by_config["dense-eager"]
        for c, m in by_config.items():
            tr = (f"{m['train'] / 2**20:.1f} | {m['train'] / sd['train'] - 1:+.0%} | {m['train'] / ea['train'] - 1:+.0%}"
                  if m["train"] is not None else "— | — | —")
            rt = bench["timing"][n]["ratio"][c]["train"]
            lines.append(f"| {n} | {c} | {tr} | {m['inference'] / 2**20:.1f} "
                         f"| {m['inference'] / sd['inference'] - 1:+.0%} | {m['inference'] / ea['inference'] - 1:+.0%} "
                         f"| {'—' if rt is None else f'{rt:.2f}'} |")
    return lines


def _gate_runs(a, ev: dict) -> dict[str, list[dict]]:
    """{gate directory name: its learned_gate rows at a.seq_len}: gates_0.25 from the main eval (run with it
    alone), every other from its own gate_eval."""
    runs = {}
    if ev["plan"].get("gates") and len(ev["plan"]["gates"]) == 1:
        runs[Path(ev["plan"]["gates"][0]).name] = [r for r in ev["results"] if r["pattern"] == "learned_gate"]
    for path in sorted((RESULTS / f"eval_{a.seq_len}_gates").glob("*/eval.json")):
        runs[path.parent.name] = [r for r in json.loads(path.read_text())["results"] if r["pattern"] == "learned_gate"]
    return runs


def _gate_sections(a, ev: dict) -> list[str]:
    runs = _gate_runs(a, ev)
    if len(runs) < 2:
        return []
    rows, densities = ev["results"], sorted({r["density"] for r in ev["results"]})
    by_density = {name: rs for name, rs in runs.items() if "_seed" not in name}
    lines = ["", f"## Gates trained at different densities, each run at every density ({a.seq_len} tokens)", "",
             "KL (nats) / perplexity; the best training-free pattern at that density for comparison "
             "(same windows; the dense baseline is recomputed in each run and is the same).", "",
             "| gate trained at | " + " | ".join(f"{d:g}" for d in densities) + " |", "|---|" + "---:|" * len(densities)]
    for name, rs in sorted(by_density.items(), key=lambda kv: float(kv[0].split("_")[1])):
        at = {r["density"]: r for r in rs}
        lines.append(f"| {name.split('_')[1]} | " + " | ".join(
            f"{at[d]['kl']:.4f} / {at[d]['perplexity']:.2f}" if d in at else "—" for d in densities) + " |")
    lines.append("| best training-free | " + " | ".join(
        f"{b[0]['kl']:.4f} ({b[0]['pattern']}) / {b[1]['perplexity']:.2f} ({b[1]['pattern']})"
        for b in (_best_free(rows, d) for d in densities)) + " |")
    seeds = {name: rs for name, rs in runs.items() if name == "gates_0.25" or name.startswith("gates_0.25_seed")}
    if len(seeds) >= 2:
        lines += ["", f"## The 0.25 gate over {len(seeds)} training seeds ({', '.join(sorted(seeds))})", "",
                  "Margin = learned − best training-free (negative: the gate is better); mean [min, max] over seeds.", "",
                  "| density | learned KL | KL margin vs best free (KL) | learned ppl | ppl margin vs best free (ppl) "
                  "| seeds better on both |", "|---:|---|---|---|---|---:|"]
        for d in densities:
            bk, bp = _best_free(rows, d)
            at = [r for rs in seeds.values() for r in rs if r["density"] == d]
            if len(at) < len(seeds):
                continue  # not every seed was run at d
            kl = [r["kl"] for r in at]
            ppl = [r["perplexity"] for r in at]
            dk = [x - bk["kl"] for x in kl]
            dp = [x - bp["perplexity"] for x in ppl]
            both = sum(x < 0 and y < 0 for x, y in zip(dk, dp))
            lines.append(f"| {d:g} | {_spread(kl, 4, False)} | {_spread(dk, 4)} ({bk['pattern']} {bk['kl']:.4f}) "
                         f"| {_spread(ppl, 3, False)} | {_spread(dp, 3)} ({bp['pattern']} {bp['perplexity']:.3f}) "
                         f"| {both}/{len(at)} |")
    return lines


def _spread(xs: list[float], digits: int, signed: bool = True) -> str:
    """mean [min, max]."""
    f = f"{'+' if signed else ''}.{digits}f"
    return f"{sum(xs) / len(xs):{f}} [{min(xs):{f}}, {max(xs):{f}}]"


def _targets_table(ev: dict, seq_len: int) -> list[str]:
    """The smallest density measured at which each target holds (there and at every larger one), per pattern."""
    lines = ["| pattern | " + " | ".join(ev["targets_defined"].values()) + " |",
             "|---|" + "---:|" * len(ev["targets_defined"])]
    for pattern, by_target in ev["smallest_density"][str(seq_len)].items():
        cells = [f"{by_target[t]:g}" if by_target[t] is not None else "not met" for t in ev["targets_defined"]]
        lines.append(f"| {pattern} | " + " | ".join(cells) + " |")
    return lines


def _memory_at_targets(a, ev: dict, benches: list[dict]) -> list[str]:
    """The training-step peak at the smallest density meeting each target (learned gate), from whichever
    benchmark measured that density."""
    smallest = ev["smallest_density"][str(a.seq_len)].get("learned_gate")
    if not smallest or not benches:
        return []
    lines = ["", "## Training-step peak memory at the smallest density meeting each target (learned gate)", "",
             "| target | density | tokens | train MiB | vs dense SDPA | vs dense eager | benchmark |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for key, label in ev["targets_defined"].items():
        d = smallest[key]
        if d is None:
            lines.append(f"| {label} | not met | | | | | |")
            continue
        for bench, name in benches:
            for n, by_config in bench["memory"].items():
                m = by_config.get(f"learned_gate@{d:g}")
                if n not in (str(a.seq_len), "4096") or m is None or m["train"] is None:
                    continue
                sd, ea = by_config["dense-sdpa"]["train"], by_config["dense-eager"]["train"]
                lines.append(f"| {label} | {d:g} | {n} | {m['train'] / 2**20:.1f} | {m['train'] / sd - 1:+.0%} "
                             f"| {m['train'] / ea - 1:+.0%} | {name} |")
    return lines


def stage_summary(a) -> None:
    ev = json.loads((RESULTS / f"eval_{a.seq_len}" / "eval.json").read_text())
    benches = [(b, name) for name in ("bench_sparse", "bench_sparse_d075")
               if (b := _load(RESULTS / f"{name}.json")) is not None]
    base = ev["baselines"][0]
    rows = ev["results"]
    lines = [f"# Sparse attention on `{a.model}` ({a.seq_len} tokens, block {a.block_size})", "",
             "Written by `python experiments/sparse/run.py --stages summary` from the JSON in this folder.", "",
             f"Dense: perplexity {base['perplexity']:.3f}, top-1 accuracy {base['top1_accuracy']:.4f} on "
             f"{base['tokens']:,} held-out KJV test tokens ({base['windows']} windows).", "",
             "## Every pattern at equal density", "", *_pattern_table(rows),
             "", "## Learned gate vs the best training-free pattern at each density", "", *_learned_vs_free(rows),
             "", "## Smallest density meeting each fidelity target", "", *_targets_table(ev, a.seq_len)]
    lines += _memory_at_targets(a, ev, benches)
    lines += _gate_sections(a, ev)
    for folder in ("eval_lengths", "eval_4096"):
        other = _load(RESULTS / folder / "eval.json")
        if other is None:
            continue
        for b in other["baselines"]:
            at = [r for r in other["results"] if r["seq_len"] == b["seq_len"]]
            gates = ", ".join(Path(g).name for g in other["plan"].get("gates") or [])
            lines += ["", f"## {b['seq_len']} tokens (`{folder}/`)", "",
                      *(["**Not reproducible after its 10th configuration** (from `moba` at 0.5 on): see the "
                         "per-pattern rerun below and the README.", ""] if folder == "eval_4096" else []),
                      f"Dense: perplexity {b['perplexity']:.3f}, top-1 accuracy {b['top1_accuracy']:.4f} on "
                      f"{b['tokens']:,} KJV test tokens ({b['windows']} window{'s' if b['windows'] > 1 else ''}); "
                      f"learned gate: {gates or '—'}.", "",
                      *_learned_vs_free(at), "", *_targets_table(other, b["seq_len"]), "", *_pattern_table(at)]
    fresh = sorted((RESULTS / "eval_4096_fresh").glob("*/eval.json"))
    if fresh:
        docs = [json.loads(f.read_text()) for f in fresh]
        b = docs[0]["baselines"][0]
        at = [r for d in docs for r in d["results"]]
        merged = {"targets_defined": docs[0]["targets_defined"],
                  "smallest_density": {str(b["seq_len"]): {k: v for d in docs
                                                           for k, v in d["smallest_density"][str(b["seq_len"])].items()}}}
        lines += ["", f"## {b['seq_len']} tokens, one fresh process per pattern (`eval_4096_fresh/`)", "",
                  "The same windows and settings as the one-process run above (`eval_4096/`), each pattern in its "
                  "own process: equal to it. (A first one-process run was corrupted by the model file being "
                  "overwritten in place while it ran: README, issue 14.)", "",
                  f"Dense: perplexity {b['perplexity']:.3f}, top-1 accuracy {b['top1_accuracy']:.4f} on "
                  f"{b['tokens']:,} KJV test tokens ({b['windows']} window{'s' if b['windows'] > 1 else ''}); "
                  f"patterns: {', '.join(f.parent.name for f in fresh)}.", "",
                  *_learned_vs_free(at), "", *_targets_table(merged, b["seq_len"]), "", *_pattern_table(at)]
    for bench, name in benches:
        lines += ["", f"## Peak memory of a training step (forward + backward) and of inference (`{name}.json`)", "",
                  f"Model `{bench['args']['model']}`; load average {bench['load'][0]:.1f} → {bench['load'][1]:.1f}.", "",
                  *_memory_table(bench)]
    out = RESULTS / "summary.md"
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--model", default="reference-long")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--block-size", type=int, default=64)
    p.add_argument("--train-densities", default="0.25", help="densities the learned gate is distilled at")
    p.add_argument("--densities", default="0.125,0.25,0.5,0.75", help="densities every pattern is evaluated at")
    p.add_argument("--seeds", default="0", help="training seeds of each density (seed 0: gates_D/, else gates_D_seedS/)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--map-loss", type=float, default=1.0)
    p.add_argument("--gate-bias", type=float, default=1.0, help="0: the gate only selects (SeerAttention)")
    p.add_argument("--gate-grad", default="straight_through", choices=["prior", "straight_through"])
    p.add_argument("--gate-init", default="moba", choices=["uniform", "moba"])
    p.add_argument("--no-sinks", action="store_true", help="the learned gate without forced sink blocks")
    p.add_argument("--tokens", type=int, default=8192)
    p.add_argument("--extra-lengths", default="512,2048")
    p.add_argument("--extra-tokens", type=int, default=4096)
    p.add_argument("--extra-out", default="eval_lengths", help="results/ folder of the extra lengths' eval")
    p.add_argument("--sentences", type=int, default=64)
    p.add_argument("--bench-lengths", default="512,1024,2048,4096")
    p.add_argument("--bench-densities", default=None, help="the bench's densities (default: --densities)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--bench-name", default="bench_sparse",
                   help="BENCHMARKS.md block and results/NAME.json the bench stage writes")
    p.add_argument("--flex", default="moba@0.25", help="configurations also run by compiled FlexAttention (inference)")
    p.add_argument("--quick", action="store_true", help="a smoke run: no BENCHMARKS.md write")
    a = p.parse_args()
    a.train_densities = [float(x) for x in a.train_densities.split(",")]
    a.densities = [float(x) for x in a.densities.split(",")]
    a.seeds = [int(x) for x in a.seeds.split(",")]
    for stage in a.stages.split(","):
        if stage not in STAGES:
            raise SystemExit(f"unknown stage {stage!r} (stages: {', '.join(STAGES)})")
        print(f"== {stage}", flush=True)
        globals()[f"stage_{stage}"](a)


if __name__ == "__main__":
    main()
