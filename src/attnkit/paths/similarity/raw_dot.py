"""Raw dot product: S_ij = p_i·p_j = Σ_v p_i(v) p_j(v), the probability that two paths sample the same token.

    >>> import torch
    >>> RawDot()(torch.tensor([[1.0, 0.0], [0.6, 0.8]]))[0, 1]   # 1*0.6 + 0*0.8
    tensor(0.6000)

Confidence-weighted: in [0, 1], large only when both paths are peaked on the same token; near-uniform
paths all score ~1/V, so their weights are near uniform whatever they share.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from attnkit.paths.similarity.base import register_similarity, upcast


@register_similarity("raw_dot")
class RawDot(nn.Module):
    def forward(self, p: torch.Tensor) -> torch.Tensor:
        p = upcast(p)  # (..., N, V)
        return p @ p.transpose(-1, -2)  # (..., N, N)
