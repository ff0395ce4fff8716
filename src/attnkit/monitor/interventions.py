"""Interventions that really change the run, and the policy that picks them.

Each intervention is a small object with ``name``, ``reason`` and ``apply(monitor) -> detail``;
``AttentionMonitor.apply`` runs it and logs step, action, detail and reason. ``INTERVENTIONS``
maps a name to its class:

- ``qk_clip``: MuonClip's QK-clip (Kimi K2): for every head whose largest |logit| S > τ, γ = τ/S; its
  W_q rows and its key head's W_k rows are rescaled so that its logits are multiplied by exactly γ
  (γ_g = min over the heads sharing a key head, k rows × √γ_g, each query head's rows × γ_h/√γ_g;
  without GQA that is √γ on both, as in MuonClip). Weights are found by the layout module
  (``attnkit.seam.layouts``). Persistent: re-applied on every later observed step.
- ``soft_cap`` / ``temperature``: a seam session with that score modifier on the chosen heads
  for the rest of the run (a temperature folds into SDPA's scale; a soft-cap runs the dense kernel).
- ``reduce_lr``: every param group's ``lr`` × factor (and the scheduler's ``base_lrs``, so a
  schedule does not undo it).
- ``attention_dropout``: the attention modules' own dropout probability set to p.
- ``grad_clip``: an optimizer step pre-hook clipping the total gradient norm to ``max_norm``.
- ``lr_backoff``: halve the LR now and again on every later observed step at which at least
  ``share`` of all heads' max logits (those above the detectors' ``logit_floor``) grew ≥ ``growth``×
  since the previous observed step, measured from where a QK-clip left them (default: the
  detectors' ``growth_min`` per window, 1.25^(1/7) ≈ 1.03 per observation): the optimizer is
  still driving the logits up, so the rate is still too high for this model (Wortsman et al. 2023:
  the logit-growth instability is a learning-rate sensitivity). Floored at ``min_fraction`` of
  the rate it started from.
- ``lr_to_rate``: once, the LR × (target growth rate / the heads' measured growth rate of log max
  logit): the rate at which the detectors would stop calling it growth (see ``LRToRate``).
- ``rollback``: restore, in place, the newest in-memory snapshot (``attnkit.monitor.Snapshots``:
  model, optimizer and scheduler state, on CPU) taken before the step the warned trend started,
  and forget the monitor's history of the undone steps (``keep_trend``: keep the observations up to the
  restored snapshot, the restored run's own past); the learning rates the interventions set stay. The loop goes on with its next batches (nothing is replayed; the step budget is the same,
  so the undone steps are lost compute). PaLM's and OPT's practice for loss spikes. ``times``: how
  often a ``Policy`` may roll back (a second warning on the restored run rolls back again).
- ``chain``: several interventions applied together as one action.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from attnkit.errors import UserError
from attnkit.monitor.detectors import logit_magnitude
from attnkit.monitor.emit import series_name
from attnkit.common.findings import Finding, severity_rank, threshold
from attnkit.monitor.issues import Diagnosis
from attnkit.seam.layouts import QKLayout, qk_layout
from attnkit.seam.sites import Site


def _magnitude(record) -> np.ndarray:
    """Each series' largest |logit| at an observed step (``StepRecord``): what QK-clip's S is."""
    return logit_magnitude({m: np.asarray(record.metrics[m], dtype=float) for m in ("logit_max", "logit_min")
                            if m in record.metrics})


def qk_clip_layout(layout: QKLayout, max_logits: list[float], tau: float) -> dict[int, float]:
    """Rescale one module's q/k weights so each head's logits are × min(1, τ/S_h); returns {head: γ}.

    S_h is the head's largest |logit| (``detectors.logit_magnitude``): scaling W_q or W_k scales every
    logit of the head by the same γ, the most negative with the most positive, so γ = τ/S_h bounds
    both sides at τ; a head growing all-negative is clipped like one growing positive."""
    if layout.qk_norm:
        raise UserError("QK-clip rescales W_q/W_k, which this model's QK-norm cancels; use soft_cap instead")
    gammas = [min(1.0, tau / s) if (math.isfinite(s) and s > tau) else 1.0 for s in max_logits]
    clipped = {}
    for g in range(layout.num_kv_heads):
        group = layout.group(g)
        gamma_g = min(gammas[h] for h in group)
        if gamma_g >= 1.0:
            continue
        layout.scale_key(g, math.sqrt(gamma_g))
        for h in group:
            layout.scale_query(h, gammas[h] / math.sqrt(gamma_g))
            if gammas[h] < 1.0:
                clipped[h] = gammas[h]
    return clipped


@dataclass
class QKClip:
    tau: float = threshold("logit_danger")
    reason: str = ""
    name: str = "qk_clip"
    persistent: bool = True

    def apply(self, monitor) -> str:
        detail = self._clip(monitor)
        if self.persistent and self not in monitor.persistent:
            monitor.keep_applying(self)
        return detail or f"no head above τ={self.tau:g} now; re-applied on every observed step"

    def reapply(self, monitor) -> None:
        detail = self._clip(monitor)
        if detail:  # to the JSONL only: a line on the console every observed step would drown the warnings
            monitor.log_intervention({"step": monitor.step, "action": "qk_clip", "detail": detail,
                                      "reason": "persistent QK-clip"}, quiet=True)

    def _clip(self, monitor) -> str:
        if monitor.latest is None:
            return ""
        rec, done, normed = monitor.latest, [], []
        modules = monitor.modules()
        for site in rec.sites:
            if site not in modules:
                continue
            idx = [i for i, (s, _) in enumerate(rec.series) if s == site]
            heads = [rec.series[i][1] for i in idx]
            layout = qk_layout(modules[site])
            if layout.qk_norm:  # rescaling W_q/W_k before a QK-norm changes nothing
                normed.append(series_name(site))
                continue
            magnitude = _magnitude(rec)
            logits = [math.nan] * layout.num_heads
            for i, h in zip(idx, heads):
                logits[h] = magnitude[i]
            for h, gamma in qk_clip_layout(layout, logits, self.tau).items():
                done.append(f"{series_name(site, h)} ×{gamma:.3f}")
        text = ("clipped " + ", ".join(done) + f" to τ={self.tau:g}") if done else ""
        if normed and not getattr(self, "_said_normed", False):
            self._said_normed = True
            text += ("; " if text else "") + f"not applicable to {', '.join(normed)} (QK-norm)"
        return text


@dataclass
class ScoreModifier:
    """A seam score modifier (soft-cap or temperature) on some heads for the rest of the run."""

    kind: str = "soft_cap"  # "soft_cap" | "temperature"
    value: float = 30.0
    site: Site | None = None  # None: every layer
    heads: list[int] | None = None
    reason: str = ""

    @property
    def name(self) -> str:
        return self.kind

    def apply(self, monitor) -> str:
        from attnkit.seam.mods import SCORE_MODS

        mod = SCORE_MODS[self.kind](self.value)
        layers = None if self.site is None else [self.site]
        heads = None if self.heads is None or self.site is None else {self.site: self.heads}
        monitor.attach_modifier(score_mods=[mod], layers=layers, heads=heads)
        where = "every layer" if self.site is None else series_name(self.site) + (
            f" heads {self.heads}" if self.heads else "")
        return f"{self.kind}({self.value:g}) on {where} through the seam"


def soft_cap(value: float = 30.0, site: Site | None = None, heads=None, reason: str = "") -> ScoreModifier:
    return ScoreModifier("soft_cap", value, site, heads, reason)


def temperature(value: float = 2.0, site: Site | None = None, heads=None, reason: str = "") -> ScoreModifier:
    return ScoreModifier("temperature", value, site, heads, reason)


def _optimizer(monitor, what: str):
    if monitor.optimizer is None:
        raise UserError(f"{what} needs the optimizer: AttentionMonitor(model, optimizer=...)")
    return monitor.optimizer


@dataclass
class ReduceLR:
    factor: float = 0.5
    reason: str = ""
    name: str = "reduce_lr"

    def apply(self, monitor) -> str:
        before, after = _reduce_lr(monitor, self.factor)
        return f"lr {before:.3g} → {after:.3g} in {len(monitor.optimizer.param_groups)} group(s)"


@dataclass
class AttentionDropout:
    p: float = 0.1
    reason: str = ""
    name: str = "attention_dropout"

    def apply(self, monitor) -> str:
        done, missing = 0, []
        for module in monitor.modules().values():
            setter = qk_layout(module).set_dropout
            if setter is None:
                missing.append(type(module).__name__)
            else:
                setter(self.p)
                done += 1
        return f"attention dropout p={self.p:g} on {done} module(s)" + (
            f"; not settable on {', '.join(sorted(set(missing)))}" if missing else "")


@dataclass
class GradClip:
    max_norm: float = 1.0
    reason: str = ""
    name: str = "grad_clip"
    handle: object = field(default=None, repr=False)

    def apply(self, monitor) -> str:
        opt = _optimizer(monitor, "grad_clip")
        params = [p for g in opt.param_groups for p in g["params"]]

        def clip(_opt, _args, _kwargs) -> None:
            torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], self.max_norm)

        if self.handle is None:
            self.handle = opt.register_step_pre_hook(clip)
        return f"gradients clipped to total norm {self.max_norm:g} before every optimizer step"


def _reduce_lr(monitor, factor: float) -> tuple[float, float]:
    """Every param group's lr (and the scheduler's base_lrs, so a schedule does not undo it) × factor."""
    opt = _optimizer(monitor, "reduce_lr")
    before = opt.param_groups[0]["lr"]
    for g in opt.param_groups:
        g["lr"] = g["lr"] * factor
    if monitor.scheduler is not None and hasattr(monitor.scheduler, "base_lrs"):
        monitor.scheduler.base_lrs = [lr * factor for lr in monitor.scheduler.base_lrs]
    return before, opt.param_groups[0]["lr"]


@dataclass
class LRBackoff:
    factor: float = 0.5
    growth: float | None = None  # per observed interval; None: the detectors' growth_min per window
    share: float = 0.5  # of all heads
    min_fraction: float = 1 / 64  # never below this fraction of the rate at the first application
    floor: float | None = None  # heads below it do not count; None: the detectors' logit_floor
    reason: str = ""
    name: str = "lr_backoff"
    persistent: bool = True
    _prev: list[float] | None = field(default=None, repr=False)
    _scale: float = field(default=1.0, repr=False)

    def apply(self, monitor) -> str:
        detail = self._step(monitor, force=True)
        if self not in monitor.persistent:
            monitor.keep_applying(self)
        return detail + f"; again on every observed step where ≥{self.share:.0%} of heads' max logits grow " \
                        f"≥{self._growth(monitor):.3g}× (down to {self.min_fraction:g} of it)"

    def reapply(self, monitor) -> None:
        detail = self._step(monitor, force=False)
        if detail:
            monitor.log_intervention({"step": monitor.step, "action": self.name, "detail": detail,
                                      "reason": "max logits still growing"})

    def _growth(self, monitor) -> float:
        """Growth per observed interval that counts: by default the detectors' ``growth_min`` spread
        over their window (1.25 per 8 observations = 1.028 per observation), i.e. logits that are still
        growing at all at the rate the detectors call growth."""
        if self.growth is not None:
            return self.growth
        t = monitor.thresholds
        return t.growth_min ** (1.0 / max(t.window - 1, 1))

    def _after_clip(self, monitor, logits: list[float]) -> list[float]:
        """Each head's max logit as the weights stand after this step's QK-clip (if one is active)."""
        taus = [p.tau for p in monitor.persistent if isinstance(p, QKClip)]
        if not taus:
            return list(logits)
        modules = monitor.modules()
        out = []
        for (site, _), s in zip(monitor.latest.series, logits):
            clipped = site in modules and not qk_layout(modules[site]).qk_norm
            out.append(min(s, min(taus)) if clipped and math.isfinite(s) else s)
        return out

    def _step(self, monitor, force: bool) -> str:
        growth = self._growth(monitor)
        grew = 0.0
        if monitor.latest is None:  # nothing observed yet (or just rolled back): only the first halving
            if not force:
                return ""
        else:
            logits = [float(v) for v in _magnitude(monitor.latest)]
            floor = monitor.thresholds.logit_floor if self.floor is None else self.floor
            if self._prev is not None:
                # heads below the detectors' floor are ordinary learning (logits start near 0), not counted as growing
                grown = [math.isfinite(now) and before >= floor and now >= growth * before
                         for now, before in zip(logits, self._prev)]
                grew = sum(grown) / max(len(grown), 1)
            self._prev = self._after_clip(monitor, logits)
        if not force and grew < self.share:
            return ""
        if self._scale * self.factor < self.min_fraction * (1 - 1e-9):
            return ""
        self._scale *= self.factor
        before, after = _reduce_lr(monitor, self.factor)
        why = "" if force else f" ({grew:.0%} of heads' max logits grew ≥{growth:.3g}×)"
        return f"lr {before:.3g} → {after:.3g}{why}"


@dataclass
class LRToRate:
    """Set the LR so the heads' logit growth slows to the rate the detectors stop calling growth.

    Under Adam a head's log max logit grows at a rate roughly proportional to the learning rate
    (q and k both move by ~lr per step), so the run's own measured rate r (the median, over heads
    at or above ``logit_floor`` that are growing, of the slope of log max logit over the last
    window, per step) tells how far to go: lr × r_target / r, r_target = log(growth_min) / the
    window's span in steps (1.25× per window). Never raises the LR; never below ``min_fraction``
    of it. Applied once (the measurement after it would be of the clipped weights)."""

    min_fraction: float = 1 / 64
    reason: str = ""
    name: str = "lr_to_rate"

    def rates(self, monitor) -> tuple[float, float]:
        """(measured rate r, target rate) per step, from the monitor's history."""
        t = monitor.thresholds
        steps, _ = monitor.rings["logit_max"].last(t.window)
        logits = logit_magnitude({m: r.last(t.window)[1] for m, r in monitor.rings.items()
                                  if m in ("logit_max", "logit_min")})
        span = float(steps[-1] - steps[0]) if len(steps) > 1 else 0.0
        target = math.log(t.growth_min) / span if span else math.nan
        if len(steps) < 2 or not span:
            return math.nan, target
        x = steps.astype(float) - steps.mean()
        y = np.log(np.clip(logits, 1e-3, None))
        slope = (x[:, None] * (y - y.mean(axis=0))).sum(axis=0) / float((x ** 2).sum())
        ok = np.isfinite(slope) & (slope > 0) & (logits[-1] >= t.logit_floor)
        return (float(np.median(slope[ok])) if ok.any() else math.nan), target

    def apply(self, monitor) -> str:
        rate, target = self.rates(monitor)
        if not (math.isfinite(rate) and math.isfinite(target)) or rate <= target:
            return f"logits grow {rate:.3g}/step, not above the target {target:.3g}/step: lr unchanged"
        factor = max(target / rate, self.min_fraction)
        before, after = _reduce_lr(monitor, factor)
        return f"lr {before:.3g} → {after:.3g} (×{factor:.3g}: max logits grew {rate:.3g}/step, target {target:.3g}/step)"


@dataclass
class Rollback:
    """Restore the newest snapshot taken before step ``before`` (the warned trend's start; None: the
    newest snapshot), in place, and forget the history of the undone steps (see the module docstring).
    First in a ``Chain``, so the actions after it (QK-clip, LR back-off) act on the restored run.
    ``keep_trend``: keep the observations up to the restored snapshot (the restored run's own past), so
    a product that grows again is warned within a few observations; False: the restored run starts with
    an empty history and needs new observations before a trend can be fitted."""

    before: int | None = None
    times: int = 3  # how often a Policy may apply it in one run (bounded retries)
    keep_trend: bool = False
    reason: str = ""
    name: str = "rollback"
    fields: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.times, bool) or not isinstance(self.times, int) or self.times < 1:
            raise UserError(f"Rollback(times=...) must be a whole number >= 1, got {self.times!r}")

    def apply(self, monitor) -> str:
        if monitor.snapshots is None:
            raise UserError("rollback needs snapshots: AttentionMonitor(..., snapshots=Snapshots(every=..., keep=...))")
        snap, before_trend = monitor.snapshots.choose(self.before)
        monitor.snapshots.restore(monitor, snap, monitor.step)
        monitor.forget_history(keep_until=snap.step if self.keep_trend else None)
        undone = monitor.step - snap.step
        self.fields = {"restored_step": snap.step, "trend_started": self.before, "undone_steps": undone}
        where = (f"the newest before the trend's start (step {self.before})" if self.before is not None and before_trend
                 else f"the oldest kept: none is older than the trend's start (step {self.before})"
                 if self.before is not None else "the newest")
        return (f"rolled back to the snapshot of step {snap.step}, {where}: model, optimizer"
                f"{' and scheduler' if snap.scheduler is not None else ''} state restored, {undone} steps undone")


@dataclass
class Chain:
    """Several interventions as one action (each applied, details joined)."""

    parts: tuple = ()
    reason: str = ""

    @property
    def name(self) -> str:
        return "+".join(p.name for p in self.parts)

    @property
    def times(self) -> int:
        return max((getattr(p, "times", 1) for p in self.parts), default=1)

    @property
    def fields(self) -> dict:
        return {k: v for p in self.parts for k, v in getattr(p, "fields", {}).items()}

    def apply(self, monitor) -> str:
        details = []
        for p in self.parts:
            p.reason = self.reason
            details.append(p.apply(monitor))
        return "; ".join(details)


INTERVENTIONS: dict[str, Callable[..., object]] = {
    "qk_clip": QKClip,
    "soft_cap": soft_cap,
    "temperature": temperature,
    "reduce_lr": ReduceLR,
    "attention_dropout": AttentionDropout,
    "grad_clip": GradClip,
    "lr_backoff": LRBackoff,
    "lr_to_rate": LRToRate,
    "rollback": Rollback,
    "chain": lambda *parts: Chain(tuple(parts)),
}

@dataclass
class Policy:
    """Issue type -> intervention factory ``(issue) -> intervention``; each action at most once
    (``once``; an intervention with ``times`` = n, such as ``Rollback``, at most n times), the most
    severe new issue first. Without ``rules`` the monitor it serves picks them (``bind``):
    ``ROLLBACK_RULES`` where it keeps snapshots, else ``DEFAULT_RULES``. ``DEFAULT_RULES``: a q·kᵀ
    product heading for its number format's limit → QK-clip 3 bits below the limit and halve the
    learning rate; a module output heading for it → halve the learning rate; logit growth or overflow
    → QK-clip at τ; entropy collapse → attention dropout; loss or gradient spike → halve the learning
    rate; a warm-up that ended near the format's limit → the learning rate to a quarter (``warmup_rate_rule``). ``ROLLBACK_RULES``: the same, but a product or module output heading for its format's limit →
    roll back to the newest snapshot from before its run-up began, keeping the restored run's own
    observations, and cut the learning rate to a quarter (at most 3 times; ``format_rollback_rule``)."""

    rules: dict[str, Callable[[Finding], object]] | None = None
    once: bool = True
    applied: set = field(default_factory=set)
    counts: dict = field(default_factory=dict)  # action name -> times applied

    def bind(self, monitor) -> None:
        """Called by the ``AttentionMonitor`` this policy serves: without rules of its own, the defaults
        for that monitor (a rollback needs its snapshots)."""
        if self.rules is None:
            self.rules = dict(ROLLBACK_RULES if getattr(monitor, "snapshots", None) is not None else DEFAULT_RULES)

    def get_intervention(self, diagnosis: Diagnosis):
        rules = self.rules if self.rules is not None else DEFAULT_RULES
        for issue in sorted(diagnosis.new or diagnosis.issues, key=lambda i: -severity_rank(i.severity)):
            rule = rules.get(issue.type)
            if rule is None:
                continue
            intervention = rule(issue)
            done = self.counts.get(intervention.name, 0)
            if self.once and done >= getattr(intervention, "times", 1):
                continue
            if done and issue not in diagnosis.new:
                continue  # again only on a new warning, not on one still standing
            self.applied.add(intervention.name)
            self.counts[intervention.name] = self.counts.get(intervention.name, 0) + 1
            intervention.reason = f"{issue.type} at {issue.where} (step {issue.step}): {issue.message}"
            return intervention
        return None


def qk_clip_rule(tau: float = threshold("logit_danger")) -> Callable[[Finding], object]:
    return lambda issue: QKClip(tau)


def format_clip_rule(headroom_bits: float = 3.0, lr_factor: float | None = 0.5) -> Callable[[Finding], object]:
    """QK-clip for a ``format_overflow`` finding: τ = the format's largest product, in logits (the
    finding's threshold), ÷ 2^headroom_bits, so the clipped products keep that many bits below the
    limit between two observed steps; with ``lr_factor``, the learning rate × it as well (the rate that
    grew the product would grow it again). On the breaking sweep's design seed (experiments/
    monitor_breaking) both rescued the same 3 of 4 GPT-2 fp16 failures; with the rate halved the runs
    ended 0.05-1.0 nats lower on 3 of 5, 0.01 and 0.22 higher on 2 (mean -0.18). None: QK-clip alone."""
    if lr_factor is None:
        return lambda issue: QKClip(issue.threshold / 2.0 ** headroom_bits)
    return lambda issue: Chain((QKClip(issue.threshold / 2.0 ** headroom_bits), ReduceLR(lr_factor)))


def format_rollback_rule(lr_factor: float = 0.25, times: int = 3) -> Callable[[Finding], object]:
    """For ``format_overflow`` and ``activation_overflow`` on a monitor with snapshots: roll back to the
    newest snapshot from before the warned figure's run-up began (the finding's ``started``; the oldest kept
    when none is that old), keep the restored run's own observations so a regrowth is warned within a few
    observations, and multiply the learning rate by ``lr_factor``; at most ``times`` times. No QK-clip.

    Why a quarter: on 270 fp16 runs of the breaking sweep (experiments/monitor_breaking, outcomes over 200
    steps) this left 43 of 68 scoreable failures within 0.1 nats of the run at half the learning rate (67
    of 68 ended healthy), against 41 cutting to an eighth and 36 halving; on 60 runs it was not chosen on it
    rescued as many as halving (6 of 14) and ended more failures healthy (47 of 49 against 39). A warning late
    in a run suggests a rate too high for the rest of it, where a deeper cut may act like a learning-rate
    decay. On the two false alarms (healthy runs warned in their first 150 steps) the final loss changed by
    −0.040 and −0.007 nats, on 11 healthy runs warned later by −0.13 to +0.04. The cost is the undone steps
    (20–25 a run)."""
    return lambda issue: Chain((Rollback(before=issue.started, times=times, keep_trend=True), ReduceLR(lr_factor)))


def warmup_rate_rule(lr_factor: float = 0.25) -> Callable[[Finding], object]:
    """For ``warmup_headroom``: the learning rate (and the scheduler's base rates, so the schedule keeps it) ×
    ``lr_factor``, once, at the end of the warm-up. Nothing to undo: the warm-up is where the figures grew. On
    the breaking sweep (experiments/monitor_breaking) the runs that overflow late, a hundred steps after the
    warm-up, already trail the same run at half the rate when anything nears the limit, and a rollback of a few
    dozen steps does not give that back; the rate cut to a quarter from the end of a 10-step warm-up brought
    39 of 41 such runs within 0.1 nats of the half-rate run. A quarter: the cut ``format_rollback_rule`` makes."""
    return lambda issue: ReduceLR(lr_factor, name="warmup_rate_cut")


DEFAULT_RULES: dict[str, Callable[[Finding], object]] = {
    "format_overflow": format_clip_rule(),
    "activation_overflow": lambda issue: ReduceLR(0.5),
    "softmax_saturation": qk_clip_rule(),
    "logit_growth": qk_clip_rule(),
    "overflow_risk": qk_clip_rule(),
    "entropy_collapse": lambda issue: AttentionDropout(0.1),
    "loss_spike": lambda issue: ReduceLR(0.5),
    "grad_spike": lambda issue: ReduceLR(0.5),
    "warmup_headroom": warmup_rate_rule(),
}

# DEFAULT_RULES where the monitor keeps snapshots (``AttentionMonitor(snapshots=...)``): a number format's
# overflow ahead is answered by a rollback and the learning rate cut to a quarter (``format_rollback_rule``)
ROLLBACK_RULES: dict[str, Callable[[Finding], object]] = {
    **DEFAULT_RULES,
    "format_overflow": format_rollback_rule(),
    "activation_overflow": format_rollback_rule(),
}
