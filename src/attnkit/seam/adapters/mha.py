"""``torch.nn.MultiheadAttention`` adapter, also inside ``nn.TransformerEncoderLayer``.

Each MultiheadAttention gets an instance-level ``forward``; deleting that attribute restores the
class forward. When no session changes the call, the output still comes from the class forward
(bit for bit what the model computes) and the taps see logits recomputed from the module's own
projections; when a session changes it, the projections, the kernel and the output projection
run here. The encoder layer's fused "fast path" would skip ``self_attn.forward`` altogether, so
it is switched off while any session is attached and switched back afterwards.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit.seam.eager import eager_under_compile
from attnkit.seam.call import build_call
from attnkit.seam.session import Dispatch, attachment_of, in_backward

_PATCHED: "weakref.WeakKeyDictionary[nn.Module, list]" = weakref.WeakKeyDictionary()  # module -> [sessions, own forward]
_fastpath_saved: list[bool] = []


@eager_under_compile  # attnkit's Python runs eagerly; torch.compile graph-breaks around it
def _mha_forward(
    mha: nn.MultiheadAttention,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    key_padding_mask: Tensor | None = None,
    need_weights: bool = True,
    attn_mask: Tensor | None = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[Tensor, Tensor | None]:
    def class_forward() -> tuple[Tensor, Tensor | None]:
        return type(mha).forward(mha, query, key, value, key_padding_mask, need_weights, attn_mask,
                                 average_attn_weights, is_causal)

    attachment = attachment_of(mha)
    if attachment is None or mha.bias_k is not None or mha.add_zero_attn:
        return class_forward()  # learned extra key/value rows are not modelled: run unobserved
    recompute = in_backward()
    site = attachment.sites.site_of(mha, count=not recompute)

    unbatched = query.dim() == 2
    q_in, k_in, v_in = query, key, value
    kpm = key_padding_mask
    if unbatched:
        q_in, k_in, v_in = q_in.unsqueeze(1), k_in.unsqueeze(1), v_in.unsqueeze(1)
        kpm = None if kpm is None else kpm.unsqueeze(0)
    if mha.batch_first and not unbatched:
        q_in, k_in, v_in = q_in.transpose(0, 1), k_in.transpose(0, 1), v_in.transpose(0, 1)
    # now (L, N, E) as in F.multi_head_attention_forward
    L, N, E = q_in.shape
    S = k_in.shape[0]
    H, D = mha.num_heads, mha.head_dim
    if mha._qkv_same_embed_dim:
        w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
    else:
        w_q, w_k, w_v = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
    b_q, b_k, b_v = mha.in_proj_bias.chunk(3) if mha.in_proj_bias is not None else (None, None, None)
    q = F.linear(q_in, w_q, b_q).view(L, N, H, D).permute(1, 2, 0, 3)  # (N, H, L, D)
    k = F.linear(k_in, w_k, b_k).view(S, N, H, D).permute(1, 2, 0, 3)  # (N, H, S, D)
    v = F.linear(v_in, w_v, b_v).view(S, N, H, D).permute(1, 2, 0, 3)
    mask = _mask(attn_mask, kpm, is_causal, N, H, L, S, q.device, q.dtype)
    call = build_call(mha, site, q, k, v, mask=mask, is_causal=is_causal and attn_mask is None, dropout=mha.dropout)
    dispatch = Dispatch(call, attachment.sessions, recompute)
    dispatch.announce(call)

    taps = [t for s, _ in dispatch.observers for t in s.taps]
    # Nothing changes: the class forward computes the output, bit for bit as ever. Only a tap that
    # wants the gradient of the per-head output, or the live call whose tensors make the output,
    # needs attnkit to compute it (equal to rounding).
    if not dispatch.mods and not any(t.wants_grad_output or t.wants_call for t in taps):
        dispatch.observe(call, dispatch.compute(call).detach() if any(t.wants_output for t in taps) else None)
        return class_forward()

    out = dispatch.compute(call)  # (N, H, L, D)
    dispatch.observe(call, out)
    weights = None
    if need_weights:
        weights = _weights(call, dispatch)
        weights = weights.mean(1) if average_attn_weights else weights
        weights = weights.squeeze(0) if unbatched else weights
    out = out.permute(2, 0, 1, 3).reshape(L, N, E)
    out = F.linear(out, mha.out_proj.weight, mha.out_proj.bias)
    if mha.batch_first and not unbatched:
        out = out.transpose(0, 1)
    if unbatched:
        out = out.squeeze(1)
    return out, weights


def _weights(call, dispatch: Dispatch) -> Tensor:
    """(N, H, L, S) probabilities of every head, as the caller of ``need_weights=True`` expects."""
    from attnkit.seam.observe import observe_call
    from attnkit.seam.taps.maps import MapCapture

    capture = MapCapture()
    rows = torch.arange(call.query_length, device=call.query.device)
    observe_call(call, dispatch.mods, [capture], list(range(call.num_heads)), rows, False, None, dispatch.chunk_elements)
    return capture.maps[call.site].to(call.query.device, call.query.dtype)


def _mask(attn_mask, key_padding_mask, is_causal, N, H, L, S, device, dtype) -> Tensor | None:
    """MultiheadAttention's masks (bool True = blocked, or float additive) as one mask in the
    seam's convention (bool True = attend, or float additive with -inf where blocked)."""
    parts = []
    if attn_mask is not None:
        parts.append(attn_mask.view(N, H, L, S) if attn_mask.dim() == 3 else attn_mask.view(1, 1, L, S))
    if key_padding_mask is not None:
        parts.append(key_padding_mask.view(N, 1, 1, S))
    if not parts:
        return None
    if all(p.dtype == torch.bool for p in parts):
        blocked = parts[0]
        for p in parts[1:]:
            blocked = blocked | p
        return ~blocked
    total = torch.zeros((), dtype=dtype, device=device)
    for p in parts:
        total = total + (torch.zeros((), dtype=dtype, device=device).masked_fill(p, -torch.inf) if p.dtype == torch.bool else p.to(dtype))
    return total


def find(root: nn.Module) -> list[nn.Module]:
    return [m for m in root.modules() if isinstance(m, nn.MultiheadAttention)]


def install(root: nn.Module, modules: list[nn.Module]) -> Callable[[], None]:
    if not _PATCHED:
        _fastpath_saved.append(torch.backends.mha.get_fastpath_enabled())
        torch.backends.mha.set_fastpath_enabled(False)
    for m in modules:
        if m not in _PATCHED:
            _PATCHED[m] = [0, m.__dict__.get("forward")]
            m.forward = lambda *args, _m=m, **kwargs: _mha_forward(_m, *args, **kwargs)
        _PATCHED[m][0] += 1

    # weak references: an attachment never closed must not keep the model alive through its undo
    patched = [weakref.ref(m) for m in modules]

    def restore() -> None:
        for m in filter(None, (r() for r in patched)):
            entry = _PATCHED.get(m)
            if entry is None:  # already undone
                continue
            entry[0] -= 1
            if entry[0] == 0:
                del _PATCHED[m]
                m.__dict__.pop("forward", None)
                if entry[1] is not None:
                    m.forward = entry[1]
        patched.clear()
        if not _PATCHED and _fastpath_saved:  # modules that died attached have left _PATCHED too
            torch.backends.mha.set_fastpath_enabled(_fastpath_saved.pop())

    return restore
