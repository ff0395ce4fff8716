"""Progress of long commands on stderr: a transient rich bar that never reaches stdout.

stdout carries the report, or pure JSON with ``--json -``; the bar goes to stderr and is erased
when the work is done, so neither a pipe nor a terminal keeps it. When stderr is not a terminal
(CI logs, ``2> file``) nothing is drawn at all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.status import Status
from rich.text import Text

# What each step of ``attnkit.validate.validate`` is doing, as a person would say it.
# Short enough (<= 24 characters) that the bar still fits an 80-column terminal.
VALIDATE_STEPS = {
    "capture": "capturing attention maps",
    "sanity": "sanity checks",
    "positional": "positional patterns",
    "tokens": "token-level patterns",
    "statistics": "statistical tests",
    "heads": "per-head analysis",
    "query_variation": "query-side variation",
    "diversity": "diversity correlation",
    "gradients": "gradient flow (backward)",
    "ablation": "ablation study",
    "done": "writing the report",
}


def stderr_status(message: str) -> Status:
    """A spinner with ``message`` (printed literally, not as markup) on stderr, erased when done."""
    return Console(stderr=True).status(Text(message))


@contextmanager
def step_progress(description: str, labels: dict[str, str] | None = None,
                  eta: bool = False) -> Iterator[Callable[[int, int, str], None]]:
    """Yields ``update(done, total, key)``; shows ``description: label of key`` and a bar on stderr,
    with the time left estimated from the pace so far when ``eta`` (steps of similar cost)."""
    console = Console(stderr=True)
    labels = labels or {}
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=20),
                        MofNCompleteColumn(), TimeElapsedColumn(),
                        *([TextColumn("eta"), TimeRemainingColumn()] if eta else []), console=console, transient=True)
    task = progress.add_task(description, total=None)

    def update(done: int, total: int, key: str) -> None:
        # refresh: draw every step, even one shorter than the refresh interval
        progress.update(task, completed=done, total=total, description=f"{description}: {labels.get(key, key)}",
                        refresh=True)

    with progress:
        yield update
