"""Verdicts: does attention stay numerically safe in a format, given a logit estimate?

Three ways attention breaks in low precision, each with the estimate it reads:

- ``qk_overflow`` (fp16): the largest value the kernel stores before the softmax reaches 65,504 and
  QK^T holds inf (then NaN after the softmax): the raw |q.k| before the scale for eager attention,
  the logit for SDPA and fused kernels (``check.kernels``). Read from ``raw_absmax`` (soft-capping
  does not help: the cap comes after QK^T); the head with the largest figure is named when there
  are per-head figures (weights, a measured forward).
- ``rounding``: the largest logit, computed in the format, is off by ~4 |L| 2^-s (``dtypes.py``), and
  the softmax turns that into a factor e^err on a weight; beyond ``DISTORTION_TOLERANCE`` (10 %) it is unsafe.
  Read from ``model_max``.
- ``activation_overflow`` (fp16, measured forwards only): the largest output of any module (an MLP,
  a norm) reaches the format's largest value; the estimate has no figure for it.
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
from attnkit.check.kernels import kernel_words, stored_product
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


def _product_per_logit(est: LogitEstimate) -> float:
    """The stored figure per unit of logit: 1/scale for a kernel that stores the raw q.k (when the
    scale is below 1), else 1."""
    return stored_product(est.kernel, 1.0 / est.scale, 1.0) if est.scale > 0 else 1.0


def _largest_head(est: LogitEstimate) -> tuple[int | None, int | None]:
    """(layer, head) whose stored product is largest, from the per-head figures (weights or a
    measured forward); (None, None) without them."""
    rows = [h for h in est.per_head if h.get("raw_absmax") is not None]
    if not rows:
        return None, None
    top = max(rows, key=lambda h: stored_product(est.kernel, h["raw_absmax"], h["raw_absmax"] * est.scale))
    return top.get("layer"), top.get("head")


def worst(statuses) -> str:
    return max(statuses, key=lambda s: _ORDER[s], default=SAFE)


def judge(est: LogitEstimate, dtype: str, upcast: bool = False, tolerance: float = DISTORTION_TOLERANCE,
          activation: tuple[float, str | None] | None = None) -> Verdict:
    """``dtype``'s verdict on ``est``. ``activation``: the largest |output| of any module in a measured
    forward and its name, judged against the format's largest value (``activation_overflow``:
    unsafe past it, marginal within a factor 2); the estimate alone has no such figure."""
    fmt: FloatFormat = FORMATS["fp32" if upcast else dtype]
    findings: list[Finding] = []
    if activation is not None and activation[0] is not None and FORMATS[dtype].max_finite < 1e10:
        # the rest of the model runs in dtype even where attention upcasts
        value, module = activation
        limit = FORMATS[dtype].max_finite
        status = UNSAFE if not value < limit else MARGINAL if value >= limit / 2 else SAFE
        findings.append(Finding(type="activation_overflow", severity=status, value=value, threshold=limit,
                                message=f"largest module output {value:,.0f}" + (f" ({module})" if module else "")
                                + f" against {FORMATS[dtype].name}'s largest value {limit:,.0f}: outside attention, "
                                  f"an output past it is inf and the next layer's attention NaN"))
    # QK^T overflow: only where the format's range can be reached; the figure the kernel stores
    # (eager: the raw q.k before the scale; SDPA and fused kernels: the logit, check.kernels)
    limit = fmt.max_finite
    largest_raw = stored_product(est.kernel, est.raw_absmax, max(est.raw_absmax * est.scale, est.model_max))
    largest_raw_high = stored_product(est.kernel, est.raw_absmax_high,
                                      max(est.raw_absmax_high * est.scale, est.model_max_high))
    status = UNSAFE if largest_raw >= limit else MARGINAL if largest_raw_high >= limit else SAFE
    if fmt.max_finite < 1e10:
        layer, head = _largest_head(est)
        where = f" at layer {layer} head {head}" if head is not None else ""
        findings.append(Finding(type="qk_overflow", severity=status, value=largest_raw, threshold=limit, layer=layer,
                                head=head,
                                message=f"largest |q.k| the kernel stores ~ {largest_raw:,.0f} (99 %: {largest_raw_high:,.0f})"
                                f"{where} against {fmt.name}'s largest value {limit:,.0f}; {kernel_words(est.kernel)}, "
                                f"so logits may reach {limit * min(1.0, 1.0 / _product_per_logit(est)):,.0f} "
                                f"before it overflows"))
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
