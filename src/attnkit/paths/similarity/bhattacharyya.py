"""Bhattacharyya coefficient: S_ij = Σ_v sqrt(p_i(v) p_j(v)), the overlap of two distributions, in [0, 1].

    >>> import torch
    >>> Bhattacharyya()(torch.tensor([[0.5, 0.5], [1.0, 0.0]]))[0, 1]   # sqrt(0.5)
    tensor(0.7071)

A cosine of sqrt(p) vectors (|sqrt(p)| = 1): one matmul, no pairwise V tensor. sqrt is taken of a
clamped p so its gradient stays finite where a probability is 0.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from attnkit.paths.similarity.base import register_similarity, upcast


@register_similarity("bhattacharyya")
class Bhattacharyya(nn.Module):
    def forward(self, p: torch.Tensor) -> torch.Tensor:
        r = upcast(p).clamp_min(1e-30).sqrt()  # (..., N, V)
        return (r @ r.transpose(-1, -2)).clamp(max=1.0)  # (..., N, N); rounding can exceed 1 by an ulp
