"""Learnable Bahdanau (additive) similarity: S_ij = vᵀ tanh(W₁ q_i + W₂ q_j + b).

q is the distribution (``basis="vocab"``: W₁, W₂ are a x V) or the expected embedding p E (pass
``embedding=``: a x d). Parameters: 2 a V + 2 a on the vocabulary (76.8M at V = 150k, a = 256),
2 a d + 2 a through the embedding (1.05M at d = 2048). Memory stays O(N a + N² a): W q is taken per
path and the pairs only add two a-vectors. Bounded: |S| <= |v|_1 whatever the distributions.

    >>> import torch
    >>> sim = Bahdanau(vocab_size=2, dim=1)
    >>> with torch.no_grad():
    ...     _ = sim.w1.weight.fill_(1.0), sim.w2.weight.fill_(1.0), sim.w1.bias.zero_(), sim.v.fill_(1.0)
    >>> sim(torch.tensor([[1.0, 0.0], [0.5, 0.5]]))[0, 1]   # tanh(1 + 1)
    tensor(0.9640, grad_fn=<SelectBackward0>)
"""

from __future__ import annotations

import torch
import torch.nn as nn

from attnkit.paths.similarity.base import register_similarity
from attnkit.paths.similarity.basis import Basis


@register_similarity("bahdanau")
class Bahdanau(nn.Module):
    def __init__(self, vocab_size: int | None = None, embedding: torch.Tensor | nn.Embedding | None = None,
                 dim: int = 256, seed: int | None = None):
        super().__init__()
        self.basis = Basis(vocab_size, embedding)
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        d = self.basis.dim
        # |q| <= ~1 in either basis (a distribution, or its expected unit-norm embedding): unit-variance W gives W q = O(1)
        self.w1 = nn.Linear(d, dim)  # its bias is the b above
        self.w2 = nn.Linear(d, dim, bias=False)
        self.v = nn.Parameter(torch.randn(dim, generator=g) / dim**0.5)
        with torch.no_grad():
            self.w1.weight.copy_(torch.randn(dim, d, generator=g))
            self.w2.weight.copy_(torch.randn(dim, d, generator=g))
            self.w1.bias.zero_()

    @staticmethod
    def parameter_count(dim: int, attn_dim: int = 256) -> int:
        return 2 * attn_dim * dim + 2 * attn_dim

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        q = self.basis(p)  # (..., N, d)
        a, b = self.w1(q), self.w2(q)  # (..., N, a) each
        return torch.tanh(a.unsqueeze(-2) + b.unsqueeze(-3)) @ self.v  # (..., N, N, a) @ (a,) -> (..., N, N)
