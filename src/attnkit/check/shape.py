"""What the check needs to know about a model's attention, read from its configuration alone.

``AttentionShape`` is the part of a config that decides how large attention logits get: widths,
the logit scale (1/sqrt(d), 1/d under muP, or a custom ``scaling`` / ``query_pre_attn_scalar`` /
``attention_multiplier``), the init std, soft-capping, QK-norm and the layer types (full or
sliding-window attention). ``read_shape`` accepts an HF ``PretrainedConfig``, a plain dict (a
config.json), or anything with the same attributes; a config without attention fields, heads
that do not divide the hidden size, or nonsense values are a ``UserError`` naming the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from attnkit.errors import UserError

# Key names by family, first found wins (GPT-2, BERT/Llama, T5/BART, misc.).
_HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model", "dim", "embed_dim")
_HEADS_KEYS = ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads", "n_heads")
_LAYERS_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "encoder_layers", "n_layers")
_POSITIONS_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length")
_MUP_KEYS = ("use_mup", "mup")
DEFAULT_INIT_STD = 0.02  # transformers' initializer_range default for every family that has one


@dataclass(frozen=True)
class LayerType:
    """A kind of attention layer in the model: how many there are and how far each row sees."""

    name: str  # "full_attention", "sliding_attention", ...
    count: int
    window: int | None = None  # keys a row sees at most, for sliding-window layers

    def keys_seen(self, seq_len: int) -> int:
        return min(seq_len, self.window) if self.window else seq_len


@dataclass(frozen=True)
class AttentionShape:
    model_type: str
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_layers: int
    init_std: float
    scale: float  # logit = scale * q.k before any temperature
    scale_source: str  # how the scale was decided, in words
    causal: bool
    max_positions: int | None
    softcap: float | None = None
    qk_norm: bool = False
    rope: bool = False
    layer_types: tuple[LayerType, ...] = field(default_factory=tuple)
    notes: tuple[str, ...] = field(default_factory=tuple)
    kernel: str | None = None  # the attention implementation the config names (eager, sdpa, ...); None: not named

    def with_changes(self, **changes) -> AttentionShape:
        from dataclasses import replace

        return replace(self, **changes)


def _get(config, key: str):
    if isinstance(config, dict):
        return config.get(key)
    return getattr(config, key, None)


def _first(config, keys: tuple[str, ...]):
    for key in keys:
        value = _get(config, key)
        if value is not None:
            return key, value
    return None, None


def _positive_int(config, keys: tuple[str, ...], what: str, required: bool = True) -> tuple[str | None, int | None]:
    key, value = _first(config, keys)
    if value is None:
        if required:
            raise UserError(f"the config has no {what} (looked for {', '.join(keys)}); "
                            f"is it a transformer's config with attention?")
        return None, None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value <= 0:
        raise UserError(f"the config's {key} must be a positive whole number, got {value!r}")
    return key, int(value)


def _text_part(config):
    """Multimodal configs keep the language model's fields in ``text_config``."""
    if _first(config, _HEADS_KEYS)[1] is None:
        inner = _get(config, "text_config")
        if inner is not None:
            return inner
    return config


def read_shape(config) -> AttentionShape:
    """The attention-relevant fields of ``config`` (HF config, dict, or object with those attributes)."""
    config = _text_part(config)
    model_type = str(_get(config, "model_type") or "unknown")
    heads_key, heads = _positive_int(config, _HEADS_KEYS, "number of attention heads")
    hidden_key, hidden = _positive_int(config, _HIDDEN_KEYS, "hidden size")
    _, explicit_head_dim = _positive_int(config, ("head_dim", "d_kv", "attention_head_size"), "head dim", required=False)
    if explicit_head_dim is None:
        if hidden % heads:
            raise UserError(f"{heads_key}={heads} does not divide {hidden_key}={hidden}: "
                            f"each head would get {hidden / heads:g} dimensions")
        head_dim = hidden // heads
    else:
        head_dim = explicit_head_dim
    kv_key, kv_heads = _positive_int(config, ("num_key_value_heads", "n_kv_heads", "num_kv_heads"), "key heads",
                                     required=False)
    kv_heads = kv_heads or heads
    if heads % kv_heads:
        raise UserError(f"{kv_key}={kv_heads} does not divide {heads_key}={heads} (grouped-query attention needs it)")
    _, layers = _positive_int(config, _LAYERS_KEYS, "number of layers", required=False)
    if layers is None:
        layers = 1
    init_std = _get(config, "initializer_range")
    if init_std is None:
        init_std = DEFAULT_INIT_STD
    if isinstance(init_std, bool) or not isinstance(init_std, (int, float)) or not init_std > 0:
        raise UserError(f"the config's initializer_range must be a positive number, got {init_std!r}")
    _, positions = _positive_int(config, _POSITIONS_KEYS, "maximum positions", required=False)
    scale, scale_source = _logit_scale(config, head_dim)
    softcap = _get(config, "attn_logit_softcapping")
    if softcap is not None and (not isinstance(softcap, (int, float)) or softcap <= 0):
        softcap = None
    from attnkit.analyze.mitigations import find_mitigations

    mitigation_names = {m.name for m in find_mitigations(_as_object(config))}
    rope = _get(config, "rope_theta") is not None or _get(config, "rope_parameters") is not None or \
        _get(config, "position_embedding_type") == "rotary" or _get(config, "rotary_dim") is not None
    is_decoder = _get(config, "is_decoder")
    architectures = " ".join(_get(config, "architectures") or [])
    encoder_like = model_type in {"bert", "roberta", "distilbert", "electra", "deberta", "deberta-v2", "xlm-roberta",
                                  "albert", "mpnet", "vit", "clip_vision_model", "siglip_vision_model"}
    # Encoders see both ways (more logits per row); everything else, and encoders used as decoders, is causal.
    causal = not encoder_like or bool(is_decoder) or "CausalLM" in architectures
    notes = []
    if _get(config, "scale_attn_by_inverse_layer_idx"):
        notes.append("logits are scaled by 1/(layer+1): the estimate is for layer 0, the largest")
    return AttentionShape(
        model_type=model_type, hidden_size=hidden, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        num_layers=layers, init_std=float(init_std), scale=scale, scale_source=scale_source, causal=causal,
        max_positions=positions, softcap=float(softcap) if softcap else None,
        qk_norm="qk_norm" in mitigation_names, rope=rope, layer_types=_layer_types(config, layers),
        notes=tuple(notes), kernel=_kernel(config),
    )


def _kernel(config) -> str | None:
    """The attention implementation a config names (``_attn_implementation`` on a loaded model's config)."""
    value = _get(config, "_attn_implementation") or _get(config, "attn_implementation")
    return value if isinstance(value, str) else None


def _as_object(config):
    """``find_mitigations`` reads attributes: give a dict the same face."""
    if isinstance(config, dict):
        from types import SimpleNamespace

        return SimpleNamespace(**config)
    return config


def _logit_scale(config, head_dim: int) -> tuple[float, str]:
    """The factor q.k is multiplied by, and where it came from."""
    if _get(config, "scale_attn_weights") is False:
        return 1.0, "1 (scale_attn_weights is false: no 1/sqrt(d))"
    multiplier = _get(config, "attention_multiplier")  # Granite's muP-style logit scale
    if isinstance(multiplier, (int, float)) and not isinstance(multiplier, bool) and multiplier > 0:
        return float(multiplier), f"attention_multiplier = {multiplier:g}"
    scaling = _get(config, "scaling")
    if isinstance(scaling, (int, float)) and not isinstance(scaling, bool) and scaling > 0:
        return float(scaling), f"scaling = {scaling:g}"
    scalar = _get(config, "query_pre_attn_scalar")  # Gemma 2/3: scale = query_pre_attn_scalar ** -0.5
    if isinstance(scalar, (int, float)) and not isinstance(scalar, bool) and scalar > 0:
        return float(scalar) ** -0.5, f"query_pre_attn_scalar^-1/2 = {scalar:g}^-1/2"
    if any(_get(config, key) for key in _MUP_KEYS):
        return 1.0 / head_dim, f"1/d = 1/{head_dim} (muP)"
    return 1.0 / math.sqrt(head_dim), f"1/sqrt(d) = 1/sqrt({head_dim})"


def _layer_types(config, num_layers: int) -> tuple[LayerType, ...]:
    window = _get(config, "sliding_window")
    window = int(window) if isinstance(window, (int, float)) and not isinstance(window, bool) and window > 0 else None
    if _get(config, "use_sliding_window") is False:
        window = None
    types = _get(config, "layer_types")
    if isinstance(types, (list, tuple)) and types:
        counts: dict[str, int] = {}
        for t in types:
            counts[str(t)] = counts.get(str(t), 0) + 1
        return tuple(LayerType(name, n, window if "sliding" in name or "local" in name else None)
                     for name, n in counts.items())
    if window:
        return (LayerType("sliding_attention", num_layers, window),)
    return (LayerType("full_attention", num_layers),)
