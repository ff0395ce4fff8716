"""Trend detectors: each a function of the monitor's bounded history, one per kind of trouble.

A detector sees ``Trends`` (the recent observed steps of every (site, head) series, the per-site
gradient norms and the per-step losses) and returns the findings it sees now. ``DETECTORS`` maps
a name to it; ``AttentionMonitor(detectors=[...])`` picks some. What each looks for:

- ``logit_growth``: log(max |logit|) over the last ``window`` observed steps fits a rising line that
  reaches ``logit_danger`` within ``horizon`` window spans, from at least ``logit_floor``. The
  largest magnitude, not the largest signed logit: a head whose logits grow all-negative overflows
  a number format as surely as one growing positive (``logit_magnitude``).
- ``softmax_saturation``: the instability predictor. At least ``entropy_heads`` of all heads show
  that logit growth (within ``saturation_horizon`` window spans) while at least ``entropy_heads``
  of all heads lost ``entropy_drop`` of their entropy over the same window.
- ``overflow_risk``: max |logit| >= ``logit_danger`` now.
- ``entropy_fall``: a head's entropy fell by >= ``entropy_drop`` (relative) over the window while
  at least ``entropy_heads`` of all heads did the same.
- ``entropy_collapse``: a head's mean entropy < ``entropy_collapse`` nats.
- ``sink_growth``: a head's first-key mass rose by >= ``sink_rise`` over the window to >= ``sink_mass``.
- ``grad_spike``: a layer's query/key gradient norm >= ``grad_spike`` x the largest of the window before.
- ``loss_spike``: a step's loss >= the median of the ``loss_window`` steps before + ``loss_spike_nats``,
  or non-finite.
- ``format_overflow``: a head's q·kᵀ product (max |logit| / its softmax scale) within
  ``overflow_headroom_bits`` of the largest finite value of the number format it is computed in
  (autocast's dtype, else the query's; ``attnkit.common.findings.DTYPE_THRESHOLDS``: fp16's 65,504,
  out of reach in bf16 and fp32), or projected by its trend to reach it within ``overflow_horizon``
  steps. The divergence predictor of mixed-precision runs (experiments/monitor_breaking).
- ``activation_overflow``: the same test on the largest |output| of any module computed in that
  format (an MLP past fp16's range breaks a run outside attention; its attention only shows the NaN).
- ``warmup_headroom``: at the first observed step after the optimizer's learning rate stopped rising (the end
  of its warm-up), a head's q·kᵀ product or the largest module output within ``warmup_headroom_bits`` of its
  number format's largest finite value: the warm-up alone used up nearly all of the format's range, and the
  run goes on at the peak rate. Read from the ``learning_rate`` the monitor records when it has the optimizer
  (in a format whose limit a run can reach, fp16, the monitor observes every step while the rate rises, so the
  end is judged where it happens); silent without it and for a schedule with no warm-up. Judged once a run: not
  again after a rollback replays the warm-up, and not at all once the monitor has changed the rate (a cut
  during the warm-up is not its end).
- ``nonfinite``: NaN/Inf logits were observed in a head.
- ``grad_scaler_stall``: the user's ``torch.amp.GradScaler`` skipped at least ``scaler_skip_share`` of
  the last ``scaler_window`` updates (their fp16 gradients were non-finite): the loss stays finite,
  but the weights no longer move. A diagnosis of the run as it is, not a prediction.

``Thresholds`` holds one run's numbers (a user may pass their own; the run's log records them);
its defaults, and why each sits where it does, are ``attnkit.common.findings.THRESHOLDS``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from attnkit.monitor.history import Ring
from attnkit.common.findings import Finding, dtype_threshold, threshold
from attnkit.seam.sites import Site


@dataclass
class Thresholds:
    window: int = 8  # observed steps a trend is fitted on
    logit_danger: float = threshold("logit_danger")
    logit_floor: float = threshold("logit_floor")
    growth_min: float = threshold("growth_min")
    fit_r2: float = threshold("fit_r2")
    horizon: float = threshold("horizon")  # projected steps to danger, in window spans
    saturation_horizon: float = threshold("saturation_horizon")  # the same for softmax_saturation
    entropy_drop: float = threshold("entropy_drop")
    entropy_heads: float = threshold("entropy_heads")
    entropy_collapse: float = threshold("entropy_collapse_nats")
    sink_mass: float = threshold("sink_growth_mass")
    sink_rise: float = threshold("sink_rise")
    grad_spike: float = threshold("grad_spike")  # x the largest norm of the window before
    loss_window: int = 32  # steps whose median a loss is compared with
    loss_spike_nats: float = threshold("loss_spike_nats")
    overflow_headroom_bits: float = threshold("overflow_headroom_bits")
    overflow_floor_bits: float = threshold("overflow_floor_bits")
    overflow_horizon: float = threshold("overflow_horizon")  # steps
    overflow_window: int = int(threshold("overflow_window"))  # observed steps the projection is fitted on
    overflow_confirm: int = int(threshold("overflow_confirm"))  # consecutive observed steps that must agree
    warmup_headroom_bits: float = threshold("warmup_headroom_bits")
    scaler_window: int = int(threshold("scaler_window"))  # steps whose GradScaler updates are counted
    scaler_skip_share: float = threshold("scaler_skip_share")  # of them skipped: the run has stalled


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
    formats: list[str | None] | None = None  # per series: the number format its q·kᵀ runs in (None: unknown)
    scales: list[float] | None = None  # per series: its softmax scale
    grad_scale: Ring | None = None  # every step's GradScaler scale after its update (None: no scaler given)
    warmup_judged: bool = False  # the end of the warm-up was already judged, or the monitor changed the rate

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


def logit_magnitude(metrics: dict[str, np.ndarray]) -> np.ndarray:
    """Each head's largest |logit|: max(|logit_max|, |logit_min|), what overflows a number format
    and what QK-clip bounds. A head whose logits are all negative grows in magnitude while its
    largest (signed) logit falls; both extremes scale together when W_q or W_k grows. Without a
    recorded ``logit_min`` (older recordings), |logit_max|. An extreme that saw no row (-inf max,
    +inf min) counts as 0; NaN propagates."""
    lmax = metrics["logit_max"]
    lmin = metrics.get("logit_min")
    top = np.abs(np.where(lmax == -np.inf, 0.0, lmax))
    if lmin is None:
        return top
    return np.maximum(top, np.abs(np.where(lmin == np.inf, 0.0, lmin)))


def _growth(tr: Trends, min_steps: int, horizon: float):
    """Per series, over the last ``window`` observed steps: is log(max |logit|) a rising line (R² ≥
    ``fit_r2``, risen ≥ ``growth_min``×, from ≥ ``logit_floor``) that reaches ``logit_danger``
    within ``horizon`` window spans? Returns (hits, slope, projected steps, latest max |logit|) or
    None when there are too few steps or a non-finite logit (the ``nonfinite`` detector's case)."""
    t = tr.t
    steps, logits = tr.steps[-t.window:], logit_magnitude(tr.metrics)[-t.window:]
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


def _nanmax(x: np.ndarray) -> np.ndarray:
    """Column maxima of (n, s) ignoring NaN; NaN for a column with no number (``np.nanmax`` without its
    RuntimeWarning: an fp16 run's gradient norms are NaN at every step whose update was skipped)."""
    seen = ~np.isnan(x)
    top = np.where(seen, x, -np.inf).max(axis=0, initial=-np.inf)
    return np.where(seen.any(axis=0), top, np.nan)


def _entropy_drop(tr: Trends, window: np.ndarray) -> np.ndarray:
    """Relative fall of each head's entropy from the first to the last quarter of the window."""
    q = max(1, len(window) // 4)
    first, last = window[:q].mean(axis=0), window[-q:].mean(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.nan_to_num((first - last) / np.where(first > 0, first, np.nan))


def logit_growth(tr: Trends) -> list[Finding]:
    t = tr.t
    g = _growth(tr, max(4, t.window // 2), t.horizon)
    if g is None:
        return []
    hits, slope, projected, now = g
    hits = hits & (now < t.logit_danger)
    out = []
    all_steps, all_logits = tr.steps, logit_magnitude(tr.metrics)
    for s in np.flatnonzero(hits):
        site, head = tr.series[s]
        start = int(all_steps[int(np.nanargmin(all_logits[:, s]))])
        doubling = math.log(2) / slope[s]
        out.append(Finding(
            type="logit_growth", severity="warning", step=tr.step, value=float(now[s]), threshold=t.logit_danger,
            message=f"max |logit| {now[s]:.1f} growing exponentially (doubling every {doubling:.0f} steps) since step {start}; "
            f"~{projected[s]:.0f} steps to {t.logit_danger:g}",
            site=site, head=head, started=start, projected_steps=float(projected[s])))
    return out


def softmax_saturation(tr: Trends) -> list[Finding]:
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
        start = int(tr.steps[int(np.nanargmin(logit_magnitude(tr.metrics)[:, s]))])
        out.append(Finding(
            type="softmax_saturation", severity="error", step=tr.step, value=float(now[s]), threshold=t.logit_danger,
            message=f"{growing.sum()} of {len(growing)} heads' max |logit| growing exponentially and {falling.sum()} "
            f"heads' entropy falling ≥{t.entropy_drop:.0%}: max |logit| {now[s]:.1f}, entropy {ent[s]:.2f} nats, "
            f"since step {start}; ~{max(float(projected[s]), 0.0):.0f} steps to {t.logit_danger:g}",
            site=site, head=head, started=start, projected_steps=max(float(projected[s]), 0.0)))
    return out


def overflow_risk(tr: Trends) -> list[Finding]:
    t, now = tr.t, logit_magnitude(tr.metrics)[-1]
    out = []
    for s in np.flatnonzero(now >= t.logit_danger):
        site, head = tr.series[s]
        out.append(Finding(type="overflow_risk", severity="error", step=tr.step, value=float(now[s]), threshold=t.logit_danger,
                         message=f"max |logit| {now[s]:.1f} reached the danger threshold {t.logit_danger:g}", site=site, head=head,
                         projected_steps=0.0))
    return out


def entropy_fall(tr: Trends) -> list[Finding]:
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
        out.append(Finding(
            type="entropy_fall", severity="warning", step=tr.step, value=float(ent[-1, s]), threshold=t.entropy_collapse,
            message=f"entropy fell {drop[s]:.0%} to {ent[-1, s]:.2f} nats since step {start}, with "
            f"{falling.sum()} of {len(falling)} heads falling; ~{max(projected, 0):.0f} steps to "
            f"{t.entropy_collapse:g} nats", site=site, head=head, started=start, projected_steps=float(max(projected, 0.0))))
    return out


def entropy_collapse(tr: Trends) -> list[Finding]:
    t, now = tr.t, tr.metrics["entropy"][-1]
    out = []
    for s in np.flatnonzero(now < t.entropy_collapse):
        site, head = tr.series[s]
        out.append(Finding(type="entropy_collapse", severity="warning", step=tr.step, value=float(now[s]),
                           threshold=t.entropy_collapse,
                         message=f"attention collapsing to one token: entropy {now[s]:.2f} nats", site=site, head=head))
    return out


def sink_growth(tr: Trends) -> list[Finding]:
    t = tr.t
    sink = tr.metrics["sink_mass"][-t.window:]
    if len(sink) < max(4, t.window // 2):
        return []
    rise = sink[-1] - sink[0]
    out = []
    for s in np.flatnonzero((rise >= t.sink_rise) & (sink[-1] >= t.sink_mass)):
        site, head = tr.series[s]
        start = int(tr.steps[int(np.nanargmin(tr.metrics["sink_mass"][:, s]))])
        out.append(Finding(type="sink_growth", severity="warning", step=tr.step, value=float(sink[-1, s]), threshold=t.sink_mass,
                         message=f"first-key mass grew from {sink[0, s]:.2f} to {sink[-1, s]:.2f} since step {start}",
                         site=site, head=head, started=start))
    return out


def grad_spike(tr: Trends) -> list[Finding]:
    t, g = tr.t, tr.grad_norm
    if len(g) < 5 or len(tr.grad_steps) == 0 or tr.grad_steps[-1] != tr.step:
        return []
    before = _nanmax(g[-t.window - 1:-1])
    out = []
    with np.errstate(invalid="ignore"):
        hits = (g[-1] >= t.grad_spike * before) | ~np.isfinite(g[-1])
    for i in np.flatnonzero(hits & np.isfinite(before)):
        out.append(Finding(type="grad_spike", severity="warning", step=tr.step, value=float(g[-1, i]),
                           threshold=float(t.grad_spike * before[i]),
                         message=f"query/key gradient norm {g[-1, i]:.3g} is {g[-1, i] / max(before[i], 1e-30):.1f}× "
                         f"its recent maximum {before[i]:.3g}", site=tr.sites[i]))
    return out


def loss_spike(tr: Trends) -> list[Finding]:
    t = tr.t
    steps, losses = tr.losses.last()
    losses = losses[:, 0]
    out = []
    for j in range(max(len(losses) - tr.new_losses, 0), len(losses)):
        loss = losses[j]
        before = losses[max(0, j - t.loss_window):j]
        before = before[np.isfinite(before)]
        if not math.isfinite(loss):
            out.append(Finding(type="loss_spike", severity="error", step=int(steps[j]), value=float(loss),
                               threshold=math.nan, message=f"loss is {loss}"))
        elif len(before) >= max(8, t.loss_window // 2) and loss >= np.median(before) + t.loss_spike_nats:
            med = float(np.median(before))
            out.append(Finding(type="loss_spike", severity="warning", step=int(steps[j]), value=float(loss),
                               threshold=med + t.loss_spike_nats,
                             message=f"loss {loss:.3f} jumped {loss - med:.2f} nats above its recent median {med:.3f}"))
        if out:
            break  # one loss issue per detection is enough
    return out


def format_overflow(tr: Trends) -> list[Finding]:
    """A head's q·kᵀ product (max |logit| / its softmax scale) within ``overflow_headroom_bits`` of its
    number format's largest finite value (``DTYPE_THRESHOLDS[fmt]["qk_product_max"]``), or, from
    ``overflow_floor_bits`` below it, its log-linear trend over the last window reaching that value
    within ``overflow_horizon`` steps. The value and threshold are in logits (the product × the scale)."""
    if tr.formats is None or len(tr.steps) < 2:
        return []
    scales = np.asarray(tr.scales if tr.scales is not None else [1.0] * len(tr.series), dtype=float)
    values = logit_magnitude(tr.metrics) / scales
    hits, now, limits, projected = _overflow_hits(tr, values)
    out = []
    for s in np.flatnonzero(hits):
        site, head = tr.series[s]
        fmt = tr.formats[s]
        out.append(Finding(
            type="format_overflow", severity="error", step=tr.step, value=float(now[s] * scales[s]),
            threshold=float(limits[s] * scales[s]),
            message=f"q·kᵀ {now[s]:.4g} is {now[s] / limits[s]:.0%} of {fmt}'s largest value {limits[s]:g}"
            + (f", ~{max(float(projected[s]), 0.0):.0f} steps from it at its current growth" if np.isfinite(projected[s]) else "")
            + f" (max |logit| {now[s] * scales[s]:.4g} at scale {scales[s]:.3g})",
            site=site, head=head, started=_above_floor_since(tr, values[:, s], limits[s]),
            projected_steps=max(float(projected[s]), 0.0) if np.isfinite(projected[s]) else 0.0))
    return out


def _above_floor_since(tr: Trends, values: np.ndarray, limit: float) -> int:
    """The first observed step of the latest unbroken stretch of ``values`` (one series, oldest first)
    at or above ``overflow_floor_bits`` below ``limit``: where the run-up to the limit began."""
    above = np.isfinite(values) & (values >= limit / 2.0 ** tr.t.overflow_floor_bits)
    i = len(values) - 1
    while i > 0 and above[i - 1]:
        i -= 1
    return int(tr.steps[i])


def _format_limits(formats: list[str | None]) -> np.ndarray:
    """Each series' number format's largest finite value (``qk_product_max``; inf where unknown)."""
    return np.array([dtype_threshold("qk_product_max", f) or np.inf for f in formats], dtype=float)


def _overflow_hits(tr: Trends, values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For (n, series) figures in each series' number format: (hits, latest, limit, projected steps).
    A hit: at each of the last ``overflow_confirm`` observed steps (one figure's jump is no trend),
    the figure within ``overflow_headroom_bits`` of the format's largest finite value, or, from
    ``overflow_floor_bits`` below it, its log-linear trend over the ``overflow_window`` observed steps
    up to there reaching it within ``overflow_horizon`` steps."""
    t = tr.t
    limits = _format_limits(tr.formats)
    confirm = max(1, int(t.overflow_confirm))
    hits = np.ones(values.shape[1], dtype=bool)
    now, projected = values[-1], np.full(values.shape[1], np.inf)
    for back in range(confirm):  # the latest observed step first, then the ones before it
        end = len(values) - back
        if end < 1:
            return np.zeros_like(hits), now, limits, projected
        h, p = _overflow_hits_at(tr.steps[:end], values[:end], limits, t)
        hits &= h
        if back == 0:
            projected = p
    return hits, now, limits, projected


def _overflow_hits_at(steps: np.ndarray, values: np.ndarray, limits: np.ndarray, t: Thresholds) -> tuple[np.ndarray, np.ndarray]:
    """``_overflow_hits``'s test at the last of ``steps``: (hits, projected steps to the limit)."""
    steps, values = steps[-t.overflow_window:], values[-t.overflow_window:]
    now = values[-1]
    projected = np.full(len(now), np.inf)
    ok = np.isfinite(values).all(axis=0) & (values > 0).all(axis=0)
    if len(steps) >= 2 and ok.any():
        slope, _ = _fit(steps.astype(float), np.log(np.where(ok, values, 1.0)))
        with np.errstate(divide="ignore", invalid="ignore"):
            projected = np.where(ok & (slope > 0), (np.log(limits) - np.log(np.where(ok, now, 1.0))) / slope, np.inf)
    near = now >= limits / 2.0 ** t.overflow_headroom_bits
    projecting = now >= limits / 2.0 ** t.overflow_floor_bits  # early training's fast growth from ~0 is no trend yet
    hits = np.isfinite(now) & np.isfinite(limits) & (near | (projecting & (projected <= t.overflow_horizon)))
    return hits, projected


def activation_overflow(tr: Trends) -> list[Finding]:
    """The largest |output| of any module computed in a head's number format (``activation_absmax``,
    the same for every head of that format) near that format's largest finite value, as
    ``format_overflow`` judges q·kᵀ: an MLP overflowing fp16 is what breaks a half-precision run
    there, and the next layer's attention only shows its NaN. One finding for the model."""
    if tr.formats is None or "activation_absmax" not in tr.metrics or len(tr.steps) < 2:
        return []
    hits, now, limits, projected = _overflow_hits(tr, tr.metrics["activation_absmax"])
    if not hits.any():
        return []
    s = int(np.flatnonzero(hits)[np.argmax(now[hits] / limits[hits])])
    fmt = tr.formats[s]
    return [Finding(
        type="activation_overflow", severity="error", step=tr.step, value=float(now[s]), threshold=float(limits[s]),
        started=_above_floor_since(tr, tr.metrics["activation_absmax"][:, s], limits[s]),
        message=f"a module's output reached {now[s]:.4g}, {now[s] / limits[s]:.0%} of {fmt}'s largest value {limits[s]:g}"
        + (f", ~{max(float(projected[s]), 0.0):.0f} steps from it at its current growth" if np.isfinite(projected[s]) else ""),
        projected_steps=max(float(projected[s]), 0.0) if np.isfinite(projected[s]) else 0.0)]


def warmup_ended_now(lrs: np.ndarray) -> bool:
    """Whether the newest of the observed steps' learning rates (oldest first) is the first at which the rate,
    having risen, no longer rose: the end of a warm-up, once per run (a later decay or cut is not a second end,
    since the first one is still in the history; a schedule that never rose has no warm-up)."""
    if len(lrs) < 2 or not np.isfinite(lrs).all():
        return False
    ended = (lrs[1:] <= lrs[:-1]) & (lrs[:-1] > lrs[0])
    return bool(ended[-1] and not ended[:-1].any())


def warmup_headroom(tr: Trends) -> list[Finding]:
    """At the end of the learning-rate warm-up (``warmup_ended_now``), the figure nearest its number format's
    largest finite value — any head's q·kᵀ product (max |logit| / its scale) or the largest module output in
    that format — within ``warmup_headroom_bits`` of it. One finding for the run; the value and threshold are
    the figure and the line, in the figure's own units."""
    if (tr.warmup_judged or tr.formats is None or "learning_rate" not in tr.metrics
            or not warmup_ended_now(tr.metrics["learning_rate"][:, 0])):
        return []
    limits = _format_limits(tr.formats)
    scales = np.asarray(tr.scales if tr.scales is not None else [1.0] * len(tr.series), dtype=float)
    figures = {"q·kᵀ": logit_magnitude({m: v[-1:] for m, v in tr.metrics.items()})[0] / scales}
    if "activation_absmax" in tr.metrics:
        figures["a module's output"] = tr.metrics["activation_absmax"][-1]
    best = None  # (bits below the limit, what, series)
    for what, values in figures.items():
        with np.errstate(divide="ignore", invalid="ignore"):
            bits = np.log2(limits / values)
        bits = np.where(np.isfinite(bits), bits, np.inf)
        s = int(np.argmin(bits))
        if best is None or bits[s] < best[0]:
            best = (float(bits[s]), what, s)
    bits, what, s = best
    if bits > tr.t.warmup_headroom_bits:
        return []
    site, head = tr.series[s] if what == "q·kᵀ" else (None, None)
    value = float(figures[what][s])
    lr = float(tr.metrics["learning_rate"][-1, 0])
    return [Finding(
        type="warmup_headroom", severity="warning", step=tr.step, value=value, threshold=float(limits[s]),
        site=site, head=head,
        message=f"the learning-rate warm-up ended (lr {lr:.3g}) with {what} at {value:.4g}, {bits:.1f} bits below "
        f"{tr.formats[s]}'s largest value {limits[s]:g}: the warm-up used up nearly all of the format's range "
        f"and the run goes on at its peak rate")]


def warmup_observing(previous_rate: float | None, rate: float | None, judged: bool,
                     formats: list[str | None] | None) -> bool:
    """Whether the monitor observes the next step for ``warmup_headroom``: the optimizer's rate still rising
    (``rate`` for the next step above ``previous_rate``), the warm-up not judged yet, in a run whose number
    format's limit is reachable (the live monitor and the replay decide it alike)."""
    rising = rate is not None and previous_rate is not None and rate > previous_rate
    return rising and not judged and reachable_format(formats)


def warmup_judged_after(tr: Trends) -> bool:
    """Whether the warm-up counts as judged once the detectors have seen ``tr``: it was already, or its end
    is the newest observed step (once a run: a rollback that replays the warm-up does not judge it again)."""
    return tr.warmup_judged or ("learning_rate" in tr.metrics and warmup_ended_now(tr.metrics["learning_rate"][:, 0]))


def reachable_format(formats: list[str | None] | None) -> bool:
    """Whether any series runs in a number format whose largest value a training run can reach (fp16's
    65,504; not bf16's or fp32's ~10^38)."""
    return formats is not None and any((dtype_threshold("qk_product_max", f) or np.inf) < 1e30 for f in formats)


def near_limit(values: dict[str, np.ndarray], formats: list[str | None] | None, scales: list[float] | None,
               floor_bits: float) -> bool:
    """Whether one observed step's figures (metric -> one value per series) put any head's q·kᵀ product
    or the largest module output within ``floor_bits`` of its number format's largest finite value: the
    band where ``format_overflow`` and ``activation_overflow`` project, and where a figure can cross the
    limit between two sparse observations."""
    if formats is None:
        return False
    limits = _format_limits(formats)
    if not np.isfinite(limits).any():
        return False
    line = limits / 2.0 ** floor_bits
    scale = np.asarray(scales if scales is not None else [1.0] * len(formats), dtype=float)
    magnitude = logit_magnitude({m: np.asarray(values[m], dtype=float)[None] for m in ("logit_max", "logit_min")
                                 if m in values})[0]
    with np.errstate(invalid="ignore", divide="ignore"):
        near = magnitude / scale >= line  # NaN (nothing observed) is not near
        if "activation_absmax" in values:
            near |= np.asarray(values["activation_absmax"], dtype=float) >= line
    return bool(near.any())


def grad_scaler_stall(tr: Trends) -> list[Finding]:
    """The GradScaler skipped at least ``scaler_skip_share`` of the last ``scaler_window`` updates (a
    skipped update lowers its scale: the scaled gradients were non-finite). One finding for the model."""
    if tr.grad_scale is None:
        return []
    t = tr.t
    _, scale = tr.grad_scale.last(t.scaler_window + 1)
    scale = scale[:, 0]
    if len(scale) < t.scaler_window + 1:
        return []
    skipped = int((scale[1:] < scale[:-1]).sum())
    if skipped < t.scaler_skip_share * t.scaler_window:
        return []
    now = float(scale[-1])
    return [Finding(
        type="grad_scaler_stall", severity="error", step=tr.step, value=skipped / t.scaler_window,
        threshold=t.scaler_skip_share,
        message=f"fp16 gradients overflowed at {skipped} of the last {t.scaler_window} steps; the GradScaler's "
        f"scale is {now:.3g} and it skipped those updates: training has stopped (the loss stays finite because "
        f"the weights no longer move)")]


def nonfinite(tr: Trends) -> list[Finding]:
    bad = tr.metrics["nonfinite_logits"][-1]
    out = []
    for s in np.flatnonzero(bad > 0):
        site, head = tr.series[s]
        out.append(Finding(type="nonfinite", severity="error", step=tr.step, value=float(bad[s]), threshold=0.0,
                         message=f"{bad[s]:.0f} non-finite logits", site=site, head=head))
    return out


DETECTORS: dict[str, Callable[[Trends], list[Finding]]] = {
    "logit_growth": logit_growth,
    "softmax_saturation": softmax_saturation,
    "overflow_risk": overflow_risk,
    "entropy_fall": entropy_fall,
    "entropy_collapse": entropy_collapse,
    "sink_growth": sink_growth,
    "grad_spike": grad_spike,
    "loss_spike": loss_spike,
    "format_overflow": format_overflow,
    "activation_overflow": activation_overflow,
    "nonfinite": nonfinite,
    "grad_scaler_stall": grad_scaler_stall,
    "warmup_headroom": warmup_headroom,
}
