"""Progress of long work on stderr: one rich bar for every command, and a spinner for waits.

stdout carries the report, or pure JSON with ``--json -``; the bar goes to stderr, so neither a
pipe nor a report ever holds it. It is drawn only when stderr is a terminal: in CI logs or with
``2> file`` nothing is drawn, or, for work that runs for minutes (training), a plain line every
``log_every`` steps so a log still shows the run.

    with ProgressBar("perplexity", total=len(blocks), unit="blocks") as bar:
        bar.advance(n)
    with step_progress("validating", STEP_LABELS) as update:   # update(done, total, key)
        validate(..., on_progress=update)
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)
from rich.status import Status
from rich.text import Text


class ProgressBar:
    """A bar on stderr: description, bar, done/total (+ ``unit``), a live text (``shown``), time
    spent and time left.

    transient: erase the bar when the work is done (a command's report follows it); a training
    run keeps its last state on the screen. log_every: without a terminal, print
    ``"{description} step {done}/{total}: {shown}"`` every that many steps (None: print nothing).
    enabled: False shows nothing at all (other ranks of a distributed run).
    """

    def __init__(self, description: str, total: int | None = None, *, completed: int = 0, unit: str = "",
                 transient: bool = True, log_every: int | None = None, enabled: bool = True) -> None:
        self.console = Console(stderr=True)
        self.description = description
        self.total = total
        self.enabled = enabled
        self.log_every = None if log_every is None else max(1, log_every)
        self.live = enabled and self.console.is_terminal
        columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn()]
        columns += [TextColumn(unit)] if unit else []
        columns += [TextColumn("{task.fields[shown]}"), TimeElapsedColumn(), TimeRemainingColumn()]
        # Off a terminal a bar that logs lines instead is switched off; any other is left to rich,
        # which draws nothing there (and ends with one newline on stderr).
        off = not enabled or (self.log_every is not None and not self.live)
        self.progress = Progress(*columns, console=self.console, transient=transient, disable=off)
        self.task = self.progress.add_task(description, total=total, completed=completed, shown="")
        self.completed = completed

    def __enter__(self) -> "ProgressBar":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def update(self, completed: int, *, total: int | None = None, description: str | None = None,
               shown: str = "") -> None:
        """``completed`` of ``total`` done; ``description`` and ``shown`` replace what the bar says."""
        self.completed = completed
        self.total = self.total if total is None else total
        if self.live:
            # refresh: draw every step, even one shorter than the refresh interval
            self.progress.update(self.task, completed=completed, total=self.total, shown=shown,
                                 description=self.description if description is None else description, refresh=True)
        elif self.enabled and self.log_every is not None and (completed % self.log_every == 0 or completed == self.total):
            self.console.print(f"{self.description} step {completed}/{self.total}: {shown}", highlight=False, markup=False)

    def advance(self, n: int = 1) -> None:
        self.update(self.completed + n)


def stderr_status(message: str, enabled: bool = True) -> Status | nullcontext:
    """A spinner with ``message`` (printed literally, not as markup) on stderr, erased when done;
    nothing when not ``enabled`` (the other ranks of a distributed run)."""
    return Console(stderr=True).status(Text(message)) if enabled else nullcontext()


@contextmanager
def step_progress(description: str, labels: dict[str, str] | None = None, enabled: bool = True
                  ) -> Iterator[Callable[[int, int, str], None]]:
    """Yields ``update(done, total, key)``; shows ``description: label of key`` and a bar on stderr
    (nothing when not ``enabled``)."""
    labels = labels or {}
    with ProgressBar(description, enabled=enabled) as bar:
        yield lambda done, total, key: bar.update(done, total=total, description=f"{description}: {labels.get(key, key)}")
