"""``attnkit`` command line: parse, call the feature, render.

Exit codes: 0 success, 1 a finding the command defines as failing (``validate``'s critical
checks), 2 a user mistake (one line naming it), 3 an unexpected error inside attnkit (one line;
``--debug`` shows the traceback), 130 interrupted. No traceback reaches a user without ``--debug``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from rich.console import Console
from rich.markup import escape

from attnkit import __version__
from attnkit.errors import UserError

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 3
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a command whose reader closed

# subcommand -> module exposing add_parser(subparsers) and run(args) -> int
COMMANDS = {
    "analyze": "attnkit.cli.analyze",
    "gate": "attnkit.cli.gate",
    "perplexity": "attnkit.cli.perplexity",
    "validate": "attnkit.cli.validate",
    "check": "attnkit.cli.check",
    "monitor": "attnkit.cli.monitor",
    "sparse": "attnkit.cli.sparse",
}


class _ArgumentError(Exception):
    """argparse's complaint, carried to ``main`` so it prints as one line like every other user error."""

    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog


class OneLineParser(argparse.ArgumentParser):
    """argparse prints the whole usage block and exits; attnkit prints one line and returns 2."""

    def error(self, message: str):  # type: ignore[override]
        raise _ArgumentError(self.prog, message)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="attnkit", description="Find, explain and fix what goes wrong in attention.")
    parser.add_argument("--version", action="version", version=f"attnkit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an unexpected error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in COMMANDS.items():
        try:
            importlib.import_module(module).add_parser(sub)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
    for subparser in sub.choices.values():
        # Also accepted after the subcommand; SUPPRESS keeps a --debug given before it.
        subparser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                               help="show the full traceback of an unexpected error")
    return parser


def _quiet_libraries() -> None:
    """transformers' own progress bars and warnings would interleave with attnkit's report."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()
    except ImportError:
        pass


def print_error(message: str) -> None:
    """One line on stderr, printed literally (paths and text may contain rich markup such as ``[red]``)."""
    Console(stderr=True).print(f"[bold red]attnkit: error:[/bold red] {escape(message)}", highlight=False,
                               soft_wrap=True)


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    try:
        parser = build_parser()
    except Exception as e:  # noqa: BLE001 - a broken install must not greet a user with a traceback either
        if "--debug" in (sys.argv[1:] if argv is None else argv):
            raise
        print_error(f"attnkit cannot start ({_one_line(e)}); reinstall it. Run with --debug for the traceback.")
        return EXIT_INTERNAL_ERROR
    try:
        args = parser.parse_args(argv)
    except _ArgumentError as e:
        print_error(f"{e} (see {e.prog} --help)")
        return EXIT_USER_ERROR
    except SystemExit as e:  # --help and --version end here, with argparse's own code
        return int(e.code or 0) if not isinstance(e.code, str) else EXIT_USER_ERROR
    if args.command is None:
        parser.print_help()
        return EXIT_USER_ERROR
    try:
        return int(args.run(args) or 0)
    except UserError as e:
        print_error(str(e))
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print_error("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`attnkit ... | head`): nothing to report; keep Python from
        # complaining again when it flushes stdout at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except Exception as e:  # noqa: BLE001 - the one place that keeps tracebacks from users
        if args.debug:
            raise
        print_error(f"unexpected error ({_one_line(e)}); this is a bug in attnkit or a library it uses. "
                    f"Run with --debug for the traceback.")
        return EXIT_INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
