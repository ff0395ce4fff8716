"""Timing alternatives in interleaved rounds, and writing a benchmark's results into BENCHMARKS.md,
where each script owns one marked block.

``interleave`` runs every alternative once a round, in a fixed order, after warm-up rounds, in one
process: load that moves between rounds then falls on all of them alike, and each round's ratio
against the baseline (``median_ratio``) cancels it.

A block starts with ``<!-- NAME:start -->`` and ends with ``<!-- NAME:end -->``; a run replaces
its own block and leaves the rest of the file alone. A block not there yet is appended, after its
section heading when one is given. The file is written whole (a temporary file, then a rename).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

BENCHMARKS = Path(__file__).resolve().parents[1] / "BENCHMARKS.md"


class OwnTime(NamedTuple):
    """What a closure given to ``interleave`` returns when only part of it is to be timed: that part's
    wall and CPU seconds (per step, say, of a closure that runs several)."""

    wall: float
    cpu: float


def interleave(fns: Mapping[str, Callable[[], object]], rounds: int, *, warmup: int = 1,
               before: Callable[[], object] | None = None, sync: Callable[[], object] | None = None,
               after_round: Callable[[int, dict], object] | None = None) -> dict[str, dict[str, list[float]]]:
    """{name: {"wall": [seconds per round], "cpu": [...], "warmup": [wall seconds of each warm-up call]}}
    of each closure run once a round, in the mapping's order, after ``warmup`` warm-up rounds.

    On a shared machine the process's CPU time (all its threads) is what a step costs; the wall
    clock adds the time other jobs held the cores. A closure may return an ``OwnTime``: the part of it
    that is timed (anything else it returns is ignored). ``before`` runs untimed before each call (a ``gc.collect``),
    ``sync`` just inside the timing before and after it (a GPU's synchronize, so that the time is
    the work's, not the launch's), ``after_round(i, times)`` after round i (0-based) with the times so
    far (a progress line)."""
    times = {n: {"wall": [], "cpu": [], "warmup": []} for n in fns}

    def timed(fn) -> tuple[float, float]:
        if before is not None:
            before()
        if sync is not None:
            sync()
        wall, cpu = time.perf_counter(), time.process_time()
        own = fn()
        if sync is not None:
            sync()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        return (own.wall, own.cpu) if isinstance(own, OwnTime) else (wall, cpu)

    for _ in range(warmup):
        for n, fn in fns.items():
            times[n]["warmup"].append(timed(fn)[0])
    for i in range(rounds):
        for n, fn in fns.items():
            wall, cpu = timed(fn)
            times[n]["wall"].append(wall)
            times[n]["cpu"].append(cpu)
        if after_round is not None:
            after_round(i, times)
    return times


def median_ratio(a: Sequence[float], b: Sequence[float]) -> float:
    """The median over rounds of a[i] / b[i]: each round's ratio, taken in the same round."""
    return statistics.median(x / y for x, y in zip(a, b))


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
