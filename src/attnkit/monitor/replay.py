"""Re-run the detectors on a recorded run: the JSONL a monitor wrote holds every observed step's
per-head statistics, so a new detector (or new thresholds) can be judged on finished runs without
training them again.

    issues = replay("runs/x/monitor.jsonl", detectors=("softmax_saturation",))

The replay feeds the same ``Trends`` the live monitor would have built (the last ``history``
observed steps, newest last) to the same detector functions, step by step, and keeps the first
issue of each (site, head, type), as the live monitor warns once. Losses: those recorded at the
observed steps (the live monitor saw every step's loss, so ``loss_spike`` may differ; the
attention detectors do not read losses). When a file holds several runs (a log directory reused),
the last one is replayed (``report.read_run``).
"""

from __future__ import annotations

import os

from attnkit.errors import UserError
from attnkit.monitor.detectors import DETECTORS, Thresholds, Trends, near_limit, warmup_judged_after, warmup_observing
from attnkit.monitor.history import Ring
from attnkit.monitor.monitor import check_every, observes
from attnkit.common.findings import Finding
from attnkit.monitor.report import read_run
from attnkit.seam.sites import Site


def replay(path: str | os.PathLike, thresholds: Thresholds | None = None, detectors: tuple[str, ...] | None = None,
           history: int = 512, formats: list[str | None] | None = None,
           scales: list[float] | None = None, every: int | None = None, observe_first: int = 0,
           near_limit_every: int | None = None) -> list[Finding]:
    """The issues ``detectors`` raise on the recorded run, each (site, head, type) once, in order.
    ``formats`` / ``scales``: each series' number format and softmax scale where the recording lacks
    them (recorded by the monitor since it judges q·kᵀ against its format; see ``format_overflow``).
    ``every`` / ``observe_first``: replay as if the monitor had observed on that schedule
    (``monitor.observes``), keeping only those of the recorded steps: a run recorded at every=1 can
    judge any schedule. None: every recorded step. ``near_limit_every``: with ``every``, also one step in
    this many while the latest kept step put a figure within the overflow floor of its format's limit
    (``AttentionMonitor(near_limit_every=)``, decided as the live monitor decides it)."""
    names = tuple(detectors) if detectors is not None else tuple(DETECTORS)
    unknown = [d for d in names if d not in DETECTORS]
    if unknown:
        raise UserError(f"unknown detector(s) {', '.join(unknown)}; known: {', '.join(DETECTORS)}")
    run = read_run(path)
    meta = run.meta
    t = thresholds or Thresholds(**{k: v for k, v in meta.get("thresholds", {}).items()
                                    if k in Thresholds.__dataclass_fields__})
    series = [(Site(h["layer"], h.get("stack", ""), h.get("kind", "self")), h["head"]) for h in meta["heads"]]
    sites = sorted({s for s, _ in series})
    head_metrics = {m: v for m, v in run.metrics.items() if m != "grad_norm"}
    rings = {m: Ring(history, len(series)) for m in head_metrics}
    grad_ring, losses = Ring(history, len(sites)), Ring(history, 1)
    grads = run.metrics.get("grad_norm")
    loss_at = dict(run.losses)
    warned, out = set(), []
    if every is not None:
        check_every(every, observe_first, near_limit_every)
    formats = formats if formats is not None else [h.get("format") for h in meta["heads"]]
    scales = scales if scales is not None else [h.get("scale") or 1.0 for h in meta["heads"]]
    near = False  # the latest kept step's figures within the overflow floor of their limit
    rates = run.metrics.get("learning_rate")  # the optimizer's rate read after each recorded step (None: not recorded)
    judged = False  # the end of the warm-up was judged (once a run, as the live monitor)
    for i, step in enumerate(run.steps):
        # the live monitor observes every step while the rate rises, in a format whose limit is reachable
        warming_up = rates is not None and i >= 2 and warmup_observing(rates[i - 2][0], rates[i - 1][0], judged, formats)
        if every is not None and not observes(step, every, observe_first, near, near_limit_every, warming_up):
            continue
        near = near_limit({m: values[i] for m, values in head_metrics.items()}, formats, scales, t.overflow_floor_bits)
        for m, values in head_metrics.items():
            rings[m].append(step, values[i])
        if grads is not None and len(grads) == len(run.steps):
            grad_ring.append(step, grads[i])
        new_losses = int(step in loss_at)
        if new_losses:
            losses.append(step, [loss_at[step]])
        steps, _ = rings["entropy"].last()
        gsteps, gvals = grad_ring.last()
        trends = Trends(series, sites, steps, {m: ring.last()[1] for m, ring in rings.items()}, gsteps, gvals,
                        losses, new_losses, t, formats=formats, scales=scales, warmup_judged=judged)
        for name in names:
            for issue in DETECTORS[name](trends):
                if issue.key not in warned:
                    warned.add(issue.key)
                    out.append(issue)
        judged = warmup_judged_after(trends)
    return out


def first_step(issues: list[Finding], types: tuple[str, ...]) -> int | None:
    """The step of the first issue of one of ``types`` (None when there is none)."""
    return min((i.step for i in issues if i.type in types), default=None)


__all__ = ["first_step", "replay"]
