"""The seed's four figures from robustness_evaluation_results.json (mean over seeds, band = min..max)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

COLORS = {"ungated": "tab:red", "gated": "tab:blue"}


def _series(runs: dict, key) -> tuple[np.ndarray, np.ndarray]:
    rows = [[key(r) for r in hist] for hist in runs.values()]
    n = min(len(r) for r in rows)
    a = np.array([[np.nan if v is None else v for v in r[:n]] for r in rows], dtype=float)
    return np.array([r["epoch"] for r in next(iter(runs.values()))[:n]]), a


def _band(ax, runs, key, label, color):
    if not runs:
        return
    x, a = _series(runs, key)
    ax.plot(x, np.nanmean(a, 0), color=color, label=f"{label} ({a.shape[0]} seeds)")
    ax.fill_between(x, np.nanmin(a, 0), np.nanmax(a, 0), color=color, alpha=0.2)


def make_plots(results: dict, out: Path) -> None:
    runs, rec = results["runs"], results.get("recovery", {})
    panels = [("normalized_entropy", "attention entropy H / ln 50 (1 = uniform)"),
              ("dist_from_uniform", "mean |p − 0.02|")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (k, title) in zip(axes, panels):
        for label, r in runs.items():
            _band(ax, r, lambda row, k=k: row[k], label, COLORS[label])
        ax.set_title(title); ax.set_xlabel("epoch"); ax.legend()
    fig.tight_layout(); fig.savefig(out / "attention_entropy_comparison.png", dpi=110); plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (k, title) in zip(axes, [("uniqueness", "weight-uniqueness ratio"), ("diversity", "output diversity / averaging's"),
                                    ("wasserstein", "mean Wasserstein-1 between predictions")]):
        for label, r in runs.items():
            _band(ax, r, lambda row, k=k: row[k], label, COLORS[label])
        ax.set_title(title); ax.set_xlabel("epoch"); ax.legend()
    fig.tight_layout(); fig.savefig(out / "weight_uniqueness_analysis.png", dpi=110); plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for label, r in runs.items():
        _band(axes[0], r, lambda row: row["merged_accuracy"], label, COLORS[label])
        _band(axes[1], r, lambda row: row["loss"], label, COLORS[label])
    b = results["baselines"]
    axes[0].axhline(b["weight_averaging"], color="gray", ls="--", label="weight averaging")
    axes[0].axhline(b["model_a"], color="gray", ls=":", label="input model A alone")
    axes[0].set_title("merged accuracy on both clients"); axes[0].legend()
    axes[1].set_title("training loss"); axes[1].legend()
    for label, hist in rec.items():
        axes[2].plot([r["epoch"] for r in hist], [r["normalized_entropy"] for r in hist], color=COLORS[label],
                     label=f"recovery, {label}")
    axes[2].set_title("from the collapsed checkpoint: H / ln 50"); axes[2].legend()
    for ax in axes:
        ax.set_xlabel("epoch")
    fig.tight_layout(); fig.savefig(out / "gated_vs_ungated_comparison.png", dpi=110); plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, r in runs.items():
        _band(axes[0], r, lambda row: row["grad_norm"]["mean"] if row["grad_norm"] else None, label, COLORS[label])
        _band(axes[1], r, lambda row: row["grad_norm"]["cv"] if row["grad_norm"] else None, label, COLORS[label])
    axes[0].set_title("gradient norm (epoch mean)"); axes[0].set_yscale("log"); axes[0].legend()
    axes[1].set_title("gradient-norm coefficient of variation"); axes[1].legend()
    for ax in axes:
        ax.set_xlabel("epoch")
    fig.tight_layout(); fig.savefig(out / "gradient_norm_stability.png", dpi=110); plt.close(fig)
