"""The curvature bound of the softmax, kappa = (||q|| ||k|| / sqrt(d)) exp(2 * logit range),
and the precision it asks for.

The bound grows like exp(2 * range): a row whose logits span 10 already has kappa ~ 5e8.
Its precision rule, bits = log2(kappa T^2 / 1e-6), demands log2(T^2 / 1e-6) = 34 bits at T = 128
before kappa enters, more than fp32's 24, for every model; so the check reports it, and uses the
plainer criterion "kappa within the format's precision" (log2 kappa <= significant bits) for the
curvature column of the stability regions. Safety verdicts rest on overflow and rounding
(``safety.py``), which the validation experiment tests.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from attnkit.check.dtypes import FloatFormat
from attnkit.check.estimate import LogitEstimate
from attnkit.check.gaussian import expected_range

TARGET_ERROR = 1e-6  # the accuracy the precision formula aims at


@dataclass(frozen=True)
class Curvature:
    log10_kappa: float
    seed_precision_bits: float  # log2(kappa * T^2 / 1e-6): the precision the bound asks for (the JSON keeps this name)
    row_range: float  # the logit range of a full-length row it was computed from

    def within(self, fmt: FloatFormat) -> bool:
        return self.log10_kappa * math.log2(10) <= fmt.significant_bits

    def to_dict(self) -> dict:
        return {"log10_kappa": self.log10_kappa, "seed_precision_bits": self.seed_precision_bits,
                "row_range": self.row_range}


def curvature(est: LogitEstimate, head_dim: int) -> Curvature:
    """kappa for the longest row; ||q|| ||k|| = sqrt(d) * std(q.k) under the isotropic-input model."""
    full_row_range = est.sigma_logit * expected_range(est.keys_seen)
    if est.softcap:
        full_row_range = min(full_row_range, 2 * est.softcap)
    if est.bound is not None:
        full_row_range = min(full_row_range, 2 * est.bound)
    norms = math.sqrt(head_dim) * est.sigma_raw * est.scale  # ||q|| ||k|| * scale (scale = 1/sqrt(d) by default)
    log10_kappa = (math.log10(norms) if norms > 0 else -math.inf) + 2 * full_row_range / math.log(10)
    bits = log10_kappa * math.log2(10) + 2 * math.log2(max(est.seq_len, 1)) + math.log2(1 / TARGET_ERROR)
    return Curvature(log10_kappa, bits, full_row_range)
