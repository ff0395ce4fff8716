"""Numerical limits of floating-point formats that attention logits run into."""

from __future__ import annotations

import math

import torch

# exp(x) overflows when x > ln(max finite): fp16 at 11.09, bf16/fp32 at 88.72. A softmax that
# subtracts the row max never evaluates exp of a positive number, so this bites only naive
# kernels; QK^T itself overflows when a raw dot product exceeds the format's max (fp16: 65,504).


def max_finite(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def exp_overflow_threshold(dtype: torch.dtype) -> float:
    return math.log(max_finite(dtype))


def overflow_margin_bits(largest_abs_value: float, dtype: torch.dtype) -> float:
    """log2(max finite / largest value): bits of headroom; <= 0 means it overflowed."""
    if not math.isfinite(largest_abs_value):
        return -math.inf
    if largest_abs_value <= 0:
        return math.inf
    return math.log2(max_finite(dtype) / largest_abs_value)
