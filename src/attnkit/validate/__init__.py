"""validate: seed 002's nine-section attention validation report (correct, interpretable, significant, helping).

Sections (one module each): sanity, positional, tokens, statistics, heads, query_variation,
diversity, gradients, ablation; ``run.validate`` orchestrates, ``summary`` counts and
concludes; ``attnkit.validate.render`` and ``validate_html`` render (all rendering lives in ``report/``).
"""

from attnkit.validate.context import Options
from attnkit.validate.run import SCHEMA_VERSION, ValidationReport, validate
from attnkit.validate.sections import SECTIONS
from attnkit.validate.types import CRITICAL, INFO, OK, WARN, Check, Section

__all__ = ["CRITICAL", "INFO", "OK", "SCHEMA_VERSION", "SECTIONS", "WARN", "Check", "Options", "Section",
           "ValidationReport", "validate"]
