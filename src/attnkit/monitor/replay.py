"""Re-run the detectors on a recorded run: the JSONL a monitor wrote holds every observed step's
per-head statistics, so a new detector (or new thresholds) can be judged on finished runs without
training them again.

    issues = replay("runs/x/monitor.jsonl", detectors=("softmax_saturation",))

The replay feeds the same ``Trends`` the live monitor would have built (the last ``history``
observed steps, newest last) to the same detector functions, step by step, and keeps the first
issue of each (site, head, type), as the live monitor warns once. Losses: those recorded at the
observed steps (the live monitor saw every step's loss, so ``loss_spike`` may differ; the
attention detectors do not read losses). When a file holds several runs (a log directory reused),
the last one is replayed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from attnkit.errors import UserError
from attnkit.monitor.detectors import DETECTORS, Thresholds, Trends
from attnkit.monitor.history import Ring
from attnkit.monitor.issues import Issue
from attnkit.seam.sites import Site


def _value(v) -> float:
    if v is None:
        return float("nan")
    if isinstance(v, str):
        return float(v)  # "inf" / "-inf"
    return float(v)


def read_run(path: str | os.PathLike) -> tuple[dict, list[dict]]:
    """The last run in a monitor JSONL: (its meta line, its step lines)."""
    path = Path(path)
    if path.is_dir():
        path = path / "monitor.jsonl"
    if not path.is_file():
        raise UserError(f"no monitor log at {path}")
    meta, steps = None, []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                if n > 1 and not line.endswith("\n"):
                    break  # a running job's last, half-written line
                raise UserError(f"{path}:{n}: not JSON ({e.msg})") from e
            if d.get("type") == "meta":
                meta, steps = d, []
            elif d.get("type") == "step" and meta is not None:
                steps.append(d)
    if meta is None:
        raise UserError(f"{path} has no meta line: not a monitor log")
    return meta, steps


def replay(path: str | os.PathLike, thresholds: Thresholds | None = None, detectors: tuple[str, ...] | None = None,
           history: int = 512) -> list[Issue]:
    """The issues ``detectors`` raise on the recorded run, each (site, head, type) once, in order."""
    names = tuple(detectors) if detectors is not None else tuple(DETECTORS)
    unknown = [d for d in names if d not in DETECTORS]
    if unknown:
        raise UserError(f"unknown detector(s) {', '.join(unknown)}; known: {', '.join(DETECTORS)}")
    meta, records = read_run(path)
    t = thresholds or Thresholds(**{k: v for k, v in meta.get("thresholds", {}).items()
                                    if k in Thresholds.__dataclass_fields__})
    series = [(Site(h["layer"], h.get("stack", ""), h.get("kind", "self")), h["head"]) for h in meta["heads"]]
    sites = sorted({s for s, _ in series})
    metric_names = sorted({m for r in records for m in r["metrics"]})
    rings = {m: Ring(history, len(series)) for m in metric_names}
    grad_ring, losses = Ring(history, len(sites)), Ring(history, 1)
    warned, out = set(), []
    for r in records:
        step = int(r["step"])
        for m in metric_names:
            rings[m].append(step, [_value(v) for v in r["metrics"].get(m, [None] * len(series))])
        if r.get("grad_norm") is not None:
            grad_ring.append(step, [_value(v) for v in r["grad_norm"]])
        new_losses = 0
        if r.get("loss") is not None:
            losses.append(step, [_value(r["loss"])])
            new_losses = 1
        steps, _ = rings[metric_names[0]].last()
        gsteps, gvals = grad_ring.last()
        trends = Trends(series, sites, steps, {m: ring.last()[1] for m, ring in rings.items()}, gsteps, gvals,
                        losses, new_losses, t)
        for name in names:
            for issue in DETECTORS[name](trends):
                if issue.key not in warned:
                    warned.add(issue.key)
                    out.append(issue)
    return out


def first_step(issues: list[Issue], types: tuple[str, ...]) -> int | None:
    """The step of the first issue of one of ``types`` (None when there is none)."""
    return min((i.step for i in issues if i.type in types), default=None)


__all__ = ["first_step", "read_run", "replay"]
