"""``attnkit`` command line: parse, call the feature, render.

Exit codes: 0 success, 1 a finding the command defines as failing (``validate``'s critical
checks), 2 a user mistake (one line naming it), 3 an unexpected error inside attnkit (one line;
``--debug`` shows the traceback), 130 interrupted. No traceback reaches a user without ``--debug``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import textwrap

from rich.console import Console
from rich.markup import escape

from attnkit import __version__
from attnkit.common.extras import install_hint, missing_message
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


class HelpFormatter(argparse.HelpFormatter):
    """Every option's default and choices in its help; descriptions and epilogs keep their layout.

    A paragraph whose lines are indented (a table, a list of examples) is printed as written;
    other paragraphs are wrapped to the terminal. "(default: X)" is added unless the help says it.
    """

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        paragraphs = re.split(r"\n\s*\n", text.strip("\n"))
        out = []
        for para in paragraphs:
            lines = para.splitlines()
            if any(line.startswith(" ") for line in lines[1:]) or para.lstrip().endswith(":") and len(lines) == 1:
                out.append("\n".join(indent + line for line in lines))
            else:
                out.append(textwrap.fill(" ".join(line.strip() for line in lines), width, initial_indent=indent,
                                         subsequent_indent=indent))
        return "\n\n".join(out)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.choices and action.metavar is not None and not isinstance(action, argparse._SubParsersAction):
            if not all(str(c) in text for c in action.choices):
                text += f" (choices: {', '.join(map(str, action.choices))})"
        shown = action.default not in (None, False, argparse.SUPPRESS) and not isinstance(action.default, list)
        optional = bool(action.option_strings) or action.nargs == "?"
        if shown and optional and "default" not in text and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


class OneLineParser(argparse.ArgumentParser):
    """argparse prints the whole usage block and exits; attnkit prints one line and returns 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        raise _ArgumentError(self.prog, message)


EPILOG = """\
examples:
  attnkit analyze reference                  per-head statistics and diagnoses on a built-in model
  attnkit validate reference --html r.html   the nine-section validation report
  attnkit check reference --dtype fp16       will attention stay numerically safe in fp16?
  attnkit COMMAND --help                     a command's options, with defaults and an example
"""


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="attnkit", description="Find, explain and fix what goes wrong in attention.",
                           epilog=EPILOG)
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
    _quiet_libraries()  # here, not before parsing: --help imports neither torch nor transformers
    try:
        return int(args.run(args) or 0)
    except UserError as e:
        print_error(str(e))
        return EXIT_USER_ERROR
    except ModuleNotFoundError as e:
        hint = install_hint(e.name)
        if hint is None:  # not an optional dependency: a broken install or a bug, reported below
            return _unexpected(e, args)
        print_error(missing_message(e.name))
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
        if _is_out_of_memory(e) and not args.debug:
            from attnkit.common.loading.device import out_of_memory_message

            print_error(out_of_memory_message(e))
            return EXIT_USER_ERROR
        return _unexpected(e, args)


def _is_out_of_memory(e: BaseException) -> bool:
    """torch's out-of-memory, checked without importing torch (a command that never loaded it cannot raise it)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(e, getattr(torch, "OutOfMemoryError", ()))


def _unexpected(e: Exception, args: argparse.Namespace) -> int:
    if args.debug:
        raise e
    print_error(f"unexpected error ({_one_line(e)}); this is a bug in attnkit or a library it uses. "
                f"Run with --debug for the traceback.")
    return EXIT_INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
