"""One emit interface, many sinks: JSONL, CSV, the console, TensorBoard, Weights & Biases.

The monitor hands every sink the same four things: ``start(meta)`` once, ``step(record)`` per
observed step, ``issue(issue)`` per new warning, ``intervention(entry)`` per applied
intervention, then ``close()``. A sink is a thin adapter over that; ``EMITTERS`` maps a name to a
factory taking the run directory. Under ``torch.distributed`` the monitor emits on rank 0 only.

JSONL (``monitor.jsonl``, one object per line, ``type`` in meta / step / issue / intervention;
an issue's own type is its ``issue`` field)
is what ``attnkit monitor report`` reads; it is appended and flushed line by line, so a running
job can be reported on.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.text import Text

from attnkit.common.extras import require
from attnkit.common.findings import Finding
from attnkit.monitor.issues import ISSUE_KEYS
from attnkit.monitor.panel import Markers, by_site, max_abs_logit, site_of
from attnkit.seam.sites import Site

HEAD_METRICS = ("entropy", "logit_max", "sink_mass", "max_attention")
GATE_METRICS = ("mean_gate", "gate_low_share")  # a gated model's (attnkit.gate): logged beside them


def series_name(site: Site, head: int | None = None) -> str:
    """``L2H5`` (``encoder.L2H5``, ``decoder.cross.L0H1`` for multi-stack models)."""
    prefix = ".".join(p for p in (site.stack, "cross" if site.kind == "cross" else "") if p)
    name = f"L{site.layer}" + ("" if head is None else f"H{head}")
    return f"{prefix}.{name}" if prefix else name


@dataclass
class StepRecord:
    step: int
    loss: float | None
    series: list[tuple[Site, int]]
    metrics: dict[str, list[float]]  # HEAD_METRICS (+ others) -> one value per series
    sites: list[Site]
    grad_norm: list[float] | None  # per site, query/key parameters
    grad_scale: float | None = None  # the GradScaler's scale after this step's update (when the monitor has one)

    def head_metrics(self) -> dict[str, list[float]]:
        """HEAD_METRICS, the gates' where present, and ``logit_absmax`` (each head's largest |logit|)
        where the record has both logit extremes: metric -> one value per series."""
        out = {m: self.metrics[m] for m in HEAD_METRICS + GATE_METRICS if m in self.metrics}
        if "logit_max" in self.metrics and "logit_min" in self.metrics:
            out["logit_absmax"] = max_abs_logit(self.metrics["logit_max"], self.metrics["logit_min"]).tolist()
        return out

    def scalars(self) -> dict[str, float]:
        """Flat ``metric/series`` -> value, as TensorBoard and W&B take them."""
        out: dict[str, float] = {}
        if self.loss is not None:
            out["loss"] = self.loss
        for metric, values in self.head_metrics().items():
            for (site, head), v in zip(self.series, values):
                out[f"{metric}/{series_name(site, head)}"] = v
        if self.grad_norm is not None:
            for site, v in zip(self.sites, self.grad_norm):
                out[f"grad_norm/{series_name(site)}"] = v
        if self.grad_scale is not None:
            out["grad_scale"] = self.grad_scale
        return out


def _json_value(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


class Emitter:
    records_repeats = False  # also told of quiet, repeated interventions (a QK-clip re-applied every step)

    def start(self, meta: dict) -> None:  # noqa: B027
        pass

    def step(self, record: StepRecord) -> None:  # noqa: B027
        pass

    def issue(self, issue: Finding) -> None:  # noqa: B027
        pass

    def intervention(self, entry: dict) -> None:  # noqa: B027
        pass

    def close(self) -> None:  # noqa: B027
        pass


class JSONLEmitter(Emitter):
    records_repeats = True

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a", encoding="utf-8")

    def _write(self, obj: dict) -> None:
        self.file.write(json.dumps(obj, default=_json_value, allow_nan=False) + "\n")
        self.file.flush()

    def start(self, meta: dict) -> None:
        self._write({"type": "meta", **meta})

    def step(self, r: StepRecord) -> None:
        self._write({"type": "step", "step": r.step, "loss": _json_value(r.loss),
                     "metrics": {k: [_json_value(float(v)) for v in vs] for k, vs in r.metrics.items()},
                     "grad_norm": None if r.grad_norm is None else [_json_value(float(v)) for v in r.grad_norm],
                     **({} if r.grad_scale is None else {"grad_scale": _json_value(float(r.grad_scale))})})

    def issue(self, issue: Finding) -> None:
        d = issue.to_dict(ISSUE_KEYS)
        self._write({**d, "type": "issue", "issue": d["type"]})

    def intervention(self, entry: dict) -> None:
        self._write({"type": "intervention", **{k: _json_value(v) for k, v in entry.items()}})

    def close(self) -> None:
        self.file.close()


class CSVEmitter(Emitter):
    """Long format, one row per value: step, series, metric, value (loss and grad norms included)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        new = not self.path.exists() or self.path.stat().st_size == 0
        self.file = open(self.path, "a", encoding="utf-8", newline="")
        self.writer = csv.writer(self.file)
        if new:
            self.writer.writerow(["step", "metric", "series", "value"])

    def step(self, r: StepRecord) -> None:
        for name, v in r.scalars().items():
            metric, _, series = name.partition("/")
            self.writer.writerow([r.step, metric, series, repr(float(v))])
        self.file.flush()

    def close(self) -> None:
        self.file.close()


STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}


class ConsoleEmitter(Emitter):
    """Rich lines on stderr for warnings and interventions (text printed literally, never as markup)."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)

    def issue(self, issue: Finding) -> None:
        line = Text(f"step {issue.step:>6} ", style="dim")
        line.append(f"{'✗' if issue.severity == 'error' else '⚠'} {issue.type}", style=STYLE.get(issue.severity, ""))
        line.append(f" {issue.where}: {issue.message}")
        self.console.print(line, soft_wrap=True)

    def intervention(self, entry: dict) -> None:
        line = Text(f"step {entry['step']:>6} ", style="dim")
        line.append(f"→ {entry['action']}", style="bold green")
        line.append(f" {entry.get('detail', '')} (because {entry.get('reason', '')})")
        self.console.print(line, soft_wrap=True)


def _sites(meta: dict) -> list[Site]:
    """The site of each series, from the meta line's ``heads``."""
    return [Site(h["layer"], h.get("stack", ""), h.get("kind", "self")) for h in meta.get("heads", [])]


def marker_scalars(rows) -> list[tuple[int, dict[str, float]]]:
    """``Markers`` rows as scalars, per step: ``markers/warnings/<site>`` (new warnings naming that
    layer's attention), ``markers/warnings/model`` (naming none), ``markers/interventions``."""
    return [(step, {**{f"markers/warnings/{'model' if site is None else series_name(site)}": float(n)
                       for site, n in warnings.items()}, "markers/interventions": float(interventions)})
            for step, warnings, interventions in rows]


class TensorBoardEmitter(Emitter):
    """Per-head scalars (``attnkit/entropy/L0H1``, ``attnkit/logit_absmax/L0H1``, ...) to a
    ``SummaryWriter`` (given, e.g. Lightning's ``logger.experiment``, or made on ``log_dir``);
    warnings and interventions as text and as marker series (``attnkit/markers/warnings/L0``,
    ``attnkit/markers/warnings/model``, ``attnkit/markers/interventions``: the count at each observed
    step, 0 when none); a custom-scalars layout with one section per layer (charts: max |logit| with
    a line per head, entropy with a line per head, the markers); on close, the per-head entropy
    heatmap over the last ``heatmap_steps`` observed steps as an image."""

    records_repeats = True

    def __init__(self, log_dir: str | Path | None = None, writer=None, prefix: str = "attnkit",
                 heatmap_steps: int = 512) -> None:
        if writer is None:
            require("tensorboard", "the monitor's TensorBoard output")
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(log_dir=str(log_dir))
            self._own = True
        else:
            self._own = False
        self.writer, self.prefix = writer, prefix
        self._entropy: deque = deque(maxlen=heatmap_steps)  # (step, per-head entropy) for the heatmap image
        self._series: list[str] = []
        self.markers = Markers([])

    def start(self, meta: dict) -> None:
        sites = _sites(meta)
        self.markers = Markers(sites)
        if hasattr(self.writer, "add_custom_scalars"):  # a writer handed over may be a plain scalar logger
            self.writer.add_custom_scalars(self.layout(sites))

    def layout(self, sites: list[Site]) -> dict:
        """``add_custom_scalars``' layout: a section per layer, each chart a line per head (regexes on
        the tags, anchored, so layer 1 never picks up layer 10 nor another stack's layer 1)."""
        p = re.escape(self.prefix)
        sections = {}
        for site, _ in by_site(sites):
            name = re.escape(series_name(site))
            markers = [f"^{p}/markers/warnings/{name}$", f"^{p}/markers/warnings/model$",
                       f"^{p}/markers/interventions$"]
            sections[f"{self.prefix} {site}"] = {
                f"{site}: max |logit| per head": ["Multiline", [rf"^{p}/logit_absmax/{name}H\d+$"]],
                f"{site}: entropy per head (nats)": ["Multiline", [rf"^{p}/entropy/{name}H\d+$"]],
                f"{site}: new warnings (this layer, whole model) and interventions": ["Multiline", markers],
            }
        return sections

    def step(self, r: StepRecord) -> None:
        self._markers(self.markers.observed(r.step))
        for name, v in r.scalars().items():
            self.writer.add_scalar(f"{self.prefix}/{name}", float(v), r.step)
        self._series = [series_name(s, h) for s, h in r.series]
        self._entropy.append((r.step, list(r.metrics["entropy"])))

    def _markers(self, rows) -> None:
        for step, scalars in marker_scalars(rows):
            for name, v in scalars.items():
                self.writer.add_scalar(f"{self.prefix}/{name}", v, step)

    def _heatmap(self) -> None:
        """The per-head entropy heatmap over the last observed steps, as an image at the last step."""
        if len(self._entropy) < 2:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [s for s, _ in self._entropy]
        fig, ax = plt.subplots(figsize=(8, max(2.5, 0.2 * len(self._series) + 1)))
        im = ax.imshow([list(col) for col in zip(*(v for _, v in self._entropy))], aspect="auto", cmap="viridis",
                       interpolation="nearest", extent=(steps[0], steps[-1], len(self._series) - 0.5, -0.5))
        ax.set_yticks(range(len(self._series)), self._series, fontsize=6)
        ax.set_xlabel("step")
        ax.set_title("attention entropy per head (nats)")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        self.writer.add_figure(f"{self.prefix}/entropy_heatmap", fig, steps[-1])
        plt.close(fig)

    def issue(self, issue: Finding) -> None:
        if issue.step is not None:
            self.markers.warning(issue.step, site_of(issue))
        self.writer.add_text(f"{self.prefix}/issues", f"{issue.type} {issue.where}: {issue.message}", issue.step)

    def intervention(self, entry: dict) -> None:
        self.markers.intervention(entry["step"])
        self.writer.add_text(f"{self.prefix}/interventions", f"{entry['action']}: {entry.get('detail', '')}",
                             entry["step"])

    def close(self) -> None:
        self._markers(self.markers.flush())
        self._heatmap()
        self.writer.flush()
        if self._own:
            self.writer.close()


class WandbEmitter(Emitter):
    """``wandb.log`` of the same scalars and marker series as TensorBoard, warnings and interventions
    as text; on close, per layer a line chart of each head's max |logit| and one of its entropy over
    the last ``panel_steps`` observed steps (``attnkit/panel/<layer>/...``). ``mode="offline"``
    writes a local run directory only."""

    records_repeats = True

    def __init__(self, log_dir: str | Path, mode: str = "offline", run=None, panel_steps: int = 512,
                 **init_kwargs) -> None:
        self._own = run is None
        if run is None:
            # wandb writes under dir/wandb; older releases fall back to ./wandb when dir does not exist yet
            Path(log_dir, "wandb").mkdir(parents=True, exist_ok=True)
            run = require("wandb", "the monitor's Weights & Biases output").init(dir=str(log_dir), mode=mode,
                                                                                **init_kwargs)
        self.run = run
        self.markers = Markers([])
        self._history: deque = deque(maxlen=panel_steps)  # (step, head metrics) for the per-layer charts
        self._series: list[tuple[Site, int]] = []

    def start(self, meta: dict) -> None:
        self.markers = Markers(_sites(meta))

    def step(self, r: StepRecord) -> None:
        self._markers(self.markers.observed(r.step))
        self.run.log({f"attnkit/{k}": v for k, v in r.scalars().items()}, step=r.step)
        self._series = list(r.series)
        self._history.append((r.step, r.head_metrics()))

    def _markers(self, rows) -> None:
        for step, scalars in marker_scalars(rows):
            self.run.log({f"attnkit/{k}": v for k, v in scalars.items()}, step=step)

    def issue(self, issue: Finding) -> None:
        if issue.step is not None:
            self.markers.warning(issue.step, site_of(issue))
        self.run.log({"attnkit/issue": f"{issue.type} {issue.where}: {issue.message}"}, step=issue.step)

    def intervention(self, entry: dict) -> None:
        self.markers.intervention(entry["step"])
        self.run.log({"attnkit/intervention": f"{entry['action']}: {entry.get('detail', '')}"}, step=entry["step"])

    def _panel(self) -> None:
        """Per layer, a line per head over the observed steps kept (wandb's own line-series chart)."""
        if not self._history:
            return
        import wandb

        steps = [s for s, _ in self._history]
        charts = {}
        for site, columns in by_site([s for s, _ in self._series]):
            heads = [f"H{self._series[i][1]}" for i in columns]
            for metric, title in (("logit_absmax", "max |logit|"), ("entropy", "entropy (nats)")):
                if metric not in self._history[-1][1]:
                    continue
                ys = [[m[metric][i] for _, m in self._history] for i in columns]
                charts[f"attnkit/panel/{series_name(site)}/{metric}"] = wandb.plot.line_series(
                    xs=steps, ys=ys, keys=heads, title=f"{site}: {title} per head", xname="step")
        self.run.log(charts, step=steps[-1])

    def close(self) -> None:
        self._markers(self.markers.flush())
        self._panel()
        if self._own:
            self.run.finish()


EMITTERS: dict[str, Callable[[Path], Emitter]] = {
    "jsonl": lambda d: JSONLEmitter(d / "monitor.jsonl"),
    "csv": lambda d: CSVEmitter(d / "monitor.csv"),
    "console": lambda d: ConsoleEmitter(),
    "tensorboard": lambda d: TensorBoardEmitter(d / "tensorboard"),
    "wandb": lambda d: WandbEmitter(d),
}
