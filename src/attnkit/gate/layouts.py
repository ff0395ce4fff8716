"""Where an output gate goes in each family: the attention module whose input is the gate's X,
and the output projection whose input (the heads' concatenated outputs) the gate multiplies.

The Hugging Face attention function sees q, k, v but not the layer's hidden states, and it
returns before the output projection. A gate needs both ends, so it lives beside the seam:
a forward pre-hook on ``x_module`` keeps its input hidden states X (already normalised in
pre-norm models: GPT-2's ``ln_1``, Llama's ``input_layernorm`` run before the module), and a
forward pre-hook on ``out_proj`` multiplies that projection's input Y (B, T, H·d) by σ(gate(X)).
This is the same place as Qiu et al.'s G1 and Qwen3-Next's gate (after SDPA, before W_O).

Layouts, one small function each, in ``GATE_LAYOUTS`` (the first that recognises a module wins):

- ``gpt2``: ``GPT2Attention`` — X: its input; out: ``c_proj`` (Conv1D, weight (H·d, E))
- ``separate``: ``q_proj``/``o_proj`` modules (Llama, Mistral, Qwen2/3, Gemma, ...) — out: ``o_proj``
- ``bert``: ``BertAttention`` (``.self.query`` + ``.output.dense``: BERT, RoBERTa, MiniLM) — X: its
  input (the previous layer's LayerNormed output, BERT being post-norm); out: ``output.dense``
- ``attnkit``: attnkit's own modules (``is_attnkit_attention``) with a ``proj`` Linear (TransformerAE)

The query/key-weight layouts of the same families are in ``attnkit.seam.adapters.qk_weights``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from attnkit.errors import UserError


@dataclass(frozen=True)
class GateLayout:
    name: str
    x_module: nn.Module  # its forward input is the gate's X (B, T, hidden)
    out_proj: nn.Module  # its forward input is Y (B, T, num_heads * head_dim)
    hidden: int
    num_heads: int
    head_dim: int


def _in_features(proj: nn.Module) -> int | None:
    if isinstance(proj, nn.Linear):
        return proj.in_features
    if type(proj).__name__ == "Conv1D":  # transformers' GPT-2 Conv1D: weight (in, out)
        return int(proj.weight.shape[0])
    return None


def _make(name: str, x_module: nn.Module, out_proj: nn.Module, hidden: int | None, heads: int | None) -> GateLayout | None:
    width = _in_features(out_proj)
    if width is None or not isinstance(hidden, int) or not isinstance(heads, int) or heads <= 0 or width % heads:
        return None
    return GateLayout(name, x_module, out_proj, hidden, heads, width // heads)


def _gpt2(m: nn.Module) -> GateLayout | None:
    if type(m).__name__ != "GPT2Attention" and not (hasattr(m, "c_attn") and hasattr(m, "c_proj")):
        return None
    proj = getattr(m, "c_proj", None)
    return _make("gpt2", m, proj, getattr(m, "embed_dim", None), getattr(m, "num_heads", None)) if proj is not None else None


def _separate(m: nn.Module) -> GateLayout | None:
    q, o = getattr(m, "q_proj", None), getattr(m, "o_proj", None)
    if not (isinstance(q, nn.Linear) and isinstance(o, nn.Linear)):
        return None
    d = getattr(m, "head_dim", None)
    if not isinstance(d, int) or o.in_features % d:
        return None
    return _make("separate", m, o, q.in_features, o.in_features // d)


def _bert(m: nn.Module) -> GateLayout | None:
    inner, out = getattr(m, "self", None), getattr(m, "output", None)
    q, dense = getattr(inner, "query", None), getattr(out, "dense", None)
    if not (isinstance(q, nn.Linear) and isinstance(dense, nn.Linear)):
        return None
    return _make("bert", m, dense, q.in_features, getattr(inner, "num_attention_heads", None))


def _attnkit(m: nn.Module) -> GateLayout | None:
    proj = getattr(m, "proj", None)
    if not getattr(type(m), "is_attnkit_attention", False) or not isinstance(proj, nn.Linear):
        return None
    return _make("attnkit", m, proj, getattr(m, "d_model", None), getattr(m, "n_head", None))


GATE_LAYOUTS: dict[str, Callable[[nn.Module], GateLayout | None]] = {
    "attnkit": _attnkit,
    "gpt2": _gpt2,
    "bert": _bert,
    "separate": _separate,
}


def gate_layouts(model: nn.Module) -> list[GateLayout]:
    """Every gateable attention module of ``model``, in module order (= layer order); a
    ``UserError`` naming the model when there is none."""
    found: list[GateLayout] = []
    taken: set[int] = set()
    for m in model.modules():
        if id(m) in taken:
            continue
        for fn in GATE_LAYOUTS.values():
            layout = fn(m)
            if layout is not None:
                found.append(layout)
                taken.update(id(s) for s in m.modules())  # BertAttention's own .self is not another site
                break
    if not found:
        raise UserError(f"attnkit does not know where {type(model).__name__} keeps its attention output projection "
                        f"(known layouts: {', '.join(GATE_LAYOUTS)}); add one to attnkit.gate.layouts.GATE_LAYOUTS")
    return found
