"""What every attention call is, whatever the model: query, key, value, a mask and a scale.

Adapters build an ``AttentionCall`` with ``build_call`` (the one builder: grouped-query heads
expanded, masks split into what a row may see and what is added to its scores) and hand it to
the session. Nothing else in attnkit knows how a model spells its attention.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor, nn

from attnkit.seam.sites import Site

# The model's own attention kernel for this call, given the softmax scale to use: SDPA, flash or
# eager exactly as the model would have run it. A temperature folds into its scale.
NativeKernel = Callable[[float], Tensor]


@dataclass
class AttentionCall:
    """One call of an attention function, in a common layout.

    query: (B, H, Q, D); key_heads/value_heads: (B, Hkv, K, D), the model's own key/value heads;
        ``key``/``value``: (B, H, K, D), the same with grouped-query heads expanded (made on first
        use: a decoding step's kernel that reads only a few key blocks never copies the whole cache).
    allowed: bool, broadcastable to (B, H, Q, K), True where a query may see a key; None = all
        (or, with ``is_causal``, the causal pattern, built on demand by ``allowed_or_causal``).
    bias: float additive scores beyond masking (ALiBi, relative position bias, float masks),
        finite where allowed, broadcastable to (B, H, Q, K); or None.
    softcap: the model's own logit soft-cap (Gemma 2): cap * tanh(logits / cap), before the bias.
    sinks: (B|1, H, Q|1, 1) learned sink logits, one per head (gpt-oss) or per head and query row
        (Inkling2): a key without a value that joins every row's softmax denominator; or None.
    native: the model's own kernel for this call (see ``NativeKernel``), None when there is none.
    kv_groups: query heads per key/value head (grouped-query attention; 1 = none): query head h
        reads key head h // kv_groups.
    Queries sit at the last Q of the K key positions (a KV cache puts them at the end).
    """

    module: nn.Module
    site: Site
    query: Tensor
    key_heads: Tensor
    value_heads: Tensor
    scale: float
    allowed: Tensor | None = None
    bias: Tensor | None = None
    is_causal: bool = False
    dropout: float = 0.0
    softcap: float | None = None
    sinks: Tensor | None = None
    native: NativeKernel | None = None
    kv_groups: int = 1

    @cached_property
    def key(self) -> Tensor:  # (B, H, K, D)
        return expand_kv(self.key_heads, self.kv_groups)

    @cached_property
    def value(self) -> Tensor:  # (B, H, K, Dv)
        return expand_kv(self.value_heads, self.kv_groups)

    @property
    def layer(self) -> int:
        return self.site.layer

    @property
    def num_heads(self) -> int:
        return self.query.shape[1]

    @property
    def query_length(self) -> int:
        return self.query.shape[2]

    @property
    def key_length(self) -> int:
        return self.key_heads.shape[2]

    @property
    def dropout_p(self) -> float:
        """The dropout probability in force: the module's, and only while it trains."""
        return self.dropout if self.module.training else 0.0

    def allowed_or_causal(self) -> Tensor | None:
        """``allowed``, with the causal pattern materialised when the call only says ``is_causal``."""
        if self.allowed is None and self.is_causal:
            return causal_allowed(self.query_length, self.key_length, self.query.device)
        return self.allowed


def build_call(
    module: nn.Module,
    site: Site,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    *,
    mask: Tensor | None = None,
    scale: float | None = None,
    is_causal: bool = False,
    dropout: float = 0.0,
    softcap: float | None = None,
    bias: Tensor | None = None,
    sinks: Tensor | None = None,
    native: NativeKernel | None = None,
) -> AttentionCall:
    """The ``AttentionCall`` of ``F.scaled_dot_product_attention``-style arguments.

    mask: bool (True = attend) or float additive, broadcastable to (B, H, Q, K); key/value may
    have fewer heads than query (grouped-query attention); ``is_causal`` together with a mask
    means both apply; ``bias`` is added to the scores on top of the mask's own additive part.
    """
    groups = query.shape[1] // key.shape[1]
    allowed, mask_bias = split_mask(mask)
    if is_causal and allowed is not None:
        allowed = allowed & causal_allowed(query.shape[2], key.shape[2], query.device)
        is_causal = False
    if bias is not None:
        bias = bias if mask_bias is None else bias + mask_bias
    else:
        bias = mask_bias
    if sinks is not None and sinks.dim() == 1:  # one logit per head: the same for every row
        sinks = sinks.view(1, -1, 1, 1)
    return AttentionCall(
        module=module,
        site=site,
        query=query,
        key_heads=key,
        value_heads=value,
        scale=scale if scale is not None else query.shape[-1] ** -0.5,
        allowed=allowed,
        bias=bias,
        is_causal=is_causal and query.shape[2] > 1,
        dropout=dropout,
        softcap=softcap,
        sinks=sinks,
        native=native,
        kv_groups=groups,
    )


# An additive mask value at or below this hides the key: its weight is at most e^-50 ~ 2e-22 of
# the row's (below float32's resolution of any sum of weights). Masks written with finite
# negatives use -100 (Swin's shifted windows, CLAP), -1e4 (BERT-era extended masks) or -1e9,
# plus a small relative position bias at times (Swin): they all land here, as -inf does.
MASKED_BELOW = -50.0


def split_mask(mask: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
    """A model's mask (bool: True = attend, or float additive) as (allowed, bias)."""
    if mask is None:
        return None, None
    if mask.dtype == torch.bool:
        return mask, None
    allowed = mask > MASKED_BELOW
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
