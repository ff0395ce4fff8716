"""A stand-in for a model's attention at next to no cost, for the floors and ceilings of the
sparse benchmarks: a step with it is the rest of the model's time (projections, MLP, norms,
rotary, the LM head, the cache's update, Python), timed in the same rounds as the real ones.

    from no_attention import NO_ATTENTION, register
    register(); model.set_attn_implementation(NO_ATTENTION)
"""

from __future__ import annotations

NO_ATTENTION = "bench_no_attention"


def no_attention(module, query, key, value, attention_mask, **kwargs):
    """(B, T, H, D): the query itself (its head width: the model's value width where the two are
    equal); where autograd records, with the keys and values added at zero weight so that the
    backward still reaches every projection."""
    import torch

    out = query
    if torch.is_grad_enabled() and (key.requires_grad or value.requires_grad):
        out = query + 0.0 * (key + value).repeat_interleave(query.shape[1] // key.shape[1], 1)
    return out.transpose(1, 2), None


def register_attention(name: str, function) -> str:
    """Register ``function`` with transformers' attention functions as ``name``, and SDPA's mask
    function under the same name (the model then builds the mask it builds for SDPA: making it is
    the rest of the model's work, not the attention's); ``name``."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


def register() -> str:
    """Register the stand-in (``register_attention``); its name."""
    return register_attention(NO_ATTENTION, no_attention)
