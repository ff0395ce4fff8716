"""The M3PO blend of input embeddings: x_i = (1 - λ) e_i + λ c_i with c_i = Σ_j A_ij e_j.

A row of A that is all zero (an inactive path, or one alone) leaves e_i exactly as it is: a path
with no partner is not shrunk towards 0. At λ = 0 the result is e bit for bit.

    >>> import torch
    >>> e = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    >>> blend(e, torch.tensor([[0.0, 1.0], [0.0, 0.0]]), lam=0.25)
    tensor([[0.7500, 0.2500],
            [0.0000, 1.0000]])
"""

from __future__ import annotations

import torch

from attnkit.errors import UserError


def check_lambda(lam: float) -> None:
    if not 0.0 <= lam <= 1.0:
        raise UserError(f"the blend weight lambda must be in [0, 1], got {lam}")


def blend(emb: torch.Tensor, weights: torch.Tensor, lam: float) -> torch.Tensor:
    """``emb (..., N, D)``, ``weights (..., N, N)`` -> blended ``(..., N, D)`` in ``emb``'s dtype."""
    check_lambda(lam)
    c = (weights.to(emb.dtype) @ emb)  # (..., N, D): the partners' embeddings, weighted
    mixed = (1.0 - lam) * emb + lam * c
    return torch.where(weights.sum(-1, keepdim=True) > 0, mixed, emb)
