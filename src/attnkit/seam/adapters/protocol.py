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

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from attnkit.seam.call import build_call
from attnkit.seam.session import attachment_of, in_backward, run_call


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
    ``dropout_p`` applies only while the module trains. Returns (B, H, Q, D).
    """
    attachment = attachment_of(module)
    p = dropout_p if module.training else 0.0
    if attachment is None:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, is_causal=is_causal,
                                              dropout_p=p, scale=scale, enable_gqa=query.shape[1] != key.shape[1])

    def native(scale_used: float) -> Tensor:
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, is_causal=is_causal,
                                              dropout_p=p, scale=scale_used, enable_gqa=query.shape[1] != key.shape[1])

    recompute = in_backward()
    site = attachment.sites.site_of(module, count=not recompute)
    call = build_call(module, site, query, key, value, mask=attn_mask, scale=scale, is_causal=is_causal,
                      dropout=dropout_p, native=native)
    return run_call(call, attachment.sessions, recompute)


def find(root: nn.Module) -> list[nn.Module]:
    return [m for m in root.modules() if getattr(type(m), "is_attnkit_attention", False)]


def install(root: nn.Module, modules: list[nn.Module]) -> Callable[[], None]:
    return lambda: None  # calls reach the seam through ``attention``: nothing to switch
