"""Scaled dot product: S_ij = p_i·p_j / sqrt(V), the transformer's scaling with d = the vocabulary size.

    >>> import torch
    >>> ScaledDot()(torch.tensor([[1.0, 0.0], [0.6, 0.8]]))[0, 1]   # 0.6 / sqrt(2)
    tensor(0.4243)

As multi-path decoding (M3PO) defines it. Note what it does at scale: S <= 1/sqrt(V) (0.0026 at V = 150k), so with
T = 0.1 the softmax sees logits within 0.026 of each other and the weights are uniform to 2.6 %:
this variant is close to "average the other paths' tokens" on large vocabularies.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from attnkit.paths.similarity.base import register_similarity, upcast


@register_similarity("scaled_dot")
class ScaledDot(nn.Module):
    def forward(self, p: torch.Tensor) -> torch.Tensor:
        p = upcast(p)  # (..., N, V)
        return (p @ p.transpose(-1, -2)) / math.sqrt(p.shape[-1])  # (..., N, N)
