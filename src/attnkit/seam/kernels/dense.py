"""attnkit's own attention kernel: exact logits, any score/mask modifier, any device, a backward.

Query rows go in chunks of about ``chunk_elements`` logits. In training each chunk runs under
``torch.utils.checkpoint``: only its inputs are kept for backward and its logits are recomputed
there, so memory stays near SDPA's (flash-style, O(T) per layer) instead of growing with T²
as eager attention's does. The same ``chunk_logits`` gives the observation pass its logits, so
what taps see is exactly what the output was computed from.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from attnkit.seam.kernels.modifiers import apply_mods

if TYPE_CHECKING:  # kernels are imported by the seam: no import back at run time
    from attnkit.seam.call import AttentionCall
    from attnkit.seam.plan import Mods


def dense_supports(call: AttentionCall, mods: Mods, explicit: bool) -> bool:
    return True


def index_grids(batch: int, heads: int, positions: Tensor, key_length: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """FlexAttention's (b, h, q_idx, kv_idx) as tensors that broadcast to (B, H, R, K)."""
    device = positions.device
    b = torch.arange(batch, device=device).view(-1, 1, 1, 1)
    h = torch.arange(heads, device=device).view(1, -1, 1, 1)
    q = positions.view(1, 1, -1, 1)
    kv = torch.arange(key_length, device=device).view(1, 1, 1, -1)
    return b, h, q, kv


def rows_of(t: Tensor | None, rows: Tensor, key_length: int) -> Tensor | None:
    """Rows ``rows`` and the first ``key_length`` keys of a (B|1, H|1, Q|1, K) mask or bias."""
    if t is None:
        return None
    t = t if t.shape[-2] == 1 else t[..., rows, :]
    return t if t.shape[-1] == key_length else t[..., :key_length]


def chunk_logits(
    call: AttentionCall,
    mods: Mods,
    q: Tensor,
    k: Tensor,
    positions: Tensor,
    allowed: Tensor | None,
    bias: Tensor | None,
    raw: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Pre-softmax logits of a chunk of rows, float32, -inf where a row may not look.

    q: (B, h, R, D) the chunk's queries; k: (B, h, K', D) keys (a prefix of the call's keys is
    allowed); positions: (R,) each row's position among the keys; allowed / bias: the chunk's
    rows of the call's mask and bias (None = none); raw: q @ kᵀ when the caller has it already.
    Modifiers are evaluated as FlexAttention defines them (``kernels.modifiers``); a key a score
    modifier sends to -inf is not allowed, as one a mask modifier hides.
    Returns (logits (B, h, R, K'), allowed (bool, broadcastable to it)).
    """
    if raw is None:
        raw = torch.matmul(q, k.transpose(-1, -2))  # in the model's dtype: fp16 overflow shows
    logits = raw.float().mul_(call.scale) if raw.requires_grad is False else raw.float() * call.scale
    if call.softcap is not None:
        logits = call.softcap * torch.tanh(logits / call.softcap)
    if bias is not None:
        logits = logits + bias.float()
    B, H, R, K = logits.shape
    if mods:
        logits, keep = apply_mods(mods, logits, *index_grids(B, H, positions, K))
        if keep is not None:
            allowed = keep if allowed is None else allowed & keep
    if allowed is None:
        allowed = torch.ones(1, 1, 1, K, dtype=torch.bool, device=logits.device)
    elif not bool(allowed.all()):
        logits = logits.masked_fill(~allowed, -math.inf)
    return logits, allowed


def softmax_rows(logits: Tensor, allowed: Tensor, sinks: Tensor | None) -> Tensor:
    """Softmax over each row's visible keys; rows that see nothing (empty rows) are all zero,
    with a zero gradient, as in FlexAttention.

    sinks: learned sink logits, (B|1, h, R|1, 1) (one per head, or per head and row): a key
    without a value in every row's denominator.
    """
    if sinks is not None:
        B, H, R, _ = logits.shape
        sink = sinks.float().expand(B, H, R, 1)
        return torch.softmax(torch.cat([logits, sink], dim=-1), dim=-1)[..., :-1]
    sees = allowed.any(-1, keepdim=True)
    if bool(sees.all()):
        return torch.softmax(logits, dim=-1)
    # An empty row's logits are all -inf: its softmax (and that softmax's backward) is NaN, so it
    # takes the softmax of zeros instead, whose backward is finite, and gives zeros.
    probs = torch.softmax(torch.where(sees, logits, 0.0), dim=-1)
    return torch.where(sees, probs, 0.0)


def row_chunks(query_length: int, per_row: int, chunk_elements: int, device: torch.device) -> Iterator[Tensor]:
    step = max(1, chunk_elements // max(1, per_row))
    for start in range(0, query_length, step):
        yield torch.arange(start, min(start + step, query_length), device=device)


def dense_attention(call: AttentionCall, mods: Mods, chunk_elements: int) -> Tensor:
    """(B, H, Q, Dv) output of ``call`` with ``mods``, chunk by chunk of query rows."""
    B, H, Q, _ = call.query.shape
    K = call.key_length
    allowed = call.allowed_or_causal()
    offset = K - Q
    tensors = (call.query, call.key, call.value, call.bias, call.sinks)
    keep_graph = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    outs = []
    for rows in row_chunks(Q, B * H * K, chunk_elements, call.query.device):
        q = call.query[:, :, rows[0] : rows[-1] + 1]
        chunk_allowed = rows_of(allowed, rows, K)
        chunk_bias = rows_of(call.bias, rows, K)
        chunk_sinks = rows_of(call.sinks, rows, 1)
        positions = rows + offset
        if keep_graph:
            out = checkpoint(
                _chunk_output, call, mods, q, call.key, call.value, positions, chunk_allowed, chunk_bias, chunk_sinks,
                use_reentrant=False,
            )
        else:
            out = _chunk_output(call, mods, q, call.key, call.value, positions, chunk_allowed, chunk_bias, chunk_sinks)
        outs.append(out)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def _chunk_output(
    call: AttentionCall, mods: Mods, q: Tensor, k: Tensor, v: Tensor, positions: Tensor,
    allowed: Tensor | None, bias: Tensor | None, sinks: Tensor | None,
) -> Tensor:
    logits, allowed = chunk_logits(call, mods, q, k, positions, allowed, bias)
    probs = softmax_rows(logits, allowed, sinks)
    if call.dropout_p:
        probs = F.dropout(probs, p=call.dropout_p, training=True)
    return torch.matmul(probs.to(v.dtype), v)
