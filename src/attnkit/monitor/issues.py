"""What the monitor finds: an ``Issue`` per (site, head, type) and a step's ``Diagnosis``."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from attnkit.seam.sites import Site


@dataclass
class Issue:
    """One finding. ``started``: the step the trend began; ``projected_steps``: steps until the
    danger threshold at the current rate (None when the detector has no projection)."""

    type: str
    severity: str  # "info" | "warning" | "error"
    step: int
    value: float
    threshold: float
    message: str
    site: Site | None = None  # None: the whole model (loss spike)
    head: int | None = None
    started: int | None = None
    projected_steps: float | None = None

    @property
    def key(self) -> tuple:
        return (self.site, self.head, self.type)

    @property
    def layer(self) -> int | None:
        return None if self.site is None else self.site.layer

    def where(self) -> str:
        if self.site is None:
            return "model"
        return f"{self.site} head {self.head}" if self.head is not None else str(self.site)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["site"] = None if self.site is None else {"layer": self.site.layer, "stack": self.site.stack,
                                                     "kind": self.site.kind}
        d["layer"] = self.layer
        for k in ("value", "threshold", "projected_steps"):
            if isinstance(d[k], float) and not math.isfinite(d[k]):
                d[k] = None if math.isnan(d[k]) else ("inf" if d[k] > 0 else "-inf")
        return d


@dataclass
class Diagnosis:
    """The issues found at one observed step; ``new``: those not warned about before."""

    step: int
    issues: list[Issue] = field(default_factory=list)
    new: list[Issue] = field(default_factory=list)

    def has_issues(self) -> bool:
        return bool(self.issues)

    def of_type(self, *types: str) -> list[Issue]:
        return [i for i in self.issues if i.type in types]
