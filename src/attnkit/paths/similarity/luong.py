"""Learnable Luong (bilinear) similarity with a low-rank W = U Vᵀ: S_ij = (q_i U)·(q_j V).

q is the distribution itself (``basis="vocab"``: U, V are V x r) or the path's expected embedding
p E (pass ``embedding=``: U, V are d x r). Parameters: 2 r V on the vocabulary (38.4M at V = 150k,
r = 128), 2 r d through the embedding (524k at d = 2048, r = 128); a full-rank W would be V^2.
U and V start equal, U = V ~ N(0, 1/r), so S starts as a random-projection estimate of q_i·q_j
(the raw dot product on the vocabulary) and learns from there.

    >>> import torch
    >>> sim = Luong(vocab_size=3, rank=2)
    >>> with torch.no_grad():
    ...     _ = sim.u.copy_(torch.eye(3, 2)), sim.v.copy_(torch.eye(3, 2))
    >>> sim(torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0]]))[0, 1]   # (0.5, 0.5)·(0, 1)
    tensor(0.5000, grad_fn=<SelectBackward0>)
"""

from __future__ import annotations

import torch
import torch.nn as nn

from attnkit.paths.similarity.base import register_similarity
from attnkit.paths.similarity.basis import Basis


@register_similarity("luong")
class Luong(nn.Module):
    def __init__(self, vocab_size: int | None = None, embedding: torch.Tensor | nn.Embedding | None = None,
                 rank: int = 128, seed: int | None = None):
        super().__init__()
        self.basis = Basis(vocab_size, embedding)
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        init = torch.randn(self.basis.dim, rank, generator=g) / rank**0.5
        self.u = nn.Parameter(init.clone())
        self.v = nn.Parameter(init.clone())

    @staticmethod
    def parameter_count(dim: int, rank: int = 128) -> int:
        """Parameters for comparing in a space of ``dim`` (the vocabulary, or the embedding width)."""
        return 2 * dim * rank

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        q = self.basis(p)  # (..., N, dim)
        return (q @ self.u) @ (q @ self.v).transpose(-1, -2)  # (..., N, r) x (..., r, N) -> (..., N, N)
