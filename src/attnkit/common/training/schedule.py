"""Learning-rate schedule: linear warmup, then a cosine down to a floor (nanoGPT's).

The factor is a small dataclass, not a lambda, so ``LambdaLR.state_dict`` keeps it as plain
numbers and a checkpoint loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """The factor of the peak learning rate at ``step`` (0-based: the step about to run).

    Steps 0 .. warmup-1 rise linearly to 1 (step 0 gets 1/warmup, never 0: a first step that
    does nothing wastes a step); from there a half cosine falls to ``min_ratio`` at the last step.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - 1 - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class WarmupCosine:
    """``warmup_cosine`` as a callable for ``LambdaLR``."""

    warmup_steps: int
    total_steps: int
    min_ratio: float

    def __call__(self, step: int) -> float:
        return warmup_cosine(step, self.warmup_steps, self.total_steps, self.min_ratio)


def make_scheduler(optimizer: Optimizer, warmup_steps: int, total_steps: int, min_ratio: float) -> LambdaLR:
    return LambdaLR(optimizer, WarmupCosine(warmup_steps, total_steps, min_ratio))
