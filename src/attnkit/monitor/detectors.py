"""Trend detectors: each a function of the monitor's bounded history, one per kind of trouble.

A detector sees ``Trends`` (the recent observed steps of every (site, head) series, the per-site
gradient norms and the per-step losses) and returns the issues it finds now. ``DETECTORS`` maps
a name to it; ``AttentionMonitor(detectors=[...])`` picks some. Thresholds and why:

- ``logit_growth``: log(max logit) over the last ``window`` observed steps fits a line (R² ≥
  ``fit_r2``) that rose by ≥ ``growth_min``× and reaches ``logit_danger`` within ``horizon``
  window spans, from at least ``logit_floor`` (logits start near 0 and grow while a model learns): exponential growth, the precursor of divergence in Wortsman et al. 2023 and
  ViT-22B. ``logit_danger`` = 100 is MuonClip's τ (Kimi K2).
- ``softmax_saturation``: the instability predictor. At least ``entropy_heads`` of all heads show
  that logit growth (within ``saturation_horizon`` window spans) while at least ``entropy_heads``
  of all heads lost ``entropy_drop`` of their entropy over the same window: the softmax of the
  whole model saturating, not one head specialising. Calibrated on seeds 0-1 of the LR sweep
  (``experiments/monitor_sweep.py``), judged on held-out seeds (README).
- ``overflow_risk``: max logit ≥ ``logit_danger`` now.
- ``entropy_fall``: a head's entropy fell by ≥ ``entropy_drop`` (relative) over the window while
  at least ``entropy_heads`` of all heads did the same: entropy collapse (Zhai et al. 2023)
  across the model, not one head specialising.
- ``entropy_collapse``: a head's mean entropy < 0.5 nats (the usual entropy-collapse threshold).
- ``sink_growth``: a head's first-key mass rose by ≥ ``sink_rise`` over the window to ≥ ``sink_mass``.
- ``grad_spike``: a layer's query/key gradient norm ≥ ``grad_spike``× the largest of the window before.
- ``loss_spike``: a step's loss ≥ the median of the ``loss_window`` steps before + ``loss_spike_nats``,
  or non-finite.
- ``nonfinite``: NaN/Inf logits were observed in a head.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from attnkit.monitor.history import Ring
from attnkit.monitor.issues import Issue
from attnkit.seam.sites import Site


@dataclass
class Thresholds:
    window: int = 8  # observed steps a trend is fitted on
    logit_danger: float = 100.0
    logit_floor: float = 10.0  # growth below this max logit is ordinary learning (logits start near 0)
    growth_min: float = 1.25
    fit_r2: float = 0.8
    horizon: float = 8.0  # projected steps to danger, in window spans
    saturation_horizon: float = 2.0  # the same for softmax_saturation (chosen on the LR sweep's seeds 0-1)
    entropy_drop: float = 0.25
    entropy_heads: float = 0.5
    entropy_collapse: float = 0.5
    sink_mass: float = 0.5
    sink_rise: float = 0.2
    grad_spike: float = 5.0  # x the largest norm of the window before (gradients grow from ~0 at init)
    loss_window: int = 32
    loss_spike_nats: float = 1.0


@dataclass
class Trends:
    """What detectors read: the last observed steps of every series, newest last."""

    series: list[tuple[Site, int]]  # (site, head) of each column
    sites: list[Site]
    steps: np.ndarray  # (n,) observed steps
    metrics: dict[str, np.ndarray]  # metric -> (n, series)
    grad_steps: np.ndarray
    grad_norm: np.ndarray  # (m, sites)
    losses: Ring  # every step's loss
    new_losses: int  # losses added since the last detection
    t: Thresholds

    @property
    def step(self) -> int:
        return int(self.steps[-1])


def _fit(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares slope and R² of each column of y (n, s) against x (n,)."""
    xc = x - x.mean()
    yc = y - y.mean(axis=0)
    sxx = float((xc ** 2).sum()) or 1.0
    slope = (xc[:, None] * yc).sum(axis=0) / sxx
    ss_tot = (yc ** 2).sum(axis=0)
    resid = yc - slope[None, :] * xc[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        r2 = np.where(ss_tot > 0, 1.0 - (resid ** 2).sum(axis=0) / ss_tot, 0.0)
    return slope, r2


def _growth(tr: Trends, min_steps: int, horizon: float):
    """Per series, over the last ``window`` observed steps: is log(max logit) a rising line (R² ≥
    ``fit_r2``, risen ≥ ``growth_min``×, from ≥ ``logit_floor``) that reaches ``logit_danger``
    within ``horizon`` window spans? Returns (hits, slope, projected steps, latest max logit) or
    None when there are too few steps or a non-finite logit (the ``nonfinite`` detector's case)."""
    t = tr.t
    steps, logits = tr.steps[-t.window:], tr.metrics["logit_max"][-t.window:]
    if len(steps) < min_steps or not np.isfinite(logits).all():
        return None
    y = np.log(np.clip(logits, 1e-3, None))
    slope, r2 = _fit(steps.astype(float), y)
    span = float(steps[-1] - steps[0]) or 1.0
    grew = y[-1] - y[0] >= math.log(t.growth_min)
    with np.errstate(divide="ignore", invalid="ignore"):
        projected = np.where(slope > 0, (math.log(t.logit_danger) - y[-1]) / slope, np.inf)
    now = logits[-1]
    hits = (slope > 0) & (r2 >= t.fit_r2) & grew & (projected <= horizon * span) & (now >= t.logit_floor)
    return hits, slope, projected, now


def _entropy_drop(tr: Trends, window: np.ndarray) -> np.ndarray:
    """Relative fall of each head's entropy from the first to the last quarter of the window."""
    q = max(1, len(window) // 4)
    first, last = window[:q].mean(axis=0), window[-q:].mean(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.nan_to_num((first - last) / np.where(first > 0, first, np.nan))


def logit_growth(tr: Trends) -> list[Issue]:
    t = tr.t
    g = _growth(tr, max(4, t.window // 2), t.horizon)
    if g is None:
        return []
    hits, slope, projected, now = g
    hits = hits & (now < t.logit_danger)
    out = []
    all_steps, all_logits = tr.steps, tr.metrics["logit_max"]
    for s in np.flatnonzero(hits):
        site, head = tr.series[s]
        start = int(all_steps[int(np.nanargmin(all_logits[:, s]))])
        doubling = math.log(2) / slope[s]
        out.append(Issue(
            "logit_growth", "warning", tr.step, float(now[s]), t.logit_danger,
            f"max logit {now[s]:.1f} growing exponentially (doubling every {doubling:.0f} steps) since step {start}; "
            f"~{projected[s]:.0f} steps to {t.logit_danger:g}", site, head, start, float(projected[s])))
    return out


def softmax_saturation(tr: Trends) -> list[Issue]:
    """Logit growth *and* entropy fall across the model at once: at least ``entropy_heads`` of all
    heads have max logits growing exponentially toward ``logit_danger`` (within
    ``saturation_horizon`` window spans) while at least ``entropy_heads`` of all heads lost
    ``entropy_drop`` of their entropy over the same window — the softmax saturating, which is what
    precedes the instability in ViT-22B and Wortsman et al. One head's logits growing is a head
    specialising (it fired on half the healthy runs of the LR sweep); the whole model's, with
    entropy going with them, is not. Needs a full window."""
    t = tr.t
    if len(tr.steps) < t.window:
        return []
    g = _growth(tr, t.window, t.saturation_horizon)
    if g is None:
        return []
    growing, slope, projected, now = g
    falling = _entropy_drop(tr, tr.metrics["entropy"][-t.window:]) >= t.entropy_drop
    if growing.mean() < t.entropy_heads or falling.mean() < t.entropy_heads:
        return []
    both = growing & falling
    ent = tr.metrics["entropy"][-1]
    out = []
    for s in np.flatnonzero(both if both.any() else growing):
        site, head = tr.series[s]
        start = int(tr.steps[int(np.nanargmin(tr.metrics["logit_max"][:, s]))])
        out.append(Issue(
            "softmax_saturation", "error", tr.step, float(now[s]), t.logit_danger,
            f"{growing.sum()} of {len(growing)} heads' max logits growing exponentially and {falling.sum()} "
            f"heads' entropy falling ≥{t.entropy_drop:.0%}: max logit {now[s]:.1f}, entropy {ent[s]:.2f} nats, "
            f"since step {start}; ~{max(float(projected[s]), 0.0):.0f} steps to {t.logit_danger:g}",
            site, head, start, max(float(projected[s]), 0.0)))
    return out


def overflow_risk(tr: Trends) -> list[Issue]:
    t, now = tr.t, tr.metrics["logit_max"][-1]
    out = []
    for s in np.flatnonzero(now >= t.logit_danger):
        site, head = tr.series[s]
        out.append(Issue("overflow_risk", "error", tr.step, float(now[s]), t.logit_danger,
                         f"max logit {now[s]:.1f} reached the danger threshold {t.logit_danger:g}", site, head,
                         projected_steps=0.0))
    return out


def entropy_fall(tr: Trends) -> list[Issue]:
    t = tr.t
    steps, ent = tr.steps[-t.window:], tr.metrics["entropy"][-t.window:]
    if len(steps) < max(4, t.window // 2):
        return []
    first, last = ent[: max(1, len(ent) // 4)].mean(axis=0), ent[-max(1, len(ent) // 4):].mean(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        drop = (first - last) / np.where(first > 0, first, np.nan)
    slope, _ = _fit(steps.astype(float), ent)
    falling = np.nan_to_num(drop) >= t.entropy_drop
    if falling.mean() < t.entropy_heads:
        return []
    out = []
    for s in np.flatnonzero(falling):
        site, head = tr.series[s]
        start = int(tr.steps[int(np.nanargmax(tr.metrics["entropy"][:, s]))])
        projected = (ent[-1, s] - t.entropy_collapse) / -slope[s] if slope[s] < 0 else math.inf
        out.append(Issue(
            "entropy_fall", "warning", tr.step, float(ent[-1, s]), t.entropy_collapse,
            f"entropy fell {drop[s]:.0%} to {ent[-1, s]:.2f} nats since step {start}, with "
            f"{falling.sum()} of {len(falling)} heads falling; ~{max(projected, 0):.0f} steps to "
            f"{t.entropy_collapse:g} nats", site, head, start, float(max(projected, 0.0))))
    return out


def entropy_collapse(tr: Trends) -> list[Issue]:
    t, now = tr.t, tr.metrics["entropy"][-1]
    out = []
    for s in np.flatnonzero(now < t.entropy_collapse):
        site, head = tr.series[s]
        out.append(Issue("entropy_collapse", "warning", tr.step, float(now[s]), t.entropy_collapse,
                         f"attention collapsing to one token: entropy {now[s]:.2f} nats", site, head))
    return out


def sink_growth(tr: Trends) -> list[Issue]:
    t = tr.t
    sink = tr.metrics["sink_mass"][-t.window:]
    if len(sink) < max(4, t.window // 2):
        return []
    rise = sink[-1] - sink[0]
    out = []
    for s in np.flatnonzero((rise >= t.sink_rise) & (sink[-1] >= t.sink_mass)):
        site, head = tr.series[s]
        start = int(tr.steps[int(np.nanargmin(tr.metrics["sink_mass"][:, s]))])
        out.append(Issue("sink_growth", "warning", tr.step, float(sink[-1, s]), t.sink_mass,
                         f"first-key mass grew from {sink[0, s]:.2f} to {sink[-1, s]:.2f} since step {start}",
                         site, head, start))
    return out


def grad_spike(tr: Trends) -> list[Issue]:
    t, g = tr.t, tr.grad_norm
    if len(g) < 5 or len(tr.grad_steps) == 0 or tr.grad_steps[-1] != tr.step:
        return []
    before = np.nanmax(g[-t.window - 1:-1], axis=0)
    out = []
    with np.errstate(invalid="ignore"):
        hits = (g[-1] >= t.grad_spike * before) | ~np.isfinite(g[-1])
    for i in np.flatnonzero(hits & np.isfinite(before)):
        out.append(Issue("grad_spike", "warning", tr.step, float(g[-1, i]), float(t.grad_spike * before[i]),
                         f"query/key gradient norm {g[-1, i]:.3g} is {g[-1, i] / max(before[i], 1e-30):.1f}× "
                         f"its recent maximum {before[i]:.3g}", tr.sites[i]))
    return out


def loss_spike(tr: Trends) -> list[Issue]:
    t = tr.t
    steps, losses = tr.losses.last()
    losses = losses[:, 0]
    out = []
    for j in range(max(len(losses) - tr.new_losses, 0), len(losses)):
        loss = losses[j]
        before = losses[max(0, j - t.loss_window):j]
        before = before[np.isfinite(before)]
        if not math.isfinite(loss):
            out.append(Issue("loss_spike", "error", int(steps[j]), float(loss), math.nan, f"loss is {loss}"))
        elif len(before) >= max(8, t.loss_window // 2) and loss >= np.median(before) + t.loss_spike_nats:
            med = float(np.median(before))
            out.append(Issue("loss_spike", "warning", int(steps[j]), float(loss), med + t.loss_spike_nats,
                             f"loss {loss:.3f} jumped {loss - med:.2f} nats above its recent median {med:.3f}"))
        if out:
            break  # one loss issue per detection is enough
    return out


def nonfinite(tr: Trends) -> list[Issue]:
    bad = tr.metrics["nonfinite_logits"][-1]
    out = []
    for s in np.flatnonzero(bad > 0):
        site, head = tr.series[s]
        out.append(Issue("nonfinite", "error", tr.step, float(bad[s]), 0.0,
                         f"{bad[s]:.0f} non-finite logits", site, head))
    return out


DETECTORS: dict[str, Callable[[Trends], list[Issue]]] = {
    "logit_growth": logit_growth,
    "softmax_saturation": softmax_saturation,
    "overflow_risk": overflow_risk,
    "entropy_fall": entropy_fall,
    "entropy_collapse": entropy_collapse,
    "sink_growth": sink_growth,
    "grad_spike": grad_spike,
    "loss_spike": loss_spike,
    "nonfinite": nonfinite,
}
