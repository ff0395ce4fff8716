"""What the monitor finds: a ``Finding`` per (site, head, type) and a step's ``Diagnosis``."""

from __future__ import annotations

from dataclasses import dataclass, field

from attnkit.common.findings import Finding

# The keys of an issue in monitor.jsonl, in order (``Finding.to_dict``).
ISSUE_KEYS = ("type", "severity", "step", "value", "threshold", "message", "site", "head", "started",
              "projected_steps", "layer")


@dataclass
class Diagnosis:
    """The issues found at one observed step; ``new``: those not warned about before."""

    step: int
    issues: list[Finding] = field(default_factory=list)
    new: list[Finding] = field(default_factory=list)

    def has_issues(self) -> bool:
        return bool(self.issues)

    def of_type(self, *types: str) -> list[Finding]:
        return [i for i in self.issues if i.type in types]
