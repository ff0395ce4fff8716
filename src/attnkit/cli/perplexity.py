"""``attnkit perplexity [MODEL] --dataset ...``: evaluate a causal language model on a corpus split.

Perplexity is exp(mean next-token negative log-likelihood) over every predicted token of
non-overlapping fixed-length blocks (see ``attnkit.perplexity``), the definition the reference
model's card uses, so ``attnkit perplexity reference --split test`` reproduces the card.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from attnkit.errors import UserError

DEFAULT_BLOCK_SIZE = 256
DESCRIPTION = ("Evaluate a causal language model on a corpus split: perplexity is exp(mean next-token negative "
               "log-likelihood) over every predicted token of non-overlapping fixed-length blocks, the definition "
               "the reference model's card uses (attnkit perplexity reference --split test reproduces it).")


def add_parser(subparsers) -> argparse.ArgumentParser:
    from attnkit.common.data.corpus import DEFAULT_CORPUS
    from attnkit.common.loading.builtin import DEFAULT_MODEL

    p = subparsers.add_parser(
        "perplexity",
        help="perplexity of a causal language model on a corpus split",
        description=DESCRIPTION,
        epilog="examples:\n  attnkit perplexity reference --split test --max-blocks 8\n"
        "  attnkit perplexity ./my-model --dataset notes.txt --json result.json",
    )
    from attnkit.cli.common import add_device_options, add_own_model_options

    p.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                   help=f"built-in name, local HF directory, hub id, or your own model as module.path:factory "
                   f"(imported: that runs its code) (default: {DEFAULT_MODEL})")
    add_device_options(p)
    add_own_model_options(p)
    p.add_argument(
        "--dataset",
        default=DEFAULT_CORPUS,
        help="'kjv' (built-in, offline), a local .txt file or folder (files named *train*/*valid*/*test* are splits), "
        f"or a Hugging Face dataset NAME[:CONFIG] such as wikitext:wikitext-2-raw-v1 (default: {DEFAULT_CORPUS})",
    )
    p.add_argument("--split", default=None, help="split to evaluate (default: test, or the only split of a local file)")
    p.add_argument("--text-column", default="text", help="text column of a Hugging Face dataset (default: text)")
    p.add_argument("--block-size", type=int, default=None, help=f"tokens a block (default: {DEFAULT_BLOCK_SIZE} or the model's context if shorter)")
    p.add_argument("--batch-size", type=int, default=8, help="blocks a forward pass (default: 8)")
    p.add_argument("--max-blocks", type=int, default=None, help="evaluate only the first N blocks")
    p.add_argument("--json", metavar="PATH|-", default=None, help="also write the result as JSON to PATH, or to stdout with '-'")
    p.set_defaults(run=run)  # attnkit.cli.main dispatches through args.run
    return p


def _context_length(config) -> int | None:
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape

    from attnkit.common.data import encode_documents, load_corpus
    from attnkit.common.data.blocks import lm_blocks
    from attnkit.common.loading.registry import load_model
    from attnkit.perplexity import evaluate_perplexity

    from attnkit.cli.common import check_outputs, check_positive

    check_positive(args.batch_size, "--batch-size")
    check_positive(args.max_blocks, "--max-blocks")
    # 0 is not "the default": a block needs 2 tokens, one to predict from and one to predict.
    check_positive(args.block_size, "--block-size", minimum=2)
    check_outputs(json=args.json)  # before the run, not after it
    to_stdout = args.json == "-"
    err = Console(stderr=True)
    out = err if to_stdout else Console()

    from attnkit.cli.common import load_options

    loaded = load_model(args.model, **load_options(args))
    if loaded.kind != "causal-lm":
        raise UserError(f"'{args.model}' is not a causal language model; perplexity needs one (e.g. 'reference')")
    if loaded.tokenizer is None:
        raise UserError(f"'{args.model}' has no tokenizer")
    context = _context_length(loaded.model.config)
    block_size = args.block_size if args.block_size is not None else min(DEFAULT_BLOCK_SIZE, context or DEFAULT_BLOCK_SIZE)
    if context is not None and block_size > context:
        raise UserError(f"--block-size {block_size} is longer than the model's context of {context} tokens")

    corpus = load_corpus(args.dataset, text_column=args.text_column)
    split = args.split
    if split is None:
        split = "test" if "test" in corpus.splits else (next(iter(corpus.splits)) if len(corpus.splits) == 1 else None)
    documents = corpus.split(split)
    # Each block opens with the tokenizer's own prefix (a BOS for Llama-style tokenizers): what the model trained on.
    blocks = lm_blocks(loaded.tokenizer, encode_documents(loaded.tokenizer, documents), block_size)
    if args.max_blocks is not None:
        blocks = blocks[: args.max_blocks]
    if not blocks:
        raise UserError(f"split '{split}' of '{args.dataset}' has fewer than 2 tokens")

    from attnkit.common.progress import ProgressBar

    t0 = time.time()
    with ProgressBar("perplexity", total=len(blocks), unit="blocks") as bar:
        result = evaluate_perplexity(loaded.model, blocks, args.batch_size, on_batch=bar.advance)
    seconds = time.time() - t0

    record = {
        "model": args.model,
        "dataset": corpus.name,
        "split": split,
        "block_size": block_size,
        **result.to_dict(),
        "seconds": round(seconds, 2),
    }
    out.print(
        f"[bold]{escape(args.model)}[/bold] on {escape(corpus.name)} \\[{escape(split)}]: perplexity [bold]{result.perplexity:.2f}[/bold] "
        f"(mean NLL {result.nll:.4f} nats over {result.tokens:,} predicted tokens in {result.blocks:,} blocks "
        f"of {block_size}; {seconds:.1f} s)"
    )
    if args.json:
        text = json.dumps(record, indent=1)
        if to_stdout:
            sys.stdout.write(text + "\n")
        else:
            from attnkit.common.io import write_atomic

            write_atomic(args.json, text + "\n")
    return 0
