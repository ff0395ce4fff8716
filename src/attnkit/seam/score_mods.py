"""Score modifiers that reshape the logits before the softmax, attention-gym style.

A score modifier is a plain function ``(logits, query_positions) -> logits`` on (B, H, R, K)
float32 logits; modifiers compose by listing them in order. Example::

    with attach(model, score_mods=[soft_cap(30.0)]):   # Gemma-2 style capping
        model(ids)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def temperature(t: float) -> Callable[[Tensor, Tensor], Tensor]:
    """Divide logits by t: t > 1 spreads attention, t < 1 sharpens it."""
    if t <= 0:
        raise ValueError("temperature must be positive")

    def scaled(logits: Tensor, query_positions: Tensor) -> Tensor:
        return logits / t

    return scaled


def soft_cap(cap: float) -> Callable[[Tensor, Tensor], Tensor]:
    """cap * tanh(logits / cap): logits stay within (-cap, cap), small ones barely move."""
    if cap <= 0:
        raise ValueError("the cap must be positive")

    def capped(logits: Tensor, query_positions: Tensor) -> Tensor:
        return cap * torch.tanh(logits / cap)

    return capped


def clamp(limit: float) -> Callable[[Tensor, Tensor], Tensor]:
    """Hard clamp of logits to [-limit, limit]."""

    def clamped(logits: Tensor, query_positions: Tensor) -> Tensor:
        return logits.clamp(-limit, limit)

    return clamped


SCORE_MODS: dict[str, Callable[[float], Callable[[Tensor, Tensor], Tensor]]] = {
    "temperature": temperature,
    "soft_cap": soft_cap,
    "clamp": clamp,
}
