"""Figures of ``attnkit sparse eval``: every pattern's density ↔ fidelity curve on one figure."""

from __future__ import annotations

import io
from collections.abc import Sequence

from attnkit.common.io import write_atomic
from attnkit.sparse.evaluate import series_of

# (result key, axis label, log scale, the fidelity target's line or None)
PANELS = (
    ("kl", "next-token KL(dense ‖ sparse), nats", True, 1e-3),
    ("perplexity_ratio", "perplexity / dense perplexity", False, None),
    ("prob_mse", "attention-probability MSE", True, 1e-4),
    ("grad_cosine_min", "gradient cosine (worst layer)", False, 0.95),
)


def density_curves_png(results: Sequence[dict], seq_len: int, title: str = "") -> bytes:
    """One panel per metric of ``PANELS``; in each, a line per series (a pattern, or a pattern with its
    layer budget: ``series`` of each result) over the densities measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results if r["seq_len"] == seq_len]
    panels = [p for p in PANELS if any(p[0] in r for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    # a line per series: a pattern in its own colour, solid; the same pattern with a layer budget dashed
    patterns = sorted({r["pattern"] for r in rows}, key=lambda p: (p == "learned_gate", p))
    colour = {p: f"C{i % 10}" for i, p in enumerate(patterns)}
    series = sorted({(r["pattern"], series_of(r)) for r in rows}, key=lambda ps: (patterns.index(ps[0]), ps[1]))
    for ax, (key, label, log, target) in zip(axes[0], panels):
        for pattern, name in series:
            pts = sorted((r["density"], r[key]) for r in rows if series_of(r) == name and key in r)
            if not pts:
                continue
            xs, ys = zip(*pts)
            ax.plot(xs, [max(y, 1e-12) for y in ys] if log else ys, marker="o", color=colour[pattern],
                    linestyle="-" if name == pattern else "--",
                    linewidth=2.4 if pattern == "learned_gate" else 1.4, label=name)
        if target is not None:
            ax.axhline(target, color="gray", linestyle="--", linewidth=1, label="target")
        ax.set_xscale("log", base=2)
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("density (share of causal key blocks kept)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title or f"sparse attention vs dense, {seq_len} tokens")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def save_density_curves(results: Sequence[dict], seq_len: int, path: str, title: str = "") -> None:
    write_atomic(path, density_curves_png(results, seq_len, title))


def memory_png(rows: Sequence[dict], key: str, label: str, title: str) -> bytes:
    """Peak memory (or time) over sequence length, a line per configuration: rows have
    ``config``, ``seq_len`` and ``key``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for config in dict.fromkeys(r["config"] for r in rows):
        pts = sorted((r["seq_len"], r[key]) for r in rows if r["config"] == config and r.get(key) is not None)
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", label=config)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel(label)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
