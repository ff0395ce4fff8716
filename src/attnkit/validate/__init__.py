"""validate: the nine-section attention validation report (correct, interpretable, significant, helping).

Sections (one module each): sanity, positional, tokens, statistics, heads, query_variation,
diversity, gradients, ablation; ``run.validate`` orchestrates, ``summary`` counts and
concludes; ``render`` (console) and ``html`` render the report.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from attnkit.common.lazy import lazy_exports

# name -> the module that defines it, imported on first use (see attnkit.common.lazy)
_EXPORTS = {
    "Options": "attnkit.validate.options",
    "SCHEMA_VERSION": "attnkit.validate.run",
    "ValidationReport": "attnkit.validate.run",
    "validate": "attnkit.validate.run",
    "SECTIONS": "attnkit.validate.sections",
    "CRITICAL": "attnkit.validate.types",
    "INFO": "attnkit.validate.types",
    "OK": "attnkit.validate.types",
    "WARN": "attnkit.validate.types",
    "Check": "attnkit.validate.types",
    "Section": "attnkit.validate.types",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # what type checkers and the API reference read
    from attnkit.validate.options import Options
    from attnkit.validate.run import SCHEMA_VERSION, ValidationReport, validate
    from attnkit.validate.sections import SECTIONS
    from attnkit.validate.types import CRITICAL, Check, INFO, OK, Section, WARN
