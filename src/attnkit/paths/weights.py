"""From similarities to blend weights, the one function every similarity shares, and its statistics.

    A_ij = softmax_{j != i, j active}(S_ij / T),   A_ii = 0,   A_ij = 0 if i or j is inactive.

A path that left the thinking phase neither gives nor receives weight; an active path with no active
partner gets an all-zero row (nothing to blend with: :func:`attnkit.paths.blend.blend` leaves it as it is).

    >>> import torch
    >>> S = torch.tensor([[1.0, 0.8, 0.5], [0.8, 1.0, 0.5], [0.5, 0.5, 1.0]])
    >>> path_weights(S, torch.tensor([True, True, False]), temperature=0.1)
    tensor([[0., 1., 0.],
            [1., 0., 0.],
            [0., 0., 0.]])
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from attnkit.errors import UserError
from attnkit.paths.similarity import upcast


def allowed_pairs(active: torch.Tensor) -> torch.Tensor:
    """``(..., N)`` bool -> ``(..., N, N)``: j may give weight to i (both active, j != i)."""
    n = active.shape[-1]
    eye = torch.eye(n, dtype=torch.bool, device=active.device)
    return active.unsqueeze(-1) & active.unsqueeze(-2) & ~eye


def path_weights(sim: torch.Tensor, active: torch.Tensor | None = None, temperature: float = 0.1) -> torch.Tensor:
    """Temperature softmax of ``sim (..., N, N)`` over active j != i; rows sum to 1 or are all zero."""
    if not temperature > 0 or not math.isfinite(temperature):
        raise UserError(f"the similarity temperature must be a positive number, got {temperature}")
    if active is None:
        active = torch.ones(sim.shape[:-1], dtype=torch.bool, device=sim.device)
    if active.shape != sim.shape[:-1] or sim.shape[-1] != sim.shape[-2]:
        raise UserError(f"similarity {tuple(sim.shape)} and active mask {tuple(active.shape)} do not match "
                        "(want (..., N, N) and (..., N))")
    ok = allowed_pairs(active)  # (..., N, N)
    logits = (upcast(sim) / temperature).masked_fill(~ok, float("-inf"))
    # a row with no allowed entry would be softmax(-inf, ..., -inf) = NaN: give it finite logits, then zero it
    logits = torch.where(ok.any(-1, keepdim=True), logits, torch.zeros_like(logits))
    return torch.softmax(logits, dim=-1) * ok


@dataclass
class WeightStats:
    """Gating statistics over the rows that blend (active paths with at least one active partner)."""

    rows: int  # rows that blend
    entropy: float  # mean row entropy of A, nats (log(N-1) = uniform over the partners)
    max_weight: float  # mean of each row's largest weight
    weight_var: float  # mean over rows of the variance of its weights over its partners
    sim_min: float  # over the allowed (i, j) pairs
    sim_max: float
    sim_mean: float

    def as_dict(self) -> dict:
        return asdict(self)


def weight_stats(weights: torch.Tensor, sim: torch.Tensor, active: torch.Tensor | None = None) -> WeightStats:
    """Statistics of ``weights`` (from :func:`path_weights`) and the similarities they came from."""
    with torch.no_grad():
        if active is None:
            active = torch.ones(sim.shape[:-1], dtype=torch.bool, device=sim.device)
        ok = allowed_pairs(active)
        rows = ok.any(-1)  # (..., N)
        n_rows = int(rows.sum())
        if n_rows == 0:
            nan = float("nan")
            return WeightStats(0, nan, nan, nan, nan, nan, nan)
        a = upcast(weights)
        ent = -(torch.xlogy(a, a)).sum(-1)[rows]
        k = ok.sum(-1).clamp_min(1).float()  # partners per row
        var = (((a - 1.0 / k.unsqueeze(-1)) ** 2) * ok).sum(-1) / k  # rows sum to 1: mean weight 1/k
        var = var[rows]
        s = upcast(sim)[ok]
        return WeightStats(n_rows, ent.mean().item(), a.amax(-1)[rows].mean().item(), var.mean().item(),
                           s.min().item(), s.max().item(), s.mean().item())
