"""``torch.nn.MultiheadAttention`` adapter, also inside ``nn.TransformerEncoderLayer``.

Each MultiheadAttention gets an instance-level ``forward`` that does the projections itself
and sends the attention call through the session; deleting that attribute restores the class
forward. The encoder layer's fused "fast path" would skip ``self_attn.forward`` altogether, so
it is switched off for the session (``torch.backends.mha``) and switched back afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit.seam.call import AttentionCall, causal_allowed
from attnkit.seam.session import AttentionSession, _plain_sdpa


def _mha_forward(
    mha: nn.MultiheadAttention,
    session: AttentionSession,
    layer: int,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[Tensor, Tensor | None]:
    if mha.bias_k is not None or mha.add_zero_attn or (need_weights and not session.observes(layer)):
        # Learned extra key/value rows are not modelled, and a caller who wants the weights of a
        # layer the session leaves alone gets them from the class forward: both run unobserved.
        return type(mha).forward(mha, query, key, value, key_padding_mask, need_weights, attn_mask,
                                 average_attn_weights, is_causal)
    unbatched = query.dim() == 2
    if unbatched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
    if mha.batch_first and not unbatched:
        query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
    # now (L, N, E) as in F.multi_head_attention_forward
    L, N, E = query.shape
    S = key.shape[0]
    H, D = mha.num_heads, mha.head_dim
    if mha._qkv_same_embed_dim:
        w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    else:
        w_q, w_k, w_v = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    b_q, b_k, b_v = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None)
    q = F.linear(query, w_q, b_q).view(L, N, H, D).permute(1, 2, 0, 3)  # (N, H, L, D)
    k = F.linear(key, w_k, b_k).view(S, N, H, D).permute(1, 2, 0, 3)  # (N, H, S, D)
    v = F.linear(value, w_v, b_v).view(S, N, H, D).permute(1, 2, 0, 3)

    allowed, bias = _masks(attn_mask, key_padding_mask, is_causal, N, H, L, S, query.device)
    call = AttentionCall(
        module=mha, layer=layer, query=q, key=k, value=v, scale=D**-0.5,
        allowed=allowed, bias=bias, dropout=mha.dropout,
    )
    capture = _WeightsCapture(N, H, L, S) if need_weights else None
    if capture is not None:
        session.observers.append(capture)
    try:
        out = session.run(call, None if need_weights else (lambda: _plain_sdpa(call)))  # (N, H, L, D)
    finally:
        if capture is not None:
            session.observers.remove(capture)
    if capture is not None:
        capture.fill_unobserved(call)
    out = out.permute(2, 0, 1, 3).reshape(L, N, E)
    out = F.linear(out, mha.out_proj.weight, mha.out_proj.bias)
    if mha.batch_first and not unbatched:
        out = out.transpose(0, 1)
    if unbatched:
        out = out.squeeze(1)
    weights = None
    if capture is not None:
        weights = capture.weights.mean(1) if average_attn_weights else capture.weights
        if unbatched:
            weights = weights.squeeze(0)
    return out, weights


class _WeightsCapture:
    """Collects full probabilities for ``need_weights=True`` callers."""

    def __init__(self, N: int, H: int, L: int, S: int) -> None:
        self.weights = torch.zeros(N, H, L, S)
        self.seen: set[int] = set()

    def start_forward(self) -> None:
        pass

    def observe(self, chunk) -> None:
        idx = torch.tensor(chunk.head_ids)
        w = self.weights[:, idx]
        w[:, :, chunk.rows] = chunk.stats.probs.detach().cpu()
        self.weights[:, idx] = w
        self.seen.update(chunk.head_ids)

    def fill_unobserved(self, call: AttentionCall) -> None:
        """Heads outside the session's selection keep their learned probabilities: compute those."""
        missing = [h for h in range(self.weights.shape[1]) if h not in self.seen]
        if not missing:
            return
        idx = torch.tensor(missing, device=call.query.device)
        logits = torch.matmul(call.query[:, idx], call.key[:, idx].transpose(-1, -2)).float() * call.scale
        allowed = call.allowed if call.allowed.shape[1] == 1 else call.allowed[:, idx]
        if call.bias is not None:
            logits = logits + (call.bias if call.bias.shape[1] == 1 else call.bias[:, idx]).float()
        logits = logits.masked_fill(~allowed, -math.inf)
        probs = torch.where(allowed.any(-1, keepdim=True), torch.softmax(logits, -1), 0.0)
        self.weights[:, idx.cpu()] = probs.detach().cpu()


def _masks(attn_mask, key_padding_mask, is_causal, N, H, L, S, device):
    """MultiheadAttention's masks (bool True = blocked, or float additive) as (allowed, bias)."""
    allowed = torch.ones(1, 1, L, S, dtype=torch.bool, device=device)
    bias = None
    if attn_mask is None and is_causal:
        allowed = causal_allowed(L, S, device)
    if attn_mask is not None:
        m = attn_mask.view(N, H, L, S) if attn_mask.dim() == 3 else attn_mask.view(1, 1, L, S)
        if m.dtype == torch.bool:
            allowed = allowed & ~m
        else:
            allowed = allowed & (m > -float("inf"))
            bias = torch.where(torch.isfinite(m), m, torch.zeros((), dtype=m.dtype, device=device))
    if key_padding_mask is not None:
        kp = key_padding_mask.view(N, 1, 1, S)
        if kp.dtype == torch.bool:
            allowed = allowed & ~kp
        else:
            allowed = allowed & (kp > -float("inf"))
            kb = torch.where(torch.isfinite(kp), kp, torch.zeros((), dtype=kp.dtype, device=device))
            bias = kb if bias is None else bias + kb
    if bias is not None:
        bias = bias.expand(allowed.shape[0] if allowed.shape[0] > 1 else bias.shape[0], *bias.shape[1:])
        if not bool(bias.any()):
            bias = None
    return allowed, bias


def install(model: nn.Module, session: AttentionSession) -> Callable[[], None] | None:
    sites = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    if not sites:
        return None
    fastpath = torch.backends.mha.get_fastpath_enabled()
    saved = [(m, m.__dict__.get("forward")) for m in sites]

    def restore() -> None:
        for m, fwd in saved:
            m.__dict__.pop("forward", None)
            if fwd is not None:
                m.forward = fwd
        torch.backends.mha.set_fastpath_enabled(fastpath)

    torch.backends.mha.set_fastpath_enabled(False)
    for layer, m in enumerate(sites):
        def forward(*args, _m=m, _layer=layer, **kwargs):
            return _mha_forward(_m, session, _layer, *args, **kwargs)

        m.forward = forward
    return restore
