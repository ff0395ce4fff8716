"""``attnkit check``: will attention stay numerically safe? From the config, before spending compute."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.markup import escape

from attnkit.cli.common import check_outputs

DTYPE_CHOICES = ("fp16", "bf16", "fp32")


def add_parser(sub) -> None:
    p = sub.add_parser("check", help="predict from a config whether attention stays numerically safe",
                       description="From a config alone (and a model's own W_q/W_k with --measure): the expected and "
                       "high-quantile attention-logit maximum, where fp16 overflows and bf16/fp16 rounding distorts "
                       "attention weights beyond 10 %, the curvature bound of the softmax, recommendations with the numbers "
                       "that triggered them, and stability regions over temperature, head dimension, sequence length "
                       "and weight growth.",
                       epilog="examples:\n  attnkit check reference --dtype fp16 --seq-len 4096\n"
                       "  attnkit check ./config.json --weight-growth 2 --json -")
    p.add_argument("model", metavar="MODEL_OR_CONFIG",
                   help="an HF config.json, a model directory, a built-in name (reference, minilm), or a hub id")
    p.add_argument("--seq-len", type=int, metavar="N", help="sequence length (default: the config's maximum positions)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="bf16", help="dtype you plan to train in")
    p.add_argument("--temperature", type=float, default=1.0, metavar="T", help="logits divided by T")
    p.add_argument("--weight-growth", type=float, default=1.0, metavar="X",
                   help="W_q and W_k grown by X each (logits x X^2), as in training")
    p.add_argument("--measure", action="store_true",
                   help="also run one forward through the seam and judge its real logits beside the estimate")
    data = p.add_argument_group("--measure over a dataset")
    data.add_argument("--dataset", metavar="SRC", help="measure on this dataset instead of the KJV text: a .txt file (one "
                      "text a line), .jsonl, .parquet, a folder of them, or a Hugging Face dataset NAME[:CONFIG]")
    data.add_argument("--split", metavar="S", help="the split of a hub dataset (default train), or the files of a "
                      "folder whose names contain S")
    data.add_argument("--text-field", metavar="F", default="text", help="the field or column holding the text (default: text)")
    data.add_argument("--samples", type=int, metavar="N", default=8,
                      help="blocks of --seq-len tokens measured (default 8); the figures are their extremes")
    data.add_argument("--batch-size", type=int, metavar="B", default=8, help="blocks a forward (default 8)")
    data.add_argument("--device", default="cpu", metavar="auto|cpu|cuda[:N]|mps",
                      help="where --measure runs the model (in float32; --dtype is the format judged); auto: CUDA if "
                      "present, else MPS, else the CPU (default: cpu)")
    p.add_argument("--from-config", action="store_true",
                   help="judge the config alone, as for a fresh initialisation, even when MODEL has trained weights "
                        "(by default a model's own W_q/W_k are read)")
    p.add_argument("--json", metavar="PATH", help="write the JSON report to PATH, or - for stdout")
    p.add_argument("--plot", metavar="PNG", help="write the stability-region figure to this PNG")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from attnkit.errors import UserError

    if args.from_config and args.measure:
        raise UserError("--from-config and --measure contradict each other: --measure runs the trained weights")
    if args.seq_len is not None and args.seq_len < 2:
        raise UserError(f"--seq-len must be at least 2 tokens, got {args.seq_len}")
    for value, option in ((args.temperature, "--temperature"), (args.weight_growth, "--weight-growth")):
        if not value > 0 or value == float("inf"):
            raise UserError(f"{option} must be a positive number, got {value:g}")
    from attnkit.cli.common import check_positive

    if args.dataset is not None and not args.measure:
        raise UserError("--dataset is for --measure: the estimate itself reads no text")
    if args.device != "cpu" and not args.measure:
        raise UserError("--device is for --measure: the estimate itself runs no model")
    check_positive(args.samples, "--samples")
    check_positive(args.batch_size, "--batch-size")
    from attnkit.common.distributed import command_group, launched_world_size
    from attnkit.common.loading.device import resolve_device

    if launched_world_size() > 1 and not args.measure:
        raise UserError("under torchrun the processes share --measure's blocks; the estimate alone runs in one process")
    # Every rank checks the same flags above and fails alike before the group forms.
    with command_group(resolve_device(args.device)) as env:
        return _run(args, env)


def _run(args: argparse.Namespace, env) -> int:
    from attnkit.check import check
    from attnkit.check.render import render_check, save_regions_png
    from attnkit.common.distributed import agree
    from attnkit.common.progress import stderr_status

    def prepare() -> list[str] | None:
        if env.is_main:  # rank 0 writes the report
            check_outputs(json=args.json, plot=args.plot)
        if args.dataset is None:
            return None
        from attnkit.common.data.texts import load_texts

        with stderr_status(f"reading {args.dataset}", enabled=env.is_main):
            return load_texts(args.dataset, split=args.split, text_field=args.text_field)

    texts = agree(env, prepare)
    with stderr_status(f"checking {args.model}", enabled=env.is_main):
        report = check(args.model, seq_len=args.seq_len, dtype=args.dtype, temperature=args.temperature,
                       weight_growth=args.weight_growth, measure_pass=args.measure,
                       use_weights=False if args.from_config else None, measure_texts=texts,
                       measure_source=args.dataset, measure_samples=args.samples, measure_batch_size=args.batch_size,
                       measure_device=args.device, env=env)
    if not env.is_main:  # one report, on rank 0
        return 0
    console = Console(stderr=args.json == "-")
    render_check(report, console)
    if args.json:
        from attnkit.common.io import write_json

        write_json(report.to_json(), args.json)
    if args.plot:
        save_regions_png(report, args.plot)
        console.print(f"stability regions written to {escape(args.plot)}", highlight=False)
    return 0
