"""Figures: the layer x head grid of ``attnkit analyze`` as a heatmap, each cell with its value and issues."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np

from attnkit.analyze.diagnose import ISSUE_LETTERS
from attnkit.common.io import write_atomic

if TYPE_CHECKING:  # Analysis.plot_heatmap draws with this module: a type, not an import at run time
    from attnkit.analyze.run import Analysis

SEVERITY_FRAME = {"error": "#cf222e", "warning": "#f0883e"}  # info findings get no frame: they are many and benign


def entropy_heatmap_png(a: Analysis, metric: str = "normalized_entropy") -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    layers = a.layers
    num_heads = max(h["head"] for h in a.heads) + 1
    grid = np.full((len(layers), num_heads), np.nan)
    for h in a.heads:
        grid[layers.index(h["layer"]), h["head"]] = h[metric] if h[metric] is not None else np.nan
    fig, ax = plt.subplots(figsize=(1.6 + 0.62 * num_heads, 1.5 + 0.5 * len(layers)))
    normalised = metric == "normalized_entropy"
    im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1 if normalised else None, aspect="auto")
    letters: dict[tuple[int, int], set[str]] = {}
    worst: dict[tuple[int, int], str] = {}
    for issue in a.issues:  # sorted most severe first
        if issue.layer in layers and issue.head is not None:
            key = (layers.index(issue.layer), issue.head)
            letters.setdefault(key, set()).add(ISSUE_LETTERS[issue.type])
            worst.setdefault(key, issue.severity)
    low, high = np.nanmin(grid) if np.isfinite(grid).any() else 0.0, np.nanmax(grid) if np.isfinite(grid).any() else 1.0
    for row in range(len(layers)):
        for head in range(num_heads):
            value = grid[row, head]
            if np.isnan(value):
                continue
            dark = (value - low) / ((high - low) or 1.0) < 0.6 if not normalised else value < 0.6
            label = f"{value:.2f}" + "".join(sorted(letters.get((row, head), ())))
            ax.text(head, row, label, ha="center", va="center", fontsize=8, color="white" if dark else "black")
            if worst.get((row, head)) in SEVERITY_FRAME:
                ax.add_patch(Rectangle((head - 0.47, row - 0.47), 0.94, 0.94, fill=False, linewidth=2,
                                       edgecolor=SEVERITY_FRAME[worst[(row, head)]]))
    ax.set_xticks(range(num_heads))
    ax.set_yticks(range(len(layers)), [str(x) for x in layers])
    ax.tick_params(length=0)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    what = "normalised entropy H/ln n (1 = uniform, 0 = one key)" if normalised else metric.replace("_", " ")
    ax.set_title(f"{a.model}: {what}".replace("$", r"\$"), fontsize=10)  # no mathtext from a path
    used = [t for t in ISSUE_LETTERS if any(i.type == t and i.head is not None for i in a.issues)]
    if used:
        legend = "Letters: " + ", ".join(f"{ISSUE_LETTERS[t]} {t.replace('_', ' ')}" for t in used)
        frames = [f"{color_name} frame: {severity}" for severity, color_name in (("error", "red"), ("warning", "orange"))
                  if severity in worst.values()]
        fig.text(0.01, 0.01, legend + (" · " + ", ".join(frames) if frames else ""), fontsize=8)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout(rect=(0, 0.04 if used else 0, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def save_entropy_heatmap(a: Analysis, path: str) -> None:
    write_atomic(path, entropy_heatmap_png(a))
