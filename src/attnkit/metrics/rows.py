"""Per-row attention statistics: pure functions of tensors, no model knowledge.

Shapes: ``probs`` and ``logits`` are ``(B, H, R, K)`` for R query rows over K keys; ``allowed``
is a bool tensor broadcastable to that shape (True = the row may see the key). Masked logits
are ``-inf`` and masked probabilities exactly 0. Every function returns ``(B, H, R)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def visible_keys(allowed: Tensor, shape: torch.Size) -> Tensor:
    """Number of keys each row can see (causal rows see fewer)."""
    if allowed.shape[-1] == shape[-1]:  # count on the mask as given, then broadcast: no (B, H, R, K) pass
        return allowed.sum(-1).expand(shape[:-1]).contiguous()
    return allowed.expand(shape).sum(-1)


def entropy(probs: Tensor) -> Tensor:
    """Shannon entropy in nats; 0 log 0 = 0."""
    return -torch.special.xlogy(probs, probs).sum(-1)


def normalized_entropy(row_entropy: Tensor, n_visible: Tensor) -> Tensor:
    """H / ln(n_visible): 1 = uniform over what the row can see, 0 = one key. NaN where n_visible < 2."""
    log_n = torch.log(n_visible.to(row_entropy.dtype))
    return torch.where(n_visible >= 2, row_entropy / log_n.clamp_min(1e-12), torch.nan)


def effective_keys(row_entropy: Tensor) -> Tensor:
    """exp(H): the number of keys a uniform row with the same entropy would spread over."""
    return torch.exp(row_entropy)


def max_probability(probs: Tensor) -> Tensor:
    return probs.amax(-1)


def std_over_visible(probs: Tensor, allowed: Tensor, n_visible: Tensor) -> Tensor:
    """Standard deviation of a row's weights over the keys it can see (population std)."""
    return std_from_sum_sq(sum_sq(probs), n_visible)


def sum_sq(probs: Tensor) -> Tensor:
    """Sum of squared weights of each row."""
    return (probs * probs).sum(-1)


def std_from_sum_sq(row_sum_sq: Tensor, n_visible: Tensor, row_mass: Tensor | None = None) -> Tensor:
    """``std_over_visible`` from a row's sum of squared weights. The weights sum to one, or to
    ``row_mass`` where a learned sink (a key without a value) takes the rest of the row."""
    n = n_visible.clamp_min(1).to(row_sum_sq.dtype)
    mean = (1.0 if row_mass is None else row_mass.to(row_sum_sq.dtype)) / n
    sq = row_sum_sq / n
    return (sq - mean * mean).clamp_min(0).sqrt()


def logit_max(logits: Tensor, allowed: Tensor) -> Tensor:
    return logits.masked_fill(~allowed, -math.inf).amax(-1)


def logit_min(logits: Tensor, allowed: Tensor) -> Tensor:
    return logits.masked_fill(~allowed, math.inf).amin(-1)


def logit_extremes(logits: Tensor, allowed: Tensor) -> tuple[Tensor, Tensor]:
    """``(logit_max, logit_min)`` in one pass over the row, with the same values (NaN propagates).

    Masked keys are filled with the row's first visible logit, which changes neither extreme;
    rows that see nothing get -inf / +inf as ``logit_max`` / ``logit_min`` do.
    """
    shape = logits.shape
    if bool(allowed.all()):
        return logits.amax(-1), logits.amin(-1)
    first = first_visible_index(allowed, shape).unsqueeze(-1)
    filled = torch.where(allowed, logits, logits.gather(-1, first))
    hi, lo = filled.amax(-1), filled.amin(-1)  # (two plain reductions beat one aminmax on CPU)
    blind = ~allowed.any(-1)
    if bool(blind.any()):
        blind = blind.expand(shape[:-1])
        hi, lo = hi.masked_fill(blind, -math.inf), lo.masked_fill(blind, math.inf)
    return hi, lo


def first_visible_index(allowed: Tensor, shape: torch.Size) -> Tensor:
    """Index of the first key a row can see: the sink position (0 unless left-padded)."""
    if allowed.shape[-1] == shape[-1]:  # on the mask as given, then broadcast
        return allowed.to(torch.uint8).argmax(-1).expand(shape[:-1]).contiguous()
    return allowed.expand(shape).to(torch.uint8).argmax(-1)


def sink_mass(probs: Tensor, allowed: Tensor) -> Tensor:
    """Probability on the first visible key."""
    first = first_visible_index(allowed, probs.shape)
    return probs.gather(-1, first.unsqueeze(-1)).squeeze(-1)


def diagonal_mass(probs: Tensor, query_positions: Tensor) -> Tensor:
    """Probability a row puts on its own position. ``query_positions`` (R,) are key indices of the queries."""
    idx = query_positions.view(1, 1, -1, 1).expand(*probs.shape[:-1], 1)
    return probs.gather(-1, idx.clamp_max(probs.shape[-1] - 1)).squeeze(-1)


def mean_distance(probs: Tensor, query_positions: Tensor) -> Tensor:
    """Expected |query position - key position| under the row's distribution."""
    keys = torch.arange(probs.shape[-1], device=probs.device, dtype=probs.dtype)
    dist = (query_positions.to(probs.dtype).view(-1, 1) - keys.view(1, -1)).abs()  # (R, K)
    return (probs * dist).sum(-1)


def log10_curvature(query_norm: Tensor, key_norm_max: Tensor, scale: float, logit_range: Tensor) -> Tensor:
    """The curvature estimate of the softmax, kappa = (|q| |k| / sqrt(d)) * exp(2 * logit spread), as log10.

    It is usually written with the spread as ||QK^T||_inf / sqrt(d); softmax is invariant to a shift of
    the row, so the row's logit range (max - min over visible keys) is the part that matters.
    It is computed from the real logits, not from log(p). Reported in log10 because it is
    exponential in the logits and overflows float32 past a range of ~44.
    """
    prefactor = (query_norm * key_norm_max * scale).clamp_min(1e-30)
    return torch.log10(prefactor) + 2.0 * logit_range / math.log(10.0)
