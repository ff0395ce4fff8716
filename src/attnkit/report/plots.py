"""Figures: the layer x head grid as a heatmap, issues marked."""

from __future__ import annotations

import io

import numpy as np

from attnkit.analyze.diagnose import ISSUE_LETTERS
from attnkit.analyze.run import Analysis
from attnkit.report.io import write_atomic


def entropy_heatmap_png(a: Analysis, metric: str = "normalized_entropy") -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = a.layers
    num_heads = max(h["head"] for h in a.heads) + 1
    grid = np.full((len(layers), num_heads), np.nan)
    for h in a.heads:
        grid[layers.index(h["layer"]), h["head"]] = h[metric] if h[metric] is not None else np.nan
    fig, ax = plt.subplots(figsize=(1.2 + 0.5 * num_heads, 1.2 + 0.45 * len(layers)))
    im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1 if metric == "normalized_entropy" else None, aspect="auto")
    for issue in a.issues:
        if issue.layer in layers and issue.head is not None:
            color = {"error": "red", "warning": "orange", "info": "white"}[issue.severity]
            ax.text(issue.head, layers.index(issue.layer), ISSUE_LETTERS[issue.type],
                    ha="center", va="center", color=color, fontsize=9, fontweight="bold")
    ax.set_xticks(range(num_heads))
    ax.set_yticks(range(len(layers)), [str(x) for x in layers])
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(f"{a.model}: {metric.replace('_', ' ')}")
    used = sorted({i.type for i in a.issues if i.head is not None})
    if used:
        legend = "   ".join(f"{ISSUE_LETTERS[t]} {t.replace('_', ' ')}" for t in used)
        fig.text(0.01, 0.01, legend + "   (red error, orange warning, white info)", fontsize=7)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    return buf.getvalue()


def save_entropy_heatmap(a: Analysis, path: str) -> None:
    write_atomic(path, entropy_heatmap_png(a))
