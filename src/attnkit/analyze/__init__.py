"""analyze: per-head attention statistics from the real logits, and diagnoses with suggestions."""

from attnkit.analyze.diagnose import DETECTORS, Issue, diagnose
from attnkit.analyze.run import SCHEMA_VERSION, Analysis, Analyzer, analyze
from attnkit.common.tokenize import tokenize

__all__ = ["DETECTORS", "SCHEMA_VERSION", "Analysis", "Analyzer", "Issue", "analyze", "diagnose", "tokenize"]
