"""Verdicts: does attention stay numerically safe in a format, given a logit estimate?

Three ways attention breaks in low precision, each with the estimate it reads:

- ``qk_overflow`` (fp16): the largest |q.k| before scaling reaches 65,504 and QK^T holds inf
  (then NaN after the softmax). Read from ``raw_absmax`` (soft-capping does not help: the cap comes
  after QK^T).
- ``rounding``: the largest logit, computed in the format, is off by ~4 |L| 2^-s (``dtypes.py``), and
  the softmax turns that into a factor e^err on a weight; beyond ``DISTORTION_TOLERANCE`` (10 %) it is unsafe.
  Read from ``model_max``.
- ``exp_overflow`` (fp16, advice only): logits above ln 65,504 = 11.09 overflow exp() in a
  softmax that does not subtract the row maximum. PyTorch's and transformers' softmax do, so it
  never makes a verdict unsafe; hand-written kernels are warned.

A verdict is ``unsafe`` when the expected figure crosses the limit, ``marginal`` when only the
99 % quantile does, ``safe`` otherwise. A model that computes attention in fp32 whatever its
dtype (``reorder_and_upcast_attn``) is judged as fp32.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from attnkit.check.dtypes import DISTORTION_TOLERANCE, FORMATS, FloatFormat
from attnkit.check.estimate import LogitEstimate
from attnkit.common.findings import Finding

SAFE, MARGINAL, UNSAFE = "safe", "marginal", "unsafe"
_ORDER = {SAFE: 0, MARGINAL: 1, UNSAFE: 2}


# The keys of a finding in check's JSON, in order, and the ``Finding`` field each holds.
FINDING_KEYS = {"kind": "type", "status": "severity", "value": "value", "limit": "threshold", "message": "message"}


@dataclass
class Verdict:
    dtype: str
    status: str
    findings: list[Finding] = field(default_factory=list)
    distortion: float = 0.0  # expected largest relative change of a weight from rounding the largest logit
    judged_as: str | None = None  # "fp32" when the model upcasts attention

    def to_dict(self) -> dict:
        return {"dtype": self.dtype, "status": self.status, "distortion": self.distortion,
                "judged_as": self.judged_as, "findings": [f.to_dict(FINDING_KEYS) for f in self.findings]}


def worst(statuses) -> str:
    return max(statuses, key=lambda s: _ORDER[s], default=SAFE)


def judge(est: LogitEstimate, dtype: str, upcast: bool = False, tolerance: float = DISTORTION_TOLERANCE) -> Verdict:
    fmt: FloatFormat = FORMATS["fp32" if upcast else dtype]
    findings: list[Finding] = []
    # QK^T overflow: only where the format's range can be reached.
    limit = fmt.max_finite
    largest_raw = max(est.raw_absmax, est.model_max)
    largest_raw_high = max(est.raw_absmax_high, est.model_max_high)
    status = UNSAFE if largest_raw >= limit else MARGINAL if largest_raw_high >= limit else SAFE
    if fmt.max_finite < 1e10:
        findings.append(Finding(type="qk_overflow", severity=status, value=largest_raw, threshold=limit,
                                message=f"largest |q.k| before scaling ~ {largest_raw:,.0f} (99 %: {largest_raw_high:,.0f}) "
                                f"against {fmt.name}'s largest value {limit:,.0f}"))
    # Rounding of the largest logit.
    distortion = fmt.distortion(est.model_max)
    distortion_high = fmt.distortion(est.model_max_high)
    tolerated = fmt.largest_tolerated_logit(tolerance)
    status = UNSAFE if distortion > tolerance else MARGINAL if distortion_high > tolerance else SAFE
    findings.append(Finding(type="rounding", severity=status, value=est.model_max, threshold=tolerated,
                            message=f"largest logit ~ {est.model_max:.3g} (99 %: {est.model_max_high:.3g}): computed in {fmt.name} it "
                            f"carries an error of ~{fmt.logit_error(est.model_max):.3g} (4 roundings of |L| 2^-{fmt.significant_bits}), "
                            f"moving attention weights by up to "
                            f"{100 * distortion:.3g} % (tolerance {100 * tolerance:.0f} %: logits below {tolerated:.3g})"))
    if fmt.name == "fp16" and est.model_max > fmt.exp_overflow:
        findings.append(Finding(type="exp_overflow", severity="advice", value=est.model_max, threshold=fmt.exp_overflow,
                                message=f"logits ~ {est.model_max:.3g} exceed ln 65,504 = {fmt.exp_overflow:.2f}: a softmax "
                                f"that does not subtract the row maximum overflows (PyTorch's does)"))
    return Verdict(dtype, worst(f.severity for f in findings if f.severity != "advice"), findings, distortion,
                   "fp32" if upcast and dtype != "fp32" else None)
