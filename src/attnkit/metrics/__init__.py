"""Pure tensor functions: per-row attention statistics, their streamed aggregation, numeric limits."""

from attnkit.metrics.accumulate import SPIKE_THRESHOLD, HeadStatsAccumulator, RowChunk
from attnkit.metrics.numeric import exp_overflow_threshold, max_finite, overflow_margin_bits

__all__ = [
    "SPIKE_THRESHOLD", "HeadStatsAccumulator", "RowChunk",
    "exp_overflow_threshold", "max_finite", "overflow_margin_bits",
]
