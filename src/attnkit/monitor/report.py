"""Figures and a summary of a monitored run, from its JSONL (finished or still running): the
monitor's rendering of a run after the fact (``emit.py`` renders it live).

``read_run(run_dir)`` parses ``monitor.jsonl`` (a half-written last line of a running job is
skipped; a log directory reused by several runs: the last one, from its meta line on); ``save_figures(run, out_dir)`` writes, each whole or not at all:

- ``entropy_heatmap.png``: per-head entropy (nats) over training, one row per layer·head;
- ``max_logit.png``: each head's max logit (symmetric log scale) with warning steps (orange) and
  intervention steps (green) marked, and the danger threshold;
- ``curvature.png``: the curvature estimate log10 κ (largest over rows) per head, same marks;
- ``gates.png`` (a model with attnkit gates): each head's mean gate and share of gates below 0.1;
- ``attention_panel.png`` (``attention_panel_2.png``, ... past 8 layers): small multiples, a row per
  layer: each head's largest |logit| and its entropy over the steps, warnings naming that layer (or
  the whole model) and interventions marked, what the TensorBoard and W&B panels show live.

``panel_data(run)`` gives that figure's numbers (``LayerPanel`` per layer); ``summary(run, written)``
the JSON of ``--json``; ``render_summary(run, written, console)`` prints what ``attnkit monitor
report`` shows.
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
from attnkit.monitor.panel import by_site, max_abs_logit, site_of
from attnkit.seam.sites import Site

LAYERS_PER_PANEL = 8  # rows of one attention_panel PNG: more would make each row too small to read


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

    @property
    def sites(self) -> list[Site]:
        """The attention site of each series (column), from the meta line's ``heads``."""
        return [Site(h["layer"], h.get("stack", ""), h.get("kind", "self")) for h in self.meta.get("heads", [])]

    @property
    def heads(self) -> list[int]:
        return [h["head"] for h in self.meta.get("heads", [])]


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
            if n == 0:
                raise UserError(f"{jsonl} is not a monitor log: its first line is not JSON") from None
            raise UserError(f"{jsonl} line {n + 1} is not JSON: the file is damaged") from None
        if not isinstance(obj, dict):
            raise UserError(f"{jsonl} line {n + 1} is not a monitor record: not a file written by AttentionMonitor")
        kind = obj.get("type")
        if kind == "step" and not (isinstance(obj.get("step"), int) and isinstance(obj.get("metrics"), dict)
                                   and all(isinstance(v, list) for v in obj["metrics"].values())):
            raise UserError(f"{jsonl} line {n + 1} is a step without a step number and per-head metrics: "
                            f"the file is damaged")
        if kind in ("issue", "intervention") and not isinstance(obj.get("step"), int):
            raise UserError(f"{jsonl} line {n + 1} is an {kind} without a step: the file is damaged")
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
    # a metric missing from some steps or of uneven width cannot be drawn against the steps: left out
    metrics = {m: np.asarray(v, dtype=float) for m, v in rows.items()
               if len(v) == len(steps) and len({len(r) for r in v}) == 1}
    heads = meta.get("heads")
    width = metrics["entropy"].shape[1] if "entropy" in metrics else None
    if not isinstance(heads, list) or width is None or len(heads) != width or not all(
            isinstance(h, dict) and isinstance(h.get("layer"), int) and isinstance(h.get("head"), int) for h in heads):
        raise UserError(f"{jsonl} does not name the heads of its per-head entropy: "
                        f"not a run written by AttentionMonitor")
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
    return written + save_panels(run, out)


@dataclass
class LayerPanel:
    """One layer's row of the panel: its heads' series over the observed steps, and the steps marked."""

    site: Site
    heads: list[int]
    steps: np.ndarray  # (T,) observed steps
    max_abs_logit: np.ndarray  # (T, heads): each head's largest |logit| (its largest logit on runs without logit_min)
    entropy: np.ndarray  # (T, heads), nats
    warnings: list[dict]  # {"step", "issue", "head"}: warnings naming this layer's attention or the whole model
    interventions: list[dict]  # {"step", "action"}: every intervention (each acts on the whole model)
    logit_label: str = "max |logit|"


def panel_data(run: Run) -> list[LayerPanel]:
    """The numbers of the per-layer panel, from what the monitor wrote: a ``LayerPanel`` per
    attention site, in model order."""
    steps = np.asarray(run.steps)
    logit_label = "max |logit|"
    if "logit_min" in run.metrics:
        logits = max_abs_logit(run.metrics["logit_max"], run.metrics["logit_min"])
    else:  # a run recorded before the monitor kept each head's smallest logit: its largest, signed
        logits, logit_label = run.metrics["logit_max"], "max logit"
    panels = []
    for site, columns in by_site(run.sites):
        heads = [run.heads[i] for i in columns]
        warned = [{"step": i["step"], "issue": i.get("issue", "?"), "head": i.get("head")} for i in run.issues
                  if site_of(i) in (site, None)]
        acted = [{"step": e["step"], "action": e.get("action", "?")} for e in run.interventions]
        panels.append(LayerPanel(site, heads, steps, logits[:, columns], run.metrics["entropy"][:, columns],
                                 warned, acted, logit_label))
    return panels


WARNING_STYLE = {"color": "tab:orange", "ls": (0, (4, 2)), "lw": 1.6}
INTERVENTION_STYLE = {"color": "tab:green", "ls": "-", "lw": 2.2}
DANGER_STYLE = {"color": "tab:red", "ls": ":", "lw": 1.0}


def head_styles(heads: list[int]) -> dict[int, dict]:
    """A line style per head, the same in every row: 14 colours, none of them the markers' orange,
    green or red, then the same colours dashed, then dotted (models with 32 or 64 heads)."""
    import matplotlib.pyplot as plt

    tab20 = plt.get_cmap("tab20").colors
    palette = [c for i, c in enumerate(tab20) if i not in (2, 3, 4, 5, 6, 7)]  # no orange, green, red
    palette = palette[0::2] + palette[1::2]  # the strong colours first, then their light pairs
    dashes = ("-", (0, (5, 2)), (0, (1, 1.5)))
    return {h: {"color": palette[i % len(palette)], "ls": dashes[i // len(palette) % len(dashes)]}
            for i, h in enumerate(heads)}


def _panel_figure(rows: list[LayerPanel], danger: float | None):
    """Small multiples: a row per layer, max |logit| (log scale) and entropy per head side by side,
    head colours the same in every row, warning and intervention steps as vertical lines (the
    warned head named above its warning on the max |logit| side)."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    heads = sorted({h for row in rows for h in row.heads})
    style_of = head_styles(heads)
    legend = [Line2D([], [], **WARNING_STYLE, label="warning"),
              Line2D([], [], **INTERVENTION_STYLE, alpha=0.55, label="intervention")]
    if danger:
        legend.append(Line2D([], [], **DANGER_STYLE, label=f"danger {danger:g}"))
    short = len(heads) > 8  # "H12": 11 to a legend row
    legend += [Line2D([], [], **style_of[h], lw=1.5, label=f"H{h}" if short else f"head {h}") for h in heads]
    columns = min(len(legend), 11 if short else 8)
    legend_rows = -(-len(legend) // columns)
    dots = {"marker": ".", "ms": 3} if max(len(row.steps) for row in rows) <= 40 else {}
    fig, axes = plt.subplots(len(rows), 2, figsize=(11, 2.2 * len(rows) + 0.4 + 0.3 * legend_rows), sharex=True,
                             squeeze=False)
    for (ax_logit, ax_entropy), row in zip(axes, rows):
        for column, head in enumerate(row.heads):
            style = {**style_of[head], "lw": 1.2, "zorder": 3, **dots}
            ax_logit.plot(row.steps, row.max_abs_logit[:, column], **style)
            ax_entropy.plot(row.steps, row.entropy[:, column], **style)
        if danger:
            ax_logit.axhline(danger, **DANGER_STYLE, zorder=2)
        if row.logit_label == "max |logit|":
            ax_logit.set_yscale("log")  # exponential growth reads as a straight line (|logit| > 0)
        else:  # a signed largest logit may be negative (a head that attends by avoidance)
            ax_logit.set_yscale("symlog", linthresh=1.0)
        warned = sorted({w["step"] for w in row.warnings})
        for ax in (ax_logit, ax_entropy):
            for step in sorted({e["step"] for e in row.interventions}):
                ax.axvline(step, **INTERVENTION_STYLE, alpha=0.55, zorder=1)
            for step in warned:  # over the interventions: a step with both shows both colours
                ax.axvline(step, **WARNING_STYLE, alpha=0.9, zorder=2)
            ax.grid(alpha=0.25)
            ax.tick_params(labelsize=8)
        if len(warned) <= 8:
            for step in warned:
                named = sorted({w["head"] for w in row.warnings if w["step"] == step and w["head"] is not None})
                text = ",".join(f"H{h}" for h in named) or "model"
                ax_logit.annotate(text, (step, 1.0), xycoords=("data", "axes fraction"), xytext=(2, -2),
                                  textcoords="offset points", va="top", fontsize=7, color="tab:orange")
        ax_logit.set_ylabel(f"{row.site}\n{row.logit_label}", fontsize=9)
        ax_entropy.set_ylabel("entropy (nats)", fontsize=9)
    axes[0, 0].set_title(f"{rows[0].logit_label} per head (log scale)", fontsize=10)
    axes[0, 1].set_title("attention entropy per head", fontsize=10)
    for ax in axes[-1]:
        ax.set_xlabel("step")
    # read across, markers first: matplotlib fills a legend column by column, so place each entry
    # (row r, column c) at c * rows + r, blanks padding the last row
    blank = Line2D([], [], alpha=0, label=" ")
    padded = legend + [blank] * (legend_rows * columns - len(legend))
    across = [padded[r * columns + c] for c in range(columns) for r in range(legend_rows)]
    fig.legend(handles=across, loc="upper center", ncol=columns, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 * legend_rows / fig.get_figheight()))
    return fig


def save_panels(run: Run, out_dir: str | Path) -> list[Path]:
    """``attention_panel.png`` (and ``_2``, ``_3``, ... beyond ``LAYERS_PER_PANEL`` layers) in
    ``out_dir``, each written whole."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = panel_data(run)
    danger = run.meta.get("thresholds", {}).get("logit_danger")
    danger = danger if isinstance(danger, (int, float)) else None
    written = []
    for page, first in enumerate(range(0, len(panels), LAYERS_PER_PANEL), start=1):
        fig = _panel_figure(panels[first:first + LAYERS_PER_PANEL], danger)
        name = "attention_panel.png" if page == 1 else f"attention_panel_{page}.png"
        written.append(_save(fig, Path(out_dir) / name))
        plt.close(fig)
    return written


def _finite(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None


def summary(run: Run, written: list[Path]) -> dict:
    """``attnkit monitor report --json``: the run's steps, each head's peak max |logit| (and its step),
    first and last entropy, the warnings, the interventions and the figures written."""
    layers = []
    for panel in panel_data(run):
        heads = []
        for column, head in enumerate(panel.heads):
            logits, entropy = panel.max_abs_logit[:, column], panel.entropy[:, column]
            peak = int(np.nanargmax(logits)) if np.isfinite(logits).any() else None
            seen = np.flatnonzero(np.isfinite(entropy))
            heads.append({"head": head,
                          "peak_max_abs_logit": None if peak is None else _finite(logits[peak]),
                          "peak_step": None if peak is None else int(panel.steps[peak]),
                          "last_max_abs_logit": _finite(logits[-1]),
                          "first_entropy": _finite(entropy[seen[0]]) if len(seen) else None,
                          "last_entropy": _finite(entropy[seen[-1]]) if len(seen) else None})
        layers.append({"site": str(panel.site), "layer": panel.site.layer, "stack": panel.site.stack,
                       "kind": panel.site.kind, "heads": heads})
    return {
        "run_dir": str(run.path),
        "observed_steps": len(run.steps), "first_step": run.steps[0], "last_step": run.steps[-1],
        "logit": "max |logit|" if "logit_min" in run.metrics else "max logit",
        "loss": {"first": _finite(run.losses[0][1]), "first_step": run.losses[0][0], "last": _finite(run.losses[-1][1]),
                 "last_step": run.losses[-1][0]} if run.losses else None,
        "layers": layers,
        "warnings": [{"step": i["step"], "issue": i.get("issue"), "severity": i.get("severity"),
                      "layer": i.get("layer"), "head": i.get("head"), "message": i.get("message", "")}
                     for i in run.issues],
        "interventions": [{"step": e["step"], "action": e.get("action"), "detail": e.get("detail", ""),
                           "reason": e.get("reason", "")} for e in run.interventions],
        "figures": [str(p) for p in written],
    }


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
