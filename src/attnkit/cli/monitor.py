"""``attnkit monitor``: figures and a summary of a run written by ``AttentionMonitor``.

    attnkit monitor report RUN_DIR [--out DIR] [--json PATH|-]
    attnkit monitor trace [MODEL] [--text T | --text-file F]     # where NaN/Inf first appear
"""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.text import Text


def add_parser(sub) -> None:
    p = sub.add_parser("monitor", help="reports of a monitored training run",
                       description="Reports of a training run watched by attnkit.monitor.AttentionMonitor.",
                       epilog="examples:\n  attnkit monitor report runs/exp1 --out figures/\n"
                       "  attnkit monitor trace ./checkpoint --text \"a sentence that made the loss NaN\"")
    actions = p.add_subparsers(dest="monitor_command", metavar="ACTION")
    r = actions.add_parser("report", help="figures and a summary from a run's monitor.jsonl",
                           description="Per-layer panel (each head's max |logit| and entropy over steps), per-head "
                           "entropy heatmap, max logit and curvature, with warning and intervention steps marked "
                           "(PNG), and a summary, from RUN_DIR/monitor.jsonl (a finished or running job).",
                           epilog="example:\n  attnkit monitor report runs/exp1 --out figures/")
    r.add_argument("run_dir", metavar="RUN_DIR", help="the monitor's log_dir (holding monitor.jsonl)")
    r.add_argument("--out", metavar="DIR", help="where the PNGs go (default: RUN_DIR)")
    r.add_argument("--json", metavar="PATH", help="write the summary as JSON to PATH, or - for stdout")
    r.set_defaults(run=run_report)
    from attnkit.cli.common import add_model_argument

    t = actions.add_parser("trace", help="name the first layer and head where NaN/Inf appear on some text",
                           description="Run a (saved) model on text through the seam and name the first layer and "
                           "head whose logits or query/key/value are non-finite, and any non-finite parameters. "
                           "Exit 1 when something is non-finite.",
                           epilog="example:\n  attnkit monitor trace ./checkpoint --text-file batch.txt")
    add_model_argument(t)
    t.add_argument("--text", help="text to run (default: a built-in English passage)")
    t.add_argument("--text-file", metavar="FILE", help="file with the text to run")
    t.set_defaults(run=run_trace)
    p.set_defaults(run=_need_action)


def _need_action(args: argparse.Namespace) -> int:
    from attnkit.errors import UserError

    raise UserError("attnkit monitor needs an action: report RUN_DIR, or trace MODEL")


def run_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from attnkit.cli.common import check_outputs
    from attnkit.errors import UserError
    from attnkit.monitor.report import read_run, render_summary, save_figures, summary

    check_outputs(json=args.json)
    run = read_run(args.run_dir)
    out = Path(args.out) if args.out else run.path
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory")
    paths = save_figures(run, out)
    # paths and messages stay whole lines (and grep-able); on stderr when stdout carries the JSON
    render_summary(run, paths, Console(soft_wrap=True, stderr=args.json == "-"))
    if args.json:
        from attnkit.common.io import write_json

        write_json(summary(run, paths), args.json)
    return 0


def run_trace(args: argparse.Namespace) -> int:
    from attnkit.common.default_text import DEFAULT_TEXT
    from attnkit.common.tokenize import max_positions, tokenize
    from attnkit.cli.common import load_options, read_text
    from attnkit.errors import UserError
    from attnkit.common.loading.device import model_device
    from attnkit.common.loading.registry import load_model
    from attnkit.monitor.nonfinite import trace_nonfinite

    text = read_text(args.text, args.text_file)
    loaded = load_model(args.model, trust_remote_code=args.trust_remote_code,
                        **load_options(args))
    if loaded.tokenizer is None:
        raise UserError(f"{args.model} has no tokenizer to turn text into tokens")
    inputs = tokenize(loaded.tokenizer, text if text is not None else DEFAULT_TEXT, None,
                      max_positions(loaded.model), truncate_silently=text is None, device=model_device(loaded.model))
    result = trace_nonfinite(loaded.model, (), dict(inputs))
    bad = result.site is not None or not result.output_finite or bool(result.nonfinite_params)
    Console(soft_wrap=True).print(Text(result.message, style="bold red" if bad else "green"))
    return 1 if bad else 0
