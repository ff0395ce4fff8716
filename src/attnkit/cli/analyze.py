"""``attnkit analyze``: per-head statistics and diagnoses for a model on some text."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.markup import escape

from attnkit.cli.common import (torch_dtype, add_model_argument, check_outputs, check_positive, model_flags, model_options,
                                parse_int_list, read_text)


def add_parser(sub) -> None:
    p = sub.add_parser("analyze", help="per-head attention statistics and diagnoses",
                       description="Run a model on text and report, per layer and head, entropy, concentration, "
                       "sinks, spikes and overflow margins from the real pre-softmax logits, with diagnoses.",
                       epilog="examples:\n  attnkit analyze reference --json report.json --plot heads.png\n"
                       "  attnkit analyze ./my-model --text-file notes.txt --layers 0-3")
    add_model_argument(p)
    p.add_argument("--text", help="text to analyse (default: a built-in English passage)")
    p.add_argument("--text-file", metavar="FILE", help="file with the text to analyse")
    p.add_argument("--max-length", type=int, metavar="N", help="truncate the input to this many tokens")
    p.add_argument("--layers", metavar="LIST", help="layers to observe, e.g. 0,2-3 (others run on SDPA)")
    p.add_argument("--heads", metavar="LIST", help="heads to observe in each selected layer, e.g. 0-3")
    p.add_argument("--sample-rows", type=int, metavar="N", help="statistics on this many random query rows per layer (long inputs)")
    p.add_argument("--json", metavar="PATH", help="write the JSON report to PATH, or - for stdout")
    p.add_argument("--plot", metavar="PNG", help="write the layer x head heatmap to this PNG")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from attnkit.common.default_text import DEFAULT_TEXT
    from attnkit.analyze.run import analyze
    from attnkit.common.tokenize import max_positions, tokenize
    from attnkit.errors import UserError
    from attnkit.common.loading.registry import load_model

    text = read_text(args.text, args.text_file)
    layers = parse_int_list(args.layers, "layers")
    heads = parse_int_list(args.heads, "heads")
    check_positive(args.max_length, "--max-length")
    check_positive(args.sample_rows, "--sample-rows")
    check_outputs(json=args.json, plot=args.plot)  # before the run, not after it
    console = Console(stderr=args.json == "-")
    from attnkit.common.progress import stderr_status

    with stderr_status(f"loading {args.model}"):  # stderr: stdout may be the report or --json -
        loaded = load_model(args.model, dtype=torch_dtype(args.dtype), trust_remote_code=args.trust_remote_code,
                            **model_options(args))
    if loaded.tokenizer is None:
        raise UserError(f"{args.model} has no tokenizer to turn text into tokens")
    model = loaded.model
    inputs = tokenize(loaded.tokenizer, text if text is not None else DEFAULT_TEXT, args.max_length,
                      max_positions(model), truncate_silently=text is None)
    with stderr_status("running the model through the seam"):
        try:
            result = analyze(model, inputs, name=args.model, layers=layers, heads=heads, sample_rows=args.sample_rows)
        except ValueError as e:
            raise UserError(str(e)) from e
    from attnkit.analyze.render import render_analysis

    render_analysis(result, console, given_json=args.json is not None, model_flags=model_flags(args))
    if args.json:
        from attnkit.common.io import write_json

        write_json(result.to_json(), args.json)
    if args.plot:
        from attnkit.analyze.plots import save_entropy_heatmap

        save_entropy_heatmap(result, args.plot)
        console.print(f"heatmap written to {escape(args.plot)}", highlight=False)
    return 0
