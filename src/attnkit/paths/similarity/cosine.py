"""Cosine similarity of the paths' distributions (M3PO's baseline): S_ij = p_i·p_j / (|p_i| |p_j|).

    >>> import torch
    >>> Cosine()(torch.tensor([[1.0, 0.0], [0.6, 0.8]]))[0, 1]   # 0.6 / (1 * 1)
    tensor(0.6000)

Scale-free, in [0, 1] for distributions; two identical distributions score 1 however flat.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from attnkit.paths.similarity.base import register_similarity, upcast


@register_similarity("cosine")
class Cosine(nn.Module):
    def forward(self, p: torch.Tensor) -> torch.Tensor:
        # |p|_2 >= 1/sqrt(V) for a distribution, so eps never decides unless p is all zeros
        q = F.normalize(upcast(p), dim=-1, eps=1e-12)  # (..., N, V)
        return q @ q.transpose(-1, -2)  # (..., N, N)
