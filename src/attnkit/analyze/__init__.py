"""analyze: per-head attention statistics from the real logits, and diagnoses with suggestions."""

from attnkit.analyze.diagnose import DETECTORS, diagnose
from attnkit.analyze.run import SCHEMA_VERSION, Analysis, Analyzer, analyze
from attnkit.common.findings import Finding as Issue  # the one finding type, by the name analyze users know
from attnkit.common.tokenize import tokenize

__all__ = ["DETECTORS", "SCHEMA_VERSION", "Analysis", "Analyzer", "Issue", "analyze", "diagnose", "tokenize"]
