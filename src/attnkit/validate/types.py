"""What a validation section returns: a titled list of checks, each ok / info / warn / critical."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

OK, INFO, WARN, CRITICAL = "ok", "info", "warn", "critical"
STATUSES = (OK, INFO, WARN, CRITICAL)
SYMBOLS = {OK: "✓", INFO: "ℹ", WARN: "⚠", CRITICAL: "❌"}


@dataclass
class Check:
    """One finding. ``name`` is short (used in the summary), ``message`` is the full sentence."""

    name: str
    status: str
    message: str
    figures: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown status {self.status!r}")

    def to_json(self) -> dict:
        return {"name": self.name, "status": self.status, "message": self.message, "figures": jsonable(self.figures)}


@dataclass
class Section:
    """A section of the report: ``notes`` are plain detail lines shown before the checks."""

    key: str
    title: str
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)

    def add(self, name: str, status: str, message: str, **figures: Any) -> Check:
        check = Check(name, status, message, figures)
        self.checks.append(check)
        return check

    def to_json(self) -> dict:
        return {"key": self.key, "title": self.title, "notes": list(self.notes),
                "checks": [c.to_json() for c in self.checks], "figures": jsonable(self.figures)}


def jsonable(value: Any) -> Any:
    """Plain JSON: NaN -> null, ±inf -> "inf"/"-inf", tensors and numpy scalars -> numbers/lists."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return jsonable(value.tolist())
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    return str(value)
