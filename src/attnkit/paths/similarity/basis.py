"""Where the learnable similarities compare distributions: the vocabulary, or the model's embedding space.

A learnable map on raw distributions costs V x r parameters per matrix (150k x 128 = 19.2M); a
full-rank Luong W would be V^2 = 22.5B. Projecting first through the model's own input
embedding E (V, d) -- q = p E, the path's *expected* next embedding -- makes every learnable matrix
d x r instead (2048 x 128 = 262k for a 3B Qwen), and E is borrowed, not copied: it is held outside
the module's parameters and state dict (it belongs to the model) and used detached, as a fixed basis.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from attnkit.errors import UserError
from attnkit.paths.similarity.base import upcast


class Basis(nn.Module):
    """``p (..., N, V)`` -> ``(..., N, dim)``: identity on the vocabulary, or ``p @ E`` with E's rows scaled to unit mean norm."""

    def __init__(self, vocab_size: int | None = None, embedding: torch.Tensor | nn.Embedding | None = None):
        super().__init__()
        if embedding is None and vocab_size is None:
            raise UserError("a learnable similarity needs vocab_size, or the model's embedding to project through")
        weight = embedding.weight if isinstance(embedding, nn.Embedding) else embedding
        if weight is not None and (weight.dim() != 2 or (vocab_size is not None and weight.shape[0] != vocab_size)):
            raise UserError(f"embedding must be (vocab_size, dim), got {tuple(weight.shape)} for vocab_size {vocab_size}")
        self._borrowed = (weight,) if weight is not None else ()  # a tuple: not a registered parameter
        self.vocab_size = int(weight.shape[0]) if weight is not None else int(vocab_size)
        self.dim = int(weight.shape[1]) if weight is not None else self.vocab_size

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        if p.shape[-1] != self.vocab_size:
            raise UserError(f"distributions over {p.shape[-1]} tokens given to a similarity built for {self.vocab_size}")
        p = upcast(p)
        if not self._borrowed:
            return p  # (..., N, V)
        e = self._borrowed[0].detach()  # (V, d), the model's own tensor: never copied
        # rows of unit mean norm: |q| <= ~1 as for a distribution on the vocabulary, so the learnable maps'
        # initial scale does not depend on how the model scaled its embedding. The scale divides q, not E:
        # no (V, d) temporary (1.2 GB at 150k x 2048)
        scale = torch.linalg.vector_norm(e, dim=-1, dtype=torch.float32).pow(2).mean().sqrt().clamp_min(1e-12)
        q = (p.to(e.dtype) @ e).to(p.dtype) if e.dtype != p.dtype else p @ e  # a half model: its own precision
        return q / scale.to(p.dtype)  # (..., N, d)
