"""``attnkit validate``: the nine-section attention validation report, with an ablation, for any model.

Exit status: 0 when no check is critical, 1 when at least one is (the ❌ lines of the report),
2 for user errors (bad model path, empty text, ...), as everywhere in attnkit.
"""

from __future__ import annotations

import argparse

# What ``attnkit validate --help`` says: plain text laid out for a terminal (the module docstring
# above is for developers).
HELP_DESCRIPTION = """\
Check whether a model's attention is correct, interpretable, significant and
useful, in nine sections:

  1 sanity checks       rows sum to 1; no weight on future positions
  2 positional          local heads; weight on a token's own and the first token
  3 token patterns      repeated tokens, special tokens and punctuation
  4 statistical tests   which heads differ significantly from uniform attention
  5 per-head analysis   sharp, medium and uniform heads; attention maps (HTML)
  6 query variation     do different tokens attend differently?
  7 diversity           hidden-state diversity against attention non-uniformity
  8 gradient flow       do the query/key parameters get a gradient?
  9 ablation            held-out loss with attention replaced by uniform,
                        local-window and first-token patterns: does it help?

Exit status: 0 no critical finding, 1 at least one critical finding (marked ✗),
2 a usage error (bad model path, empty text, ...).
"""
HELP_EPILOG = """\
examples:
  attnkit validate reference --html report.html
  attnkit validate minilm --text "The cat sat on the mat." --json report.json
  attnkit validate ./my-model --dataset notes.txt --json - > report.json
"""


def add_parser(sub) -> None:
    from attnkit.cli.common import add_model_argument
    from attnkit.validate.options import Options

    d = Options()
    p = sub.add_parser(
        "validate", help="is attention correct, interpretable, significant and helping? (9 sections, ablation)",
        description=HELP_DESCRIPTION, epilog=HELP_EPILOG)
    add_model_argument(p)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", metavar="TEXT", help="text to validate on")
    src.add_argument("--text-file", metavar="FILE", help="file with the text to validate on")
    src.add_argument("--dataset", metavar="CORPUS", help="corpus: 'kjv', a local .txt file (one document), a .jsonl or "
                     ".parquet file (a document per row), a folder of them, or a Hugging Face dataset "
                     "NAME[:CONFIG] (default: the kjv test split)")
    p.add_argument("--split", metavar="NAME", help="split of --dataset (default: test, or its only split)")
    p.add_argument("--text-field", metavar="F", default="text", help="the field (.jsonl) or column (.parquet, hub) "
                   "of --dataset holding the text (default: text)")
    p.add_argument("--seq-len", type=int, metavar="N", default=d.seq_len, help=f"tokens per sequence (default: {d.seq_len})")
    p.add_argument("--sequences", type=int, metavar="N", default=d.sequences,
                   help=f"sequences whose attention maps are analysed (default: {d.sequences})")
    p.add_argument("--ablation-blocks", type=int, metavar="N", default=d.ablation_blocks,
                   help=f"held-out blocks the ablation evaluates (default: {d.ablation_blocks})")
    p.add_argument("--batch-size", type=int, metavar="N", default=d.batch_size, help=f"blocks per forward (default: {d.batch_size})")
    p.add_argument("--json", metavar="PATH", help="write the JSON report to PATH, or - for stdout")
    p.add_argument("--html", metavar="PATH", help="write the self-contained HTML report to PATH")
    p.set_defaults(run=run)


def _documents(args) -> tuple[list[str] | None, str | None]:
    from attnkit.cli.common import read_text
    from attnkit.errors import UserError

    if args.split is not None and args.dataset is None:
        raise UserError("--split goes with --dataset")
    if args.dataset is not None:
        from attnkit.common.data import load_corpus

        corpus = load_corpus(args.dataset, text_column=args.text_field)
        docs = corpus.split(args.split)
        split = args.split or ("test" if "test" in corpus.splits else next(iter(corpus.splits)))
        return docs, f"{corpus.name} [{split}]"
    text = read_text(args.text, args.text_file)
    if text is None:
        return None, None
    if not text.strip():
        raise UserError("the text is empty; give --text, --text-file or --dataset with some words in it")
    return [text], (args.text_file or "--text")


def run(args: argparse.Namespace) -> int:
    from attnkit.common.distributed import command_group, launched_world_size
    from attnkit.common.loading.device import resolve_device
    from attnkit.errors import UserError

    if launched_world_size() > 1 and args.device_map is not None:
        raise UserError("--device-map spreads one model over every GPU, and torchrun starts a copy per process: "
                        "use --device auto (each process on its own GPU)")
    # Every rank checks the same flags and fails alike before the group forms; from there a failure
    # on one rank is told to all (``agree``).
    with command_group(resolve_device(args.device)) as env:
        return _run(args, env)


def _run(args: argparse.Namespace, env) -> int:
    from rich.console import Console
    from rich.markup import escape

    from attnkit.cli.common import build_stats_kernels, check_outputs, load_options
    from attnkit.common.distributed import agree
    from attnkit.common.loading.registry import load_model
    from attnkit.common.progress import stderr_status, step_progress
    from attnkit.errors import UserError
    from attnkit.validate import Options, validate
    from attnkit.validate.render import STEP_LABELS

    opts = Options(seq_len=args.seq_len, sequences=args.sequences, ablation_blocks=args.ablation_blocks,
                   batch_size=args.batch_size)

    def prepare():
        if env.is_main:  # rank 0 writes the report: refuse a path it cannot write before the run, not after it
            check_outputs(json=args.json, html=args.html)
        documents, source = _documents(args)
        with stderr_status(f"loading {args.model}", enabled=env.is_main):  # stderr: stdout may be --json -
            loaded = load_model(args.model, trust_remote_code=args.trust_remote_code, **load_options(args))
        if loaded.tokenizer is None:
            raise UserError(f"{args.model} has no tokenizer to turn text into tokens")
        build_stats_kernels(loaded.model, enabled=env.is_main)
        return documents, source, loaded

    documents, source, loaded = agree(env, prepare)
    with step_progress("validating", STEP_LABELS, enabled=env.is_main) as progress:  # on stderr, erased when done
        report = validate(loaded.model, loaded.tokenizer, documents, name=args.model, kind=loaded.kind, options=opts,
                          data_source=source, on_progress=progress, env=env)
    if not env.is_main:  # one report, on rank 0; every rank exits with its status
        return report.exit_status
    from attnkit.validate.render import render_report

    console = Console(stderr=args.json == "-")
    render_report(report, console)
    if args.json:
        from attnkit.common.io import write_json

        write_json(report.to_json(), args.json)
    if args.html:
        from attnkit.common.io import write_atomic
        from attnkit.validate.html import render_html

        write_atomic(args.html, render_html(report, json_path=args.json))  # the footer says where the JSON went
        console.print(f"HTML report written to {escape(args.html)}", highlight=False)
    return report.exit_status
