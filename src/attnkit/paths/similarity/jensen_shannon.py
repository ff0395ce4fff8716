"""Jensen–Shannon similarity: S_ij = 1 - sqrt(JSD(p_i, p_j)), JSD in bits so S is in [0, 1].

    >>> import torch
    >>> s = JensenShannon()(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]))
    >>> s[0, 1].item(), round(s[0, 2].item(), 4)   # disjoint supports: JSD = 1 bit; identical: 0
    (0.0, 1.0)

sqrt(JSD) is a metric (Endres & Schindelin 2003). Costs O(N^2 V) memory and time (a pairwise mixture
per pair; 8 paths x 150k vocabulary = 9.6M floats, 38 MB, per group), the dearest variant.
Safe at p = 0 (log of a clamped value, multiplied by 0) and at identical distributions (the square
root's gradient at 0 is infinite: JSD is clamped away from 0, where its gradient is then 0).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from attnkit.paths.similarity.base import register_similarity, upcast

_TINY = 1e-30  # far below any probability that matters, above float32's smallest normal (1.2e-38)


def _kl_to(p: torch.Tensor, logp: torch.Tensor, logm: torch.Tensor) -> torch.Tensor:
    return (p * (logp - logm)).sum(-1)


@register_similarity("jensen_shannon")
class JensenShannon(nn.Module):
    def forward(self, p: torch.Tensor) -> torch.Tensor:
        p = upcast(p)
        pi, pj = p.unsqueeze(-2), p.unsqueeze(-3)  # (..., N, 1, V), (..., 1, N, V)
        m = 0.5 * (pi + pj)  # (..., N, N, V)
        logm = m.clamp_min(_TINY).log()
        logp = p.clamp_min(_TINY).log()
        jsd = 0.5 * (_kl_to(pi, logp.unsqueeze(-2), logm) + _kl_to(pj, logp.unsqueeze(-3), logm))  # nats
        jsd = (jsd / math.log(2.0)).clamp(1e-12, 1.0)  # bits; rounding can dip below 0 or above 1
        return 1.0 - jsd.sqrt()  # (..., N, N)
