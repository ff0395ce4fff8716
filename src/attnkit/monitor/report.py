"""Figures and a summary of a monitored run, from its JSONL (finished or still running): the
monitor's rendering of a run after the fact (``emit.py`` renders it live).

``read_run(run_dir)`` parses ``monitor.jsonl`` (a half-written last line of a running job is
skipped; a log directory reused by several runs: the last one, from its meta line on); ``save_figures(run, out_dir)`` writes, each whole or not at all:

- ``entropy_heatmap.png``: per-head entropy (nats) over training, one row per layer·head;
- ``max_logit.png``: each head's max logit (symmetric log scale) with warning steps (orange) and
  intervention steps (green) marked, and the danger threshold;
- ``curvature.png``: the curvature estimate log10 κ (largest over rows) per head, same marks;
- ``gates.png`` (a model with attnkit gates): each head's mean gate and share of gates below 0.1.

``render_summary(run, written, console)`` prints what ``attnkit monitor report`` shows.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.text import Text

from attnkit.errors import UserError


@dataclass
class Run:
    path: Path
    meta: dict
    steps: list[int]
    metrics: dict[str, np.ndarray]  # metric -> (steps, series)
    losses: list[tuple[int, float]]
    issues: list[dict] = field(default_factory=list)
    interventions: list[dict] = field(default_factory=list)

    @property
    def series(self) -> list[str]:
        return self.meta.get("series", [])


def _num(v) -> float:
    if v is None:
        return float("nan")
    if isinstance(v, str):
        return float(v)  # "inf" / "-inf"
    return float(v)


def read_run(run_dir: str | Path) -> Run:
    path = Path(run_dir)
    jsonl = path / "monitor.jsonl" if path.is_dir() else path
    if not path.exists():
        raise UserError(f"run directory {run_dir} does not exist")
    if not jsonl.is_file():
        raise UserError(f"{run_dir} has no monitor.jsonl: not a directory written by AttentionMonitor")
    meta: dict = {}
    steps, rows, losses, issues, interventions = [], {}, [], [], []
    lines = jsonl.read_text(encoding="utf-8", errors="replace").splitlines()
    for n, line in enumerate(lines):
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines) - 1:
                continue  # a running job's half-written last line
            raise UserError(f"{jsonl} line {n + 1} is not JSON: the file is damaged") from None
        kind = obj.get("type")
        if kind == "meta":  # a new run in the same file: the figures are of the latest
            meta = obj
            steps, rows, losses, issues, interventions = [], {}, [], [], []
        elif kind == "step":
            steps.append(int(obj["step"]))
            for m, vs in obj["metrics"].items():
                rows.setdefault(m, []).append([_num(v) for v in vs])
            if obj.get("grad_norm") is not None:
                rows.setdefault("grad_norm", []).append([_num(v) for v in obj["grad_norm"]])
            if obj.get("loss") is not None:
                losses.append((int(obj["step"]), _num(obj["loss"])))
        elif kind == "issue":
            issues.append(obj)
        elif kind == "intervention":
            interventions.append(obj)
    if not steps:
        raise UserError(f"{jsonl} has no observed step yet")
    metrics = {m: np.asarray(v, dtype=float) for m, v in rows.items() if len({len(r) for r in v}) == 1}
    return Run(jsonl.parent, meta, steps, metrics, losses, issues, interventions)


def _save(fig, path: Path) -> Path:
    from attnkit.common.io import write_atomic

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    write_atomic(path, buf.getvalue())
    return path


def _marks(ax, run: Run) -> None:
    for step in sorted({i["step"] for i in run.issues}):
        ax.axvline(step, color="tab:orange", lw=0.8, ls="--", alpha=0.7)
    for step in sorted({i["step"] for i in run.interventions}):
        ax.axvline(step, color="tab:green", lw=1.2, alpha=0.8)


def save_figures(run: Run, out_dir: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    steps = np.asarray(run.steps)
    series = run.series or [str(i) for i in range(run.metrics["entropy"].shape[1])]
    written = []

    ent = run.metrics["entropy"].T
    fig, ax = plt.subplots(figsize=(9, max(2.5, 0.22 * len(series) + 1.2)))
    extent = (steps[0], steps[-1] if len(steps) > 1 else steps[0] + 1, len(series) - 0.5, -0.5)
    im = ax.imshow(ent, aspect="auto", cmap="viridis", interpolation="nearest", extent=extent)
    ax.set_yticks(range(len(series)), series, fontsize=7 if len(series) < 40 else 5)
    ax.set_xlabel("step")
    ax.set_title("attention entropy per head (nats)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    written.append(_save(fig, out / "entropy_heatmap.png"))
    plt.close(fig)

    legend = [Line2D([], [], color="tab:orange", ls="--", label="warning"),
              Line2D([], [], color="tab:green", label="intervention")]
    for metric, name, title, log in (("logit_max", "max_logit.png", "max attention logit per head", True),
                                     ("log10_curvature_max", "curvature.png", "log10 curvature κ (max over rows)",
                                      False)):
        if metric not in run.metrics:
            continue
        fig, ax = plt.subplots(figsize=(9, 4))
        values = run.metrics[metric]
        for i, label in enumerate(series):
            ax.plot(steps, values[:, i], lw=0.8, label=label if len(series) <= 12 else None)
        danger = run.meta.get("thresholds", {}).get("logit_danger") if metric == "logit_max" else None
        if danger:
            ax.axhline(danger, color="tab:red", lw=0.8, ls=":")
            legend.append(Line2D([], [], color="tab:red", ls=":", label=f"danger {danger:g}"))
        if log:  # symlog: max logits can be negative (a head that attends by avoidance)
            ax.set_yscale("symlog", linthresh=1.0)
        _marks(ax, run)
        ax.set_xlabel("step")
        ax.set_title(title)
        handles = ax.get_legend_handles_labels()[0] + legend
        ax.legend(handles=handles, fontsize=6, ncol=2 if len(handles) > 8 else 1, loc="best")
        fig.tight_layout()
        written.append(_save(fig, out / name))
        plt.close(fig)
    if "mean_gate" in run.metrics and np.isfinite(run.metrics["mean_gate"]).any():
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for ax, metric, title in ((axes[0], "mean_gate", "mean gate per head"),
                                  (axes[1], "gate_low_share", "share of gates below 0.1")):
            for i, label in enumerate(series):
                ax.plot(steps, run.metrics[metric][:, i], lw=0.8, label=label if len(series) <= 12 else None)
            _marks(ax, run)
            ax.set_xlabel("step")
            ax.set_title(title)
            ax.set_ylim(-0.02, 1.02)
        axes[0].legend(fontsize=6, ncol=2 if len(series) > 8 else 1)
        fig.tight_layout()
        written.append(_save(fig, out / "gates.png"))
        plt.close(fig)
    return written


def gate_summary(run: Run) -> str | None:
    """One line: the heads' mean gate and share below 0.1 at the first and last observed step."""
    if "mean_gate" not in run.metrics:
        return None
    mean, low = run.metrics["mean_gate"], run.metrics.get("gate_low_share")
    ok = np.flatnonzero(np.isfinite(mean).any(axis=1))
    if not len(ok):
        return None
    a, b = ok[0], ok[-1]
    text = (f"gates: mean {np.nanmean(mean[a]):.3f} at step {run.steps[a]} → {np.nanmean(mean[b]):.3f} at step "
            f"{run.steps[b]} (heads {np.nanmin(mean[b]):.3f}..{np.nanmax(mean[b]):.3f})")
    if low is not None:
        text += f"; share below 0.1 {np.nanmean(low[a]):.3f} → {np.nanmean(low[b]):.3f}"
    return text


def render_summary(run: Run, written: list[Path], console) -> None:
    """The run in a few lines on ``console`` (a rich Console): steps and heads, the loss, the gates, the
    warnings (the first 10), the interventions (the first 10) and the figures ``written``."""
    console.print(Text(f"{run.path}: {len(run.steps)} observed steps ({run.steps[0]}..{run.steps[-1]}), "
                       f"{len(run.series)} heads", style="bold"))
    if run.losses:
        console.print(Text(f"loss {run.losses[0][1]:.4g} at step {run.losses[0][0]} → {run.losses[-1][1]:.4g} "
                           f"at step {run.losses[-1][0]}"))
    gates = gate_summary(run)
    if gates:
        console.print(Text(gates))
    counts = Counter(i.get("issue", "?") for i in run.issues)
    if counts:
        console.print(Text("warnings: " + ", ".join(f"{k} ×{v}" for k, v in counts.most_common()), style="yellow"))
        for issue in run.issues[:10]:
            where = f"layer {issue['layer']} head {issue['head']}" if issue.get("layer") is not None else "model"
            console.print(Text(f"  step {issue['step']:>6} {issue.get('issue')} {where}: {issue.get('message', '')}"))
        if len(run.issues) > 10:
            console.print(Text(f"  ... {len(run.issues) - 10} more in the JSONL"))
    else:
        console.print(Text("no warnings", style="green"))
    for entry in run.interventions[:10]:
        console.print(Text(f"  step {entry['step']:>6} → {entry['action']}: {entry.get('detail', '')}", style="green"))
    for p in written:
        console.print(Text(f"wrote {p}"))
