"""What each floating-point format does to attention logits: where it overflows and how much
rounding a logit distorts the attention weights.

fp16 holds |x| <= 65,504 with 11 significant bits; bf16 has fp32's range with 8 significant bits
(values in [512, 1024) are spaced 4 apart). A logit L stored in a format with s significant bits
is off by at most half a spacing, 2^(floor(log2|L|) - s), which is <= |L| 2^-s: |L| 2^-8 in bf16,
|L| 2^-11 in fp16. The softmax turns an error e in one logit into a factor e^e on that weight
(relative to the others): logits of 100 in bf16 (spacing 0.5) move weights by up to e^0.25 = 1.28.

A logit computed in the format inherits more than its own final rounding: the normed input x,
W_q, W_k, q and k are each stored in the format too, and each rounding moves the logit by up to
|L| 2^-s again (seven in all, the worst case adding up, independent ones adding in quadrature to
~2.6). The check takes ``LOGIT_ROUNDINGS`` = 4 such errors: logit error = 4 |L| 2^-s. (One rounding,
half a spacing, was right about every case it called unsafe but missed 16 of 66 unsafe cases
on a validation grid, all with logits 3-8x below its limits; 4 was chosen from those figures and
tested on fresh grids. Errors grow with
depth, which this does not model: at 4 layers fp16 breaks from logits of ~17, recall 0.62 there.)

Tolerance (the one number the verdicts rest on): an attention weight may change by at most
``DISTORTION_TOLERANCE`` (``THRESHOLDS["distortion_tolerance"]`` in ``attnkit.common.findings``,
which says why 10 %).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from attnkit.common.findings import threshold

DISTORTION_TOLERANCE = threshold("distortion_tolerance")
LOGIT_ROUNDINGS = 4  # rounding errors of size |L| 2^-s a logit inherits (see above)


@dataclass(frozen=True)
class FloatFormat:
    name: str
    max_finite: float
    significant_bits: int  # including the implicit leading bit

    @property
    def exp_overflow(self) -> float:
        """exp(x) overflows past ln(max): 11.09 in fp16 (a softmax that skips max-subtraction)."""
        return math.log(self.max_finite)

    def half_spacing(self, value: float) -> float:
        """Largest rounding error of ``value`` stored in this format (round to nearest)."""
        magnitude = abs(value)
        if magnitude == 0 or not math.isfinite(magnitude):
            return 0.0 if magnitude == 0 else math.inf
        exponent = math.floor(math.log2(magnitude))
        return 2.0 ** (exponent - self.significant_bits)

    def relative_error_bound(self) -> float:
        """|L| 2^-s: the bound the check guide states (bf16 2^-8, fp16 2^-11)."""
        return 2.0 ** -self.significant_bits

    def logit_error(self, logit: float) -> float:
        """Error a logit of this size carries when computed in this format: LOGIT_ROUNDINGS |L| 2^-s."""
        return LOGIT_ROUNDINGS * abs(logit) * self.relative_error_bound()

    def distortion(self, logit: float) -> float:
        """Largest relative change of an attention weight from the error of a logit of this size: e^err - 1."""
        err = self.logit_error(logit)
        return math.expm1(err) if err < 700 else math.inf

    def largest_tolerated_logit(self, tolerance: float = DISTORTION_TOLERANCE) -> float:
        """The logit at which the distortion reaches ``tolerance``."""
        return math.log1p(tolerance) / (LOGIT_ROUNDINGS * self.relative_error_bound())


FORMATS: dict[str, FloatFormat] = {
    "fp16": FloatFormat("fp16", 65504.0, 11),
    "bf16": FloatFormat("bf16", 3.3895313892515355e38, 8),
    "fp32": FloatFormat("fp32", 3.4028234663852886e38, 24),
}
ALIASES = {"float16": "fp16", "half": "fp16", "bfloat16": "bf16", "float32": "fp32", "float": "fp32"}


def format_named(name: str) -> FloatFormat:
    from attnkit.errors import UserError

    key = ALIASES.get(name, name)
    if key not in FORMATS:
        raise UserError(f"unknown dtype {name!r}; use fp16, bf16 or fp32")
    return FORMATS[key]
