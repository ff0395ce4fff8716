"""Writing a benchmark's results into BENCHMARKS.md: each script owns one marked block.

A block starts with ``<!-- NAME:start -->`` and ends with ``<!-- NAME:end -->``; a run replaces
its own block and leaves the rest of the file alone. A block not there yet is appended, after its
section heading when one is given. The file is written whole (a temporary file, then a rename).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


def command_line(script: str, args: argparse.Namespace, parser: argparse.ArgumentParser,
                 leave_out: Iterable[str] = ()) -> str:
    """``python bench/SCRIPT`` with the options of ``args`` that differ from the parser's defaults
    (those in ``leave_out`` not shown): the command that reproduces a run."""
    skip = set(leave_out)
    return f"python bench/{script}" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k not in skip and v != parser.get_default(k))


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def publish(doc: dict, json_path: str | Path, block: str, name: str, heading: str | None, write: bool) -> None:
    """A run's end: its raw figures ``doc`` as JSON at ``json_path``, its rendered ``block`` printed,
    and with ``write`` the block put in BENCHMARKS.md as ``name`` (under ``heading``)."""
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    Path(json_path).write_text(json.dumps(doc, indent=1))
    print(block)
    if write:
        write_block(BENCHMARKS, name, block, heading)


def write_block(path: Path, name: str, block: str, heading: str | None = None) -> None:
    """Put ``block`` (which begins and ends with ``markers(name)``) in place of the old one in ``path``."""
    start, end = markers(name)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        text = before + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + (f"{heading}\n\n" if heading else "") + block + "\n"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
