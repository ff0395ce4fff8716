"""Attention mitigations a model's config already has, read from the config alone."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Mitigation:
    name: str
    detail: str
    addresses: tuple[str, ...]  # issue types it bears on


# Architectures that normalise queries and keys per head (QK-norm) without a config flag.
_QK_NORM_MODEL_TYPES = {"qwen3", "qwen3_moe", "olmo2", "olmoe", "gemma3", "gemma3_text", "chameleon", "olmo3"}
_DROPOUT_KEYS = ("attn_pdrop", "attention_dropout", "attention_probs_dropout_prob")


def find_mitigations(config) -> list[Mitigation]:
    """What in ``config`` already guards attention: soft-capping, QK-norm, sliding window, dropout, upcasting."""
    found: list[Mitigation] = []
    cap = getattr(config, "attn_logit_softcapping", None)
    if cap:
        found.append(Mitigation("logit_softcapping", f"attention logits soft-capped at {cap:g}",
                                ("overflow_risk", "entropy_collapse", "attention_spike")))
    qk_flag = next((k for k in ("use_qk_norm", "qk_layernorm", "qk_norm") if getattr(config, k, False)), None)
    if qk_flag or getattr(config, "model_type", None) in _QK_NORM_MODEL_TYPES:
        found.append(Mitigation("qk_norm", "queries and keys are normalised per head (QK-norm)",
                                ("overflow_risk", "entropy_collapse", "attention_spike")))
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) is not False:
        found.append(Mitigation("sliding_window", f"sliding-window attention over {window} tokens",
                                ("attention_sink", "uniform_attention")))
    for key in _DROPOUT_KEYS:
        p = getattr(config, key, None)
        if isinstance(p, (int, float)) and p > 0:
            found.append(Mitigation("attention_dropout", f"attention dropout p={p:g} (during training)",
                                    ("entropy_collapse", "attention_spike")))
            break
    if getattr(config, "reorder_and_upcast_attn", False):
        found.append(Mitigation("upcast_attention", "attention scores computed in float32 (reorder_and_upcast_attn)",
                                ("overflow_risk",)))
    if getattr(config, "scale_attn_by_inverse_layer_idx", False):
        found.append(Mitigation("layer_scaled_attention", "logits scaled by 1/(layer+1)", ("overflow_risk",)))
    return found
