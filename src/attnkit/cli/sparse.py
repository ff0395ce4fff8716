"""``attnkit sparse train`` and ``attnkit sparse eval``: distil a learned sparse attention, measure its fidelity.

    attnkit sparse train MODEL --pattern learned_gate --density 0.25 --block-size 64 --seq-len 1024 \\
        --steps 300 --out DIR [--resume] [--map-loss W] [--train-projections]
    torchrun --nproc_per_node 2 -m attnkit.cli.main sparse train ...      # DDP, gloo on the CPU
    attnkit sparse eval MODEL --patterns window,moba,quest,learned_gate --densities 0.125,0.25,0.5 \\
        --seq-lens 512,1024 --gates DIR --out DIR

``train`` writes DIR (gates, summary, checkpoints: ``attnkit.sparse.distill``); ``eval`` writes
DIR/eval.json and a density-curve figure per length (``attnkit.sparse.evaluate``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


# the built-in patterns, for --help without importing torch (tests/test_cli_help.py checks the registry agrees)
PATTERN_NAMES = ("window", "sinks_window", "moba", "quest", "learned_gate")

def add_parser(sub) -> None:
    from attnkit.cli.common import add_model_argument

    p = sub.add_parser("sparse", help="block-sparse attention: distil a learned gate, evaluate patterns against dense",
                       description="Block-sparse attention for a pretrained model: `train` distils a learned gate "
                       "from the dense model, `eval` measures every pattern's fidelity against dense attention.",
                       epilog="examples:\n  attnkit sparse eval reference --densities 0.25,0.5 --out sparse_eval/\n"
                       "  attnkit sparse train reference --density 0.25 --steps 200 --out gates/")
    inner = p.add_subparsers(dest="sparse_command", metavar="{train,eval}")
    p.set_defaults(run=_missing_subcommand)

    t = inner.add_parser("train", help="distil sparse attention from the frozen dense model (KL on next-token "
                         "distributions, optionally + SeerAttention's pooled-map loss)",
                         description="Distil a sparse pattern (by default a learned gate) from the frozen dense model: "
                         "KL between the dense and the sparse model's next-token distributions, optionally plus "
                         "SeerAttention's pooled-map loss. Runs under torchrun as well.",
                         epilog="example:\n  attnkit sparse train reference --density 0.25 --steps 200 --out gates/")
    add_model_argument(t)
    _add_sparse_options(t, pattern_default="learned_gate")
    t.add_argument("--density", type=float, default=0.25, help="share of causal key blocks each query block keeps")
    t.add_argument("--seq-len", type=int, default=1024, help="tokens per training window")
    t.add_argument("--batch-size", type=int, default=2, help="windows per step (the global batch under torchrun)")
    t.add_argument("--steps", type=int, required=True, help="optimizer steps")
    t.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW)")
    t.add_argument("--warmup-steps", type=int, help="linear warmup steps (default: 10%% of --steps, at most 100)")
    t.add_argument("--min-lr-ratio", type=float, default=0.1, help="the cosine ends at this share of --lr")
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    t.add_argument("--map-loss", type=float, default=0.0, metavar="W",
                   help="weight of the gate's KL to the dense model's block-max-pooled attention map (SeerAttention)")
    t.add_argument("--map-target", choices=["max", "mass"], default="max",
                   help="how the dense map is pooled into blocks for --map-loss: max (SeerAttention's) or mass (the "
                   "attention a query block puts on a key block: what dropping it costs)")
    t.add_argument("--train-projections", action="store_true",
                   help="also train the attention modules' projections (of a copy; saved beside the gates)")
    t.add_argument("--out", required=True, metavar="DIR", help="directory for the gates, summary and checkpoints")
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint in DIR")
    t.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints (0: only at the end)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--corpus", default="kjv", help="training text: built-in name or local file/folder (train split)")
    t.add_argument("--gate-dim", type=int, default=32, help="width of the gate's query/key projections")
    t.add_argument("--gate-bias", type=float, default=1.0,
                   help="weight of the gate's log-probability added to its kept blocks' scores: the path by which the "
                   "next-token KL reaches the gate (0: the gate only selects, as in SeerAttention; train it with "
                   "--map-loss)")
    t.add_argument("--gate-grad", choices=["prior", "straight_through"], default="prior",
                   help="prior: the gate's log-probability stays in the kept blocks' scores (it reweights them); "
                   "straight_through: only its gradient is kept, the output is plain attention over the kept blocks")
    t.add_argument("--no-sinks", action="store_true",
                   help="do not force the first key block(s) into every selection (learned_gate forces them by default)")
    t.add_argument("--gate-init", choices=["uniform", "moba"], default="uniform",
                   help="uniform: the gate starts keeping what sinks_window keeps; moba: it starts scoring blocks as "
                   "moba does (needs --gate-dim = the head dimension)")
    t.add_argument("--layer-budget", action="store_true",
                   help="after training, move the density between layers (the same kept share in total), calibrated "
                   "on windows of the training text; the gates are written with these layer shares")
    t.add_argument("--calibration-windows", type=int, default=4, metavar="N",
                   help="--layer-budget: windows of --seq-len tokens the shares are calibrated on")
    t.add_argument("--no-progress", action="store_true", help="no progress bar (a line every 50 steps on stderr)")
    t.set_defaults(run=run_train)

    e = inner.add_parser("eval", help="fidelity of sparse patterns against dense attention (JSON + figures)",
                         description="Run each sparse pattern at each density beside dense attention and measure "
                         "how close it stays: KL, perplexity, top-1 agreement, probability MSE and gradient cosine "
                         "(causal LMs), embedding cosine (encoders). Writes eval.json and density curves.",
                         epilog="example:\n  attnkit sparse eval reference --patterns window,moba --densities 0.25,0.5 "
                         "--out sparse_eval/")
    add_model_argument(e)
    _add_sparse_options(e)
    e.add_argument("--patterns", default=None,
                   help="comma-separated patterns (default: every training-free one, plus learned_gate with --gates)")
    e.add_argument("--densities", default="0.125,0.25,0.5", help="comma-separated densities in (0, 1]")
    e.add_argument("--seq-lens", default="1024", help="comma-separated window lengths (causal LMs)")
    e.add_argument("--tokens", type=int, default=8192, help="held-out tokens per length (windows from the split's start)")
    e.add_argument("--grad-windows", type=int, default=1, help="windows the gradient cosine is taken on (0: skip)")
    e.add_argument("--gates", default=None, metavar="DIR[,DIR]",
                   help="directories attnkit sparse train wrote: their gates run as learned_gate")
    e.add_argument("--corpus", default="kjv", help="held-out text: built-in name or local file/folder (test split)")
    e.add_argument("--split", default="test")
    e.add_argument("--sentences", type=int, default=32, help="encoders: held-out passages embedded")
    e.add_argument("--max-length", type=int, default=256, help="encoders: tokens per passage at most")
    e.add_argument("--speed-rounds", type=int, default=3, metavar="N",
                   help="time and peak memory of a forward of each pattern and density against dense on this machine, "
                   "N interleaved rounds on one window per length (encoders: one batch of passages) (0: skip)")
    e.add_argument("--layer-budget", action="store_true",
                   help="also run each pattern and density with its density moved between layers: the layers' shares "
                   "calibrated on text of --calibration-split, the same kept share in total (causal LMs)")
    e.add_argument("--calibration-windows", type=int, default=4, metavar="N",
                   help="--layer-budget: random windows of each length the shares are calibrated on")
    e.add_argument("--calibration-split", default="train", help="--layer-budget: the split calibrated on")
    e.add_argument("--out", required=True, metavar="DIR", help="directory for eval.json and the figures")
    e.set_defaults(run=run_eval)
    for parser in (t, e):
        parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                            help="show the full traceback of an unexpected error")


def _add_sparse_options(p: argparse.ArgumentParser, pattern_default: str | None = None) -> None:
    if pattern_default is not None:
        p.add_argument("--pattern", default=pattern_default,
                       help=f"sparse pattern: {', '.join(PATTERN_NAMES)}, or one registered in attnkit.sparse.PATTERNS")
    p.add_argument("--block-size", type=int, default=64, help="tokens per query/key block")


def _missing_subcommand(args: argparse.Namespace) -> int:
    from attnkit.errors import UserError

    raise UserError("attnkit sparse needs a subcommand: train or eval (see attnkit sparse --help)")


def _check_out_dir(path: str, resume: bool = False, reuse: bool = False) -> Path:
    """A directory that can be created or written: new, empty, or (``resume`` / ``reuse``) one of ours."""
    from attnkit.errors import UserError

    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {path} is a file; give a directory")
    if out.is_dir():
        if not os.access(out, os.W_OK):
            raise UserError(f"--out {path} cannot be written (permission denied)")
        if any(out.iterdir()) and not (resume or reuse):
            raise UserError(f"--out {path} exists and is not empty; pass --resume to continue its run, "
                            f"or give a new directory")
        return out
    ancestor = out.resolve().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"--out {path} cannot be created: {ancestor} is a file")
    if not os.access(ancestor, os.W_OK):
        raise UserError(f"--out {path} cannot be created: {ancestor} is not writable")
    return out


def _floats(spec: str, what: str) -> list[float]:
    from attnkit.errors import UserError

    try:
        values = [float(x) for x in spec.split(",") if x.strip()]
    except ValueError as e:
        raise UserError(f"cannot read {what} '{spec}': use numbers like 0.125,0.25,0.5") from e
    if not values:
        raise UserError(f"cannot read {what} '{spec}': give at least one number")
    return values


def _load(args: argparse.Namespace):
    from attnkit.cli.common import load_options, offline_by_default
    from attnkit.common.loading.registry import load_model

    offline_by_default()
    return load_model(args.model, trust_remote_code=args.trust_remote_code,
                      **load_options(args))


def run_train(args: argparse.Namespace) -> int:
    import torch
    from rich.console import Console

    from attnkit.cli.common import check_positive
    from attnkit.errors import UserError
    from attnkit.sparse import SparseConfig
    from attnkit.sparse.distill import DistillSettings, distill
    from attnkit.common.training import TrainConfig

    for value, option in ((args.steps, "--steps"), (args.seq_len, "--seq-len"), (args.batch_size, "--batch-size"),
                          (args.block_size, "--block-size"), (args.gate_dim, "--gate-dim")):
        check_positive(value, option)
    check_positive(args.checkpoint_every, "--checkpoint-every", 0)
    check_positive(args.warmup_steps, "--warmup-steps", 0)
    check_positive(args.calibration_windows, "--calibration-windows")
    if args.grad_clip < 0:
        raise UserError(f"--grad-clip must be >= 0 (0: off), got {args.grad_clip}")
    out = _check_out_dir(args.out, resume=args.resume)
    cfg = SparseConfig(pattern=args.pattern, density=args.density, block_size=args.block_size, gate_dim=args.gate_dim,
                       gate_bias=args.gate_bias, gate_grad=args.gate_grad, sinks=False if args.no_sinks else None)
    if cfg.gate_bias == 0 and args.map_loss == 0 and not args.train_projections:
        raise UserError("with --gate-bias 0 the next-token KL does not reach the gate: give --map-loss W > 0")
    settings = DistillSettings(seq_len=args.seq_len, batch_size=args.batch_size, map_weight=args.map_loss,
                               train_projections=args.train_projections, corpus=args.corpus, gate_init=args.gate_init,
                               map_target=args.map_target)
    warmup = args.warmup_steps if args.warmup_steps is not None else min(100, args.steps // 10)
    train_cfg = TrainConfig(steps=args.steps, lr=args.lr, weight_decay=args.weight_decay, warmup_steps=warmup,
                            min_lr_ratio=args.min_lr_ratio, grad_clip=args.grad_clip or None, seed=args.seed,
                            checkpoint_dir=out / "checkpoints", checkpoint_every=args.checkpoint_every,
                            resume=args.resume, progress=not args.no_progress,
                            description=f"distilling {args.pattern} at {args.density:g}",
                            meta={"model": args.model})
    loaded = _load(args)
    if loaded.kind != "causal-lm":
        raise UserError(f"{args.model} is not a causal language model: distillation matches next-token "
                        f"distributions (an encoder's attention is replaced with no fine-tuning: attnkit sparse eval)")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    result = distill(loaded.model, loaded.tokenizer, cfg, settings, train_cfg, out,
                     calibration_windows=args.calibration_windows if args.layer_budget else 0)
    if result.env.is_main:
        last = result.history[-10:]
        kl = sum(h["kl"] for h in last) / max(1, len(last))
        start = f" (resumed from step {result.resumed_from})" if result.resumed_from is not None else ""
        budget = ""
        if args.layer_budget:
            import json

            from attnkit.sparse.distill import SUMMARY_FILE

            shares = json.loads((out / SUMMARY_FILE).read_text())["calibration"]["shares"]
            budget = f", layer shares {', '.join(f'{x:g}' for x in shares)}"
        Console().print(f"distilled {cfg.pattern} at density {cfg.density:g} on {args.model}: {result.steps} steps"
                        f"{start}, KL over the last {len(last)} steps {kl:.4g} nats{budget}; gates and summary in {out}",
                        highlight=False, markup=False, soft_wrap=True)
    if result.env.initialized_here:
        from attnkit.common.training.distributed import leave_group

        leave_group()
    return 0


def run_eval(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console

    from attnkit.cli.common import check_positive, parse_int_list
    from attnkit.errors import UserError
    from attnkit.common.io import write_json
    from attnkit.common.progress import step_progress
    from attnkit.sparse.plots import save_density_curves
    from attnkit.sparse import PATTERNS, SparseConfig
    from attnkit.sparse.evaluate import EvalPlan, run_eval as evaluate

    for value, option in ((args.block_size, "--block-size"), (args.tokens, "--tokens"),
                          (args.sentences, "--sentences"), (args.max_length, "--max-length")):
        check_positive(value, option)
    check_positive(args.grad_windows, "--grad-windows", 0)
    check_positive(args.speed_rounds, "--speed-rounds", 0)
    check_positive(args.calibration_windows, "--calibration-windows")
    densities = _floats(args.densities, "--densities")
    for d in densities:
        SparseConfig(density=d)  # (0, 1]: the config's own check
    seq_lens = parse_int_list(args.seq_lens, "--seq-lens")
    if any(n < 2 for n in seq_lens):
        raise UserError("--seq-lens must be at least 2 tokens each")
    gates = [g for g in (args.gates or "").split(",") if g.strip()]
    for g in gates:
        if not Path(g).is_dir():
            raise UserError(f"--gates {g} is not a directory")
    patterns = [p.strip() for p in args.patterns.split(",") if p.strip()] if args.patterns else \
        [p for p, pat in PATTERNS.items() if not pat.learned] + (["learned_gate"] if gates else [])
    unknown = [p for p in patterns if p not in PATTERNS]
    if unknown:
        raise UserError(f"unknown sparse pattern '{unknown[0]}' (known: {', '.join(PATTERNS)})")
    out = _check_out_dir(args.out, reuse=True)
    plan = EvalPlan(patterns=patterns, densities=densities, seq_lens=seq_lens, block_size=args.block_size,
                    tokens=args.tokens, grad_windows=args.grad_windows, corpus=args.corpus, split=args.split,
                    gates=gates, sentences=args.sentences, max_length=args.max_length, speed_rounds=args.speed_rounds,
                    layer_budget=args.layer_budget, calibration_windows=args.calibration_windows,
                    calibration_split=args.calibration_split)
    loaded = _load(args)
    if args.layer_budget and loaded.kind != "causal-lm":
        raise UserError(f"--layer-budget calibrates on next-token KL: {args.model} is not a causal language model")
    with step_progress("sparse eval") as update:
        doc = evaluate(loaded.model, loaded.tokenizer, loaded.kind, plan, update)
    doc["model"] = args.model
    out.mkdir(parents=True, exist_ok=True)
    write_json(doc, str(out / "eval.json"))
    console = Console()
    if loaded.kind == "encoder":
        for r in doc["embedding"]:
            cost = (f"  time ×{r['cost']['time_ratio']:.2f} memory ×{r['cost']['memory_ratio']:.2f} (against dense)"
                    if "cost" in r else "")
            console.print(f"{r['pattern']:>13} density {r['density']:<6g} embedding cosine mean "
                          f"{r['embedding_cosine_mean']:.4f} min {r['embedding_cosine_min']:.4f}" + cost,
                          highlight=False, markup=False, soft_wrap=True)
        console.print(f"written: {out / 'eval.json'}", highlight=False, markup=False)
        return 0
    for n in seq_lens:
        save_density_curves(doc["results"], n, str(out / f"density_curves_{n}.png"), f"{args.model}, {n} tokens")
    if not console.is_terminal:  # a pipe or a file: wide enough for the whole table
        console.width = max(console.width, 150)
    console.print(_results_table(doc))
    console.print("smallest density meeting each target: " + json.dumps(doc["smallest_density"]),
                  highlight=False, markup=False, soft_wrap=True)
    console.print(f"written: {out / 'eval.json'} and {len(seq_lens)} figure(s) density_curves_N.png in {out}",
                  highlight=False, markup=False, soft_wrap=True)
    return 0


def _results_table(doc: dict):
    """One table of quality and cost: a row per length, pattern and density."""
    from rich.table import Table

    results = doc["results"]
    grads = any("grad_cosine_min" in r for r in results)
    costs = any("cost" in r for r in results)
    title = "sparse against dense attention (quality; cost on this machine: × dense, one forward)" if costs else \
        "sparse against dense attention (quality)"
    table = Table(title=title, title_justify="left")
    for name in ("tokens", "pattern", "density", "KL", "ppl (dense)", "top-1 agree", "prob MSE",
                 *(["grad cos"] if grads else []), *(["time ×", "memory ×"] if costs else [])):
        table.add_column(name, justify="left" if name == "pattern" else "right")
    base = {b["seq_len"]: b for b in doc["baselines"]}
    for r in results:
        row = [str(r["seq_len"]), r["series"], f"{r['density']:g}", f"{r['kl']:.3e}",
               f"{r['perplexity']:.3f} ({base[r['seq_len']]['perplexity']:.3f})", f"{r['top1_agreement']:.3f}",
               f"{r['prob_mse']:.2e}"]
        if grads:
            row.append(f"{r['grad_cosine_min']:.3f}" if "grad_cosine_min" in r else "")
        if costs:
            c = r.get("cost")
            row += [f"{c['time_ratio']:.2f}", f"{c['memory_ratio']:.2f}"] if c else ["", ""]
        table.add_row(*row)
    return table
