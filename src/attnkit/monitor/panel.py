"""The per-layer panel of a monitored run: each head's largest |logit| and entropy over the observed
steps, with the steps where warnings and interventions happened.

One set of pure functions feeds every rendering of it: the TensorBoard and W&B panels written while
the run trains (``emit.py``) and the PNG of ``attnkit monitor report`` (``report.py``, from the
JSONL). Nothing here draws or writes.

- ``max_abs_logit(logit_max, logit_min)``: a head's largest |logit| (what overflows a float16),
  from the two extremes the monitor records;
- ``by_site(sites)``: the columns of each attention site's heads, sites in model order;
- ``Markers``: counts of new warnings per (step, site) and of interventions per step, handed out
  once a step can get no more of them.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from attnkit.seam.sites import Site


def max_abs_logit(logit_max, logit_min) -> np.ndarray:
    """max(|logit_max|, |logit_min|) elementwise; NaN where a head saw no logit (an empty head
    records max -inf and min +inf) or where either extreme is unknown (NaN)."""
    hi, lo = np.asarray(logit_max, dtype=float), np.asarray(logit_min, dtype=float)
    out = np.maximum(np.abs(hi), np.abs(lo))  # NaN propagates
    return np.where(hi < lo, np.nan, out)


def by_site(sites: Sequence[Site]) -> list[tuple[Site, list[int]]]:
    """``sites[i]`` is the site of column ``i`` (one column per head): each distinct site in model
    order, with its columns in the order given (the monitor's series are in head order)."""
    columns: dict[Site, list[int]] = defaultdict(list)
    for i, site in enumerate(sites):
        columns[site].append(i)
    return sorted(columns.items())


def site_of(issue) -> Site | None:
    """The attention site a warning names: a ``Finding``'s ``site`` or, in the JSONL, its ``site``
    object; else its ``layer`` (single-stack self-attention); None for the whole model."""
    if isinstance(issue, dict):
        site, layer = issue.get("site"), issue.get("layer")
        if isinstance(site, dict) and isinstance(site.get("layer"), int):
            return Site(site["layer"], site.get("stack", ""), site.get("kind", "self"))
    else:
        site, layer = getattr(issue, "site", None), getattr(issue, "layer", None)
        if site is not None:
            return Site(*site)
    return Site(layer) if isinstance(layer, int) else None


class Markers:
    """Where warnings and interventions happened, as counts per step, for a scalar series that is 0
    at every observed step without one (so a chart shows a spike at each).

    The monitor emits a step's record before that step's warnings and interventions, so a step's
    counts are complete only when a later step is observed (or the run ends): ``observed(step)``
    hands out every earlier step's row. A row is (step, {site or None: new warnings}, interventions);
    warnings naming a site not among ``sites`` count for the whole model (None).
    """

    def __init__(self, sites: Sequence[Site]) -> None:
        self.sites = list(dict.fromkeys(sites))
        self._warnings: dict[int, dict[Site | None, int]] = {}
        self._interventions: dict[int, int] = {}

    def _row(self, step: int) -> dict[Site | None, int]:
        if step not in self._warnings:
            self._warnings[step] = {site: 0 for site in [*self.sites, None]}
            self._interventions[step] = 0
        return self._warnings[step]

    def warning(self, step: int, site: Site | None) -> None:
        row = self._row(step)
        row[site if site in row else None] += 1

    def intervention(self, step: int) -> None:
        self._row(step)
        self._interventions[step] += 1

    def observed(self, step: int) -> list[tuple[int, dict[Site | None, int], int]]:
        """Record an observed step (a row of zeros until something happens at it); return the rows
        of all earlier steps, now complete, oldest first."""
        done = self.flush(before=step)
        self._row(step)
        return done

    def flush(self, before: int | None = None) -> list[tuple[int, dict[Site | None, int], int]]:
        """The rows of the steps before ``before`` (all when None), removed from here."""
        steps = sorted(s for s in self._warnings if before is None or s < before)
        return [(s, self._warnings.pop(s), self._interventions.pop(s)) for s in steps]
