"""What every attention call is, whatever the model: query, key, value, a mask and a scale."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from attnkit.metrics.accumulate import RowChunk


@dataclass
class AttentionCall:
    """One call of an attention function, in a common layout.

    query: (B, H, Q, D); key/value: (B, H, K, D) with grouped-query heads already expanded.
    allowed: bool, broadcastable to (B, H, Q, K), True where a query may see a key; None = all.
    bias: float additive scores beyond masking (ALiBi, float masks), finite where allowed; or None.
    Queries sit at the last Q of the K key positions (a KV cache puts them at the end).
    """

    module: nn.Module
    layer: int
    query: Tensor
    key: Tensor
    value: Tensor
    scale: float
    allowed: Tensor | None = None
    bias: Tensor | None = None
    dropout: float = 0.0
    softcap: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def num_heads(self) -> int:
        return self.query.shape[1]

    @property
    def query_length(self) -> int:
        return self.query.shape[2]

    @property
    def key_length(self) -> int:
        return self.key.shape[2]


@dataclass
class ObservedChunk:
    """What observers see: a chunk of query rows of one call, for the observed heads only."""

    call: AttentionCall
    layer: int
    head_ids: list[int]  # which of the call's heads these are
    rows: Tensor  # (R,) query row indices
    sampled: bool  # True when rows are a random sample of the call's query rows
    stats: RowChunk


def split_mask(mask: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """A model's mask (bool: True = attend, or float additive) as (allowed, bias)."""
    if mask is None:
        return None, None
    if mask.dtype == torch.bool:
        return mask, None
    allowed = mask > torch.finfo(mask.dtype).min / 2
    bias = torch.where(allowed, mask, torch.zeros((), dtype=mask.dtype, device=mask.device))
    if not bool(bias.any()):
        bias = None
    return allowed, bias


def causal_allowed(query_length: int, key_length: int, device: torch.device) -> Tensor:
    """(1, 1, Q, K) bool: query i (at key position K-Q+i) sees keys 0..K-Q+i."""
    q = torch.arange(query_length, device=device)[:, None] + (key_length - query_length)
    k = torch.arange(key_length, device=device)[None, :]
    return (k <= q)[None, None]


def expand_kv(t: Tensor, groups: int) -> Tensor:
    """(B, H_kv, K, D) -> (B, H_kv * groups, K, D), the grouped-query sharing made explicit."""
    return t if groups == 1 else t.repeat_interleave(groups, dim=1)
