"""``attnkit analyze``: per-head statistics and diagnoses for a model on some text."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.markup import escape

from attnkit.cli.common import (add_model_argument, build_stats_kernels, check_outputs, check_positive, load_options,
                                model_flags, parse_int_list, read_text)


def add_parser(sub) -> None:
    p = sub.add_parser("analyze", help="per-head attention statistics and diagnoses",
                       description="Run a model on text and report, per layer and head, entropy, concentration, "
                       "sinks, spikes and overflow margins from the real pre-softmax logits, with diagnoses.",
                       epilog="examples:\n  attnkit analyze reference --json report.json --plot heads.png\n"
                       "  attnkit analyze ./my-model --text-file notes.txt --layers 0-3\n"
                       "  torchrun --standalone --nproc-per-node 2 --no-python attnkit analyze ./my-model --dataset "
                       "texts.jsonl --device auto\n"
                       "      (each process analyses its share of the texts; rank 0 writes the one report)")
    add_model_argument(p)
    p.add_argument("--text", help="text to analyse (default: a built-in English passage)")
    p.add_argument("--text-file", metavar="FILE", help="file with the text to analyse")
    p.add_argument("--max-length", type=int, metavar="N", help="truncate the input to this many tokens")
    p.add_argument("--layers", metavar="LIST", help="layers to observe, e.g. 0,2-3 (others run on SDPA)")
    p.add_argument("--heads", metavar="LIST", help="heads to observe in each selected layer, e.g. 0-3")
    p.add_argument("--sample-rows", type=int, metavar="N", help="statistics on this many random query rows per layer (long inputs)")
    data = p.add_argument_group("a dataset instead of one text")
    data.add_argument("--dataset", metavar="SRC", help="texts to pool the statistics over: a .txt file (one text a line), "
                      ".jsonl, .parquet, a folder of them, or a Hugging Face dataset NAME[:CONFIG] when a hub is reachable")
    data.add_argument("--split", metavar="S", help="the split of a hub dataset (default train), or the files of a folder "
                      "whose names contain S")
    data.add_argument("--text-field", metavar="F", default="text", help="the field (jsonl) or column (parquet, hub) "
                      "holding the text (default: text)")
    data.add_argument("--samples", type=int, metavar="N", help="analyse the first N texts (default: all)")
    data.add_argument("--batch-size", type=int, metavar="B", default=8, help="sequences a forward, padded (default 8); "
                      "padding takes no part in the statistics")
    data.add_argument("--seq-len", type=int, metavar="L", help="cut longer texts to L tokens (default: the most the "
                      "model takes); the report says how many were cut")
    p.add_argument("--json", metavar="PATH", help="write the JSON report to PATH, or - for stdout")
    p.add_argument("--plot", metavar="PNG", help="write the layer x head heatmap to this PNG")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from attnkit.common.distributed import command_group
    from attnkit.common.loading.device import resolve_device

    text = read_text(args.text, args.text_file)
    _check_dataset_flags(args)
    _check_torchrun_flags(args)
    layers = parse_int_list(args.layers, "layers")
    heads = parse_int_list(args.heads, "heads")
    check_positive(args.max_length, "--max-length")
    check_positive(args.sample_rows, "--sample-rows")
    # Under torchrun every rank checks the same flags and fails alike before the group forms; from
    # here on a failure on one rank is told to all (``agree``) instead of leaving them waiting.
    with command_group(resolve_device(args.device)) as env:
        return _run(args, env, text, layers, heads)


def _run(args: argparse.Namespace, env, text: str | None, layers, heads) -> int:
    from attnkit.analyze.run import analyze
    from attnkit.common.default_text import DEFAULT_TEXT
    from attnkit.common.distributed import agree
    from attnkit.common.loading.registry import load_model
    from attnkit.common.progress import stderr_status
    from attnkit.common.tokenize import max_positions, tokenize
    from attnkit.errors import UserError

    def prepare():
        if env.is_main:  # rank 0 writes the report: refuse a path it cannot write before the run, not after it
            check_outputs(json=args.json, plot=args.plot)
        texts = _read_dataset(args, env) if args.dataset is not None else None
        with stderr_status(f"loading {args.model}", enabled=env.is_main):  # stderr: stdout may be --json -
            loaded = load_model(args.model, trust_remote_code=args.trust_remote_code, **load_options(args))
        if loaded.tokenizer is None:
            raise UserError(f"{args.model} has no tokenizer to turn text into tokens")
        build_stats_kernels(loaded.model, enabled=env.is_main)
        return loaded, texts

    loaded, texts = agree(env, prepare)
    model = loaded.model
    if texts is not None:
        result = _analyze_dataset(args, loaded, texts, layers, heads, env)
    else:
        inputs = tokenize(loaded.tokenizer, text if text is not None else DEFAULT_TEXT, args.max_length,
                          max_positions(model), truncate_silently=text is None)
        with stderr_status("running the model through the seam"):
            try:
                result = analyze(model, inputs, name=args.model, layers=layers, heads=heads, sample_rows=args.sample_rows)
            except ValueError as e:
                raise UserError(str(e)) from e
    if not env.is_main:  # one report, on rank 0
        return 0
    from attnkit.analyze.render import render_analysis

    console = Console(stderr=args.json == "-")
    render_analysis(result, console, given_json=args.json is not None, model_flags=model_flags(args))
    if args.json:
        from attnkit.common.io import write_json

        write_json(result.to_json(), args.json)
    if args.plot:
        from attnkit.analyze.plots import save_entropy_heatmap

        save_entropy_heatmap(result, args.plot)
        console.print(f"heatmap written to {escape(args.plot)}", highlight=False)
    return 0


_DATASET_ONLY = (("split", "--split"), ("samples", "--samples"), ("seq_len", "--seq-len"))


def _check_dataset_flags(args: argparse.Namespace) -> None:
    """The dataset flags' one-line errors, before the model loads."""
    from attnkit.errors import UserError

    if args.dataset is None:
        given = [flag for attr, flag in _DATASET_ONLY if getattr(args, attr) is not None]
        if given:
            raise UserError(f"{given[0]} is for --dataset")
        return
    if args.text is not None or args.text_file is not None:
        raise UserError("give --dataset or --text / --text-file, not both")
    if args.max_length is not None:
        raise UserError("--max-length is for --text; with --dataset, cut texts with --seq-len")
    check_positive(args.samples, "--samples")
    check_positive(args.batch_size, "--batch-size")
    check_positive(args.seq_len, "--seq-len", minimum=2)


def _check_torchrun_flags(args: argparse.Namespace) -> None:
    """What a run under torchrun cannot do, before the group forms."""
    from attnkit.common.distributed import launched_world_size
    from attnkit.errors import UserError

    if launched_world_size() <= 1:
        return
    if args.dataset is None:
        raise UserError("under torchrun the processes share a --dataset; for one text run attnkit analyze without torchrun")
    if args.device_map is not None:
        raise UserError("--device-map spreads one model over every GPU, and torchrun starts a copy per process: "
                        "use --device auto (each process on its own GPU)")


def _read_dataset(args: argparse.Namespace, env) -> list[str]:
    from attnkit.common.data.texts import load_texts
    from attnkit.common.progress import stderr_status

    with stderr_status(f"reading {args.dataset}", enabled=env.is_main):
        texts = load_texts(args.dataset, split=args.split, text_field=args.text_field)
    return texts[: args.samples] if args.samples is not None else texts


def _analyze_dataset(args: argparse.Namespace, loaded, texts: list[str], layers, heads, env):
    """Statistics pooled over ``--dataset``, batch by batch, with a progress bar and its ETA on stderr
    (under torchrun: each rank its share, pooled; the bar shows rank 0's share)."""
    from attnkit.analyze.dataset import analyze_texts
    from attnkit.common.progress import step_progress
    from attnkit.common.tokenize import max_positions
    from attnkit.errors import UserError

    model_max = max_positions(loaded.model)
    if args.seq_len is not None and model_max is not None and args.seq_len > model_max:
        raise UserError(f"--seq-len {args.seq_len} is more than the model takes ({model_max} positions)")
    seq_len = args.seq_len if args.seq_len is not None else model_max
    shown = "sequences" if not env.distributed else f"rank 0's share of the sequences ({env.world_size} processes)"
    with step_progress("analysing", {"sequences": shown}, enabled=env.is_main) as update:
        try:
            return analyze_texts(loaded.model, loaded.tokenizer, texts, batch_size=args.batch_size, seq_len=seq_len,
                                 name=args.model, layers=layers, heads=heads, sample_rows=args.sample_rows,
                                 progress=lambda done, total: update(done, total, "sequences"), env=env)
        except ValueError as e:
            raise UserError(str(e)) from e
