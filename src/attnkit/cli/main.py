"""``attnkit`` command line: parse, call the feature, render. User mistakes exit with code 2."""

from __future__ import annotations

import argparse
import importlib
import sys

from rich.console import Console

from attnkit import __version__
from attnkit.errors import UserError

# subcommand -> module exposing add_parser(subparsers) and run(args) -> int
COMMANDS = {
    "analyze": "attnkit.cli.analyze",
    "perplexity": "attnkit.cli.perplexity",
    "validate": "attnkit.cli.validate",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="attnkit", description="Find, explain and fix what goes wrong in attention.")
    parser.add_argument("--version", action="version", version=f"attnkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        try:
            importlib.import_module(module).add_parser(sub)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
    return parser


def _quiet_libraries() -> None:
    """transformers' own progress bars and warnings would interleave with attnkit's report."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except UserError as e:
        Console(stderr=True).print(f"[bold red]attnkit: error:[/bold red] {e}", highlight=False)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
