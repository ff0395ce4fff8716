"""Hugging Face transformers adapter: an ``AttentionInterface`` function plus its mask function.

transformers (v5) looks the attention function up by ``config._attn_implementation``. attnkit
registers one under the name ``attnkit`` and, just as important, a mask function under the same
name in ``AttentionMaskInterface``: without it the custom name gets ``attention_mask=None`` and
causal models silently lose their causal mask. The mask function always materialises the
boolean mask (no "is_causal" shortcut), so padding and sliding windows arrive exactly.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import Tensor, nn

from attnkit.seam.mask_cache import LastMaskCache
from attnkit.seam.call import AttentionCall, causal_allowed, expand_kv, split_mask
from attnkit.seam.session import AttentionSession

NAME = "attnkit"
_SESSIONS: "weakref.WeakKeyDictionary[nn.Module, AttentionSession]" = weakref.WeakKeyDictionary()
_registered = False


def attnkit_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[Tensor, None]:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def sdpa() -> Tensor:  # (B, H, Q, D)
        # The mask function below always materialises the mask; where plain SDPA would have
        # skipped it (is_causal, or no mask), skip it here too: SDPA is ~2x slower with a mask.
        mask = None if _skippable(module, attention_mask, query.shape[2], key.shape[2], kwargs) else attention_mask
        return sdpa_attention_forward(
            module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs
        )[0].transpose(1, 2)

    session = _SESSIONS.get(module)
    if session is None:  # a model switched to "attnkit" outside a session behaves as SDPA
        return sdpa().transpose(1, 2), None
    if kwargs.get("s_aux") is not None:
        raise NotImplementedError("attnkit does not handle attention sinks passed as s_aux (gpt-oss) yet")

    groups = query.shape[1] // key.shape[1]
    allowed, bias = split_mask(attention_mask)
    q_len = query.shape[2]
    call = AttentionCall(
        module=module,
        layer=session.layer_of(module),
        query=query,
        key=expand_kv(key, groups),
        value=expand_kv(value, groups),
        scale=scaling if scaling is not None else query.shape[-1] ** -0.5,
        allowed=allowed,
        bias=bias,
        dropout=dropout,
        softcap=kwargs.get("softcap"),
        # The same rule transformers' SDPA path applies when no mask was built.
        extra={"is_causal": attention_mask is None and q_len > 1 and getattr(module, "is_causal", True)},
    )
    out = session.run(call, None if call.softcap is not None else sdpa)
    return out.transpose(1, 2).contiguous(), None


_skippable_cache = LastMaskCache()


def _skippable(module: nn.Module, mask: Tensor | None, q_len: int, k_len: int, kwargs: dict) -> bool:
    """True when ``mask`` says no more than SDPA's own ``is_causal`` / no-mask call would (exactly the
    causal pattern on a square call, or all True where that call attends everywhere). One check per
    mask: models hand the same mask to every layer."""
    if mask is None or mask.dtype != torch.bool or mask.dim() != 4:
        return False
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else causal
    cached = _skippable_cache.get(mask, (q_len, k_len, causal))
    if cached is not None:
        return cached
    if q_len == 1 or not causal:
        answer = bool(mask.all())
    elif q_len == k_len:
        answer = torch.equal(mask, causal_allowed(q_len, k_len, mask.device).expand(mask.shape))
    else:
        answer = False
    _skippable_cache.put(mask, answer, (q_len, k_len, causal))
    return answer


def _materialised_mask(*args, **kwargs):
    from transformers.masking_utils import sdpa_mask

    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def register() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attnkit_attention)
    AttentionMaskInterface.register(NAME, _materialised_mask)
    _registered = True


def _configs(model: nn.Module) -> list:
    """Every config (top level, sub-configs, sub-models') whose attention implementation may change."""
    from transformers import PreTrainedModel

    seen: dict[int, object] = {}
    for m in model.modules():
        if isinstance(m, PreTrainedModel):
            stack = [m.config]
            while stack:
                cfg = stack.pop()
                if id(cfg) in seen:
                    continue
                seen[id(cfg)] = cfg
                for key in getattr(cfg, "sub_configs", {}) or {}:
                    sub = getattr(cfg, key, None)
                    if sub is not None:
                        stack.append(sub)
    return list(seen.values())


def install(model: nn.Module, session: AttentionSession) -> Callable[[], None] | None:
    try:
        from transformers import PreTrainedModel
    except ImportError:
        return None
    if not isinstance(model, PreTrainedModel) or not model._can_set_attn_implementation():
        return None
    register()
    configs = _configs(model)
    previous = [(cfg, cfg.__dict__.get("_attn_implementation_internal")) for cfg in configs]

    def restore() -> None:
        for m in model.modules():
            _SESSIONS.pop(m, None)
        for cfg, value in previous:
            cfg._attn_implementation_internal = value

    try:
        model.set_attn_implementation(NAME)
    except ValueError:
        restore()  # transformers says this architecture has no pluggable attention (Mamba, ...)
        return None
    except BaseException:
        restore()
        raise
    for m in model.modules():
        _SESSIONS[m] = session
    return restore
