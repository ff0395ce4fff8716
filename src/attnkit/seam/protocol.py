"""The adapter protocol for a hand-written attention module.

A module joins the seam by (1) setting the class attribute ``is_attnkit_attention = True``,
(2) having an int ``layer_idx`` (optional; call order is used otherwise) and (3) computing its
attention with ``attnkit.seam.attention(self, q, k, v, ...)`` where it would call
``F.scaled_dot_product_attention``. Outside a session that is exactly SDPA. Example::

    class SelfAttention(nn.Module):
        is_attnkit_attention = True

        def __init__(self, d_model, n_head, layer_idx):
            super().__init__()
            self.qkv, self.proj = nn.Linear(d_model, 3 * d_model), nn.Linear(d_model, d_model)
            self.n_head, self.layer_idx = n_head, layer_idx

        def forward(self, x):                                    # (B, T, C)
            B, T, C = x.shape
            q, k, v = self.qkv(x).split(C, dim=2)
            q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
            y = attention(self, q, k, v, is_causal=True)             # (B, nh, T, hs)
            return self.proj(y.transpose(1, 2).reshape(B, T, C))
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

from torch import Tensor, nn

from attnkit.seam.call import AttentionCall, causal_allowed, expand_kv, split_mask
from attnkit.seam.session import AttentionSession, _plain_sdpa

_SESSIONS: "weakref.WeakKeyDictionary[nn.Module, AttentionSession]" = weakref.WeakKeyDictionary()


def attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    dropout_p: float = 0.0,
) -> Tensor:
    """Drop-in for ``F.scaled_dot_product_attention`` that attnkit can observe and replace.

    query: (B, H, Q, D); key/value: (B, H_kv, K, D) with H a multiple of H_kv;
    attn_mask: bool (True = attend) or float additive, broadcastable to (B, H, Q, K).
    Returns (B, H, Q, D).
    """
    groups = query.shape[1] // key.shape[1]
    allowed, bias = split_mask(attn_mask)
    if is_causal:
        causal = causal_allowed(query.shape[2], key.shape[2], query.device)
        allowed = causal if allowed is None else allowed & causal
    call = AttentionCall(
        module=module,
        layer=0,
        query=query,
        key=expand_kv(key, groups),
        value=expand_kv(value, groups),
        scale=scale if scale is not None else query.shape[-1] ** -0.5,
        allowed=allowed,
        bias=bias,
        dropout=dropout_p,
    )
    session = _SESSIONS.get(module)
    if session is None:
        return _plain_sdpa(call)
    call.layer = session.layer_of(module)
    return session.run(call, lambda: _plain_sdpa(call))


def install(model: nn.Module, session: AttentionSession) -> Callable[[], None] | None:
    sites = [m for m in model.modules() if getattr(type(m), "is_attnkit_attention", False)]
    if not sites:
        return None
    for m in sites:
        _SESSIONS[m] = session

    def restore() -> None:
        for m in sites:
            _SESSIONS.pop(m, None)

    return restore
