"""A training run's progress on stderr: a rich bar with the live metric, or a line now and then.

On a terminal the bar shows step, the live value of one metric (e.g. KL), the learning rate and
the time left. Without a terminal (CI logs, ``2> file``) a plain line is printed every
``log_every`` steps instead, so a log still shows the run. Only rank 0 shows anything.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainProgress:
    def __init__(self, total: int, start: int, metric: str, enabled: bool = True, log_every: int = 50,
                 description: str = "training") -> None:
        self.console = Console(stderr=True)
        self.metric = metric
        self.enabled = enabled
        self.log_every = max(1, log_every)
        self.live = enabled and self.console.is_terminal
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
                                 TextColumn("{task.fields[shown]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=self.console, disable=not self.live)
        self.task = self.progress.add_task(description, total=total, completed=start, shown="")
        self.description = description
        self.total = total

    def __enter__(self) -> "TrainProgress":
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def update(self, step: int, metrics: dict[str, float], lr: float) -> None:
        """``step`` steps done; ``metrics`` of the last one."""
        value = metrics.get(self.metric)
        shown = (f"{self.metric} {value:.4g}" if value is not None else "") + f"  lr {lr:.2e}"
        if self.live:
            self.progress.update(self.task, completed=step, shown=shown)
        elif self.enabled and (step % self.log_every == 0 or step == self.total):
            self.console.print(f"{self.description} step {step}/{self.total}: {shown}", highlight=False, markup=False)
