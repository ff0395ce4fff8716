"""Where each family keeps its attention weights: the one table, read by every feature that
needs weights rather than calls.

The seam hands features attention *calls*; some features need the *weights* behind a call. QK-clip
rescales head h's W_q rows (and its key head's W_k rows), the monitor takes the gradient norm of a
layer's query/key parameters, an intervention sets attention dropout, ``check`` reads W_q/W_k to
estimate logits; an output gate multiplies the heads' outputs before the output projection, by
a function of the layer's input hidden states. Each family is one ``Layout`` in ``LAYOUTS`` with
up to two small functions:

- ``qk(module)`` for the attention module of a call (``AttentionCall.module``): a ``QKLayout``, for
  each query head and each key head the slices (``Piece``) of the parameters that produce it;
- ``output(module)`` for the module whose forward input is the layer's hidden states X: an
  ``OutputLayout`` naming that module and the output projection whose input Y (B, T, H·d), the
  heads' concatenated outputs, a gate multiplies (Qiu et al.'s G1, Qwen3-Next's gate).

| family | q / k | output projection |
|---|---|---|
| ``attnkit`` | (its rows [q, k, v] are the ``fused`` layout) | ``proj`` Linear of attnkit's own modules (TransformerAE) |
| ``mha`` | ``nn.MultiheadAttention``: ``in_proj_weight`` rows [q, k, v], or q/k_proj_weight | |
| ``gpt2`` | fused ``c_attn`` Conv1D, weight (in, 3·E), columns [q, k, v] | ``c_proj`` (Conv1D, weight (H·d, E)) |
| ``neox`` | fused ``query_key_value`` Linear, rows per head [q, k, v] (GPT-NeoX, Pythia) | |
| ``nanogpt`` | fused ``c_attn`` Linear (not GPT-2's Conv1D), rows [q, k, v], ``n_head`` | (``gpt2``'s: ``c_proj``) |
| ``timm`` | fused ``qkv`` Linear, rows [q, k, v], ``num_heads`` / ``head_dim`` (timm's ViT) | |
| ``fused`` | fused ``qkv_proj`` Linear, rows [q (H·d), k (KV·d), v (KV·d)] (Phi-3) | |
| ``bert`` | ``query`` / ``key`` Linears (``BertSelfAttention``: BERT, RoBERTa, MiniLM) | ``BertAttention``'s ``output.dense`` (X: its input, BERT being post-norm) |
| ``separate`` | ``q_proj`` / ``k_proj`` Linears (Llama, Mistral, Qwen, Gemma; GQA: fewer key heads) | ``o_proj`` |

The first layout that recognises a module wins, in table order (most specific first). A new
family is one entry here.

Rescaling a head's q pieces by a and its key head's k pieces by b scales that head's logits q·k by
exactly a·b (RoPE is linear; biases are scaled with their rows), unless the model normalises q and
k after the projection (QK-norm), which ``QKLayout.qk_norm`` says. A gate on the output
projection's input sees X after the block's own norm in pre-norm models (GPT-2's ``ln_1``,
Llama's ``input_layernorm`` run before the module).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from attnkit.errors import UserError


@dataclass(frozen=True)
class Piece:
    """``param.narrow(dim, start, length)``: a slice of a parameter that feeds one head."""

    param: nn.Parameter
    dim: int
    start: int
    length: int

    def of(self, tensor: Tensor) -> Tensor:
        """The same slice of ``tensor`` (the parameter itself, its ``.grad``, ...)."""
        return tensor.narrow(self.dim, self.start, self.length)


@dataclass
class QKLayout:
    """The query/key parameters of one attention module, by head."""

    name: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    q_pieces: list[list[Piece]]  # per query head
    k_pieces: list[list[Piece]]  # per key head
    qk_norm: bool = False  # q and k are normalised after the projection: rescaling W_q/W_k does nothing
    set_dropout: Callable[[float], None] | None = field(default=None, repr=False)

    def kv_head(self, head: int) -> int:
        """The key head that query head ``head`` reads (grouped-query attention)."""
        return head // (self.num_heads // self.num_kv_heads)

    def group(self, kv_head: int) -> list[int]:
        """The query heads sharing key head ``kv_head``."""
        size = self.num_heads // self.num_kv_heads
        return list(range(kv_head * size, (kv_head + 1) * size))

    def params(self) -> list[nn.Parameter]:
        """Every parameter holding a query or key piece (each once)."""
        seen: dict[int, nn.Parameter] = {}
        for pieces in (*self.q_pieces, *self.k_pieces):
            for p in pieces:
                seen.setdefault(id(p.param), p.param)
        return list(seen.values())

    def pieces_of(self, param: nn.Parameter) -> list[Piece]:
        return [p for pieces in (*self.q_pieces, *self.k_pieces) for p in pieces if p.param is param]

    @torch.no_grad()
    def scale_query(self, head: int, factor: float) -> None:
        for p in self.q_pieces[head]:
            p.of(p.param.data).mul_(factor)

    @torch.no_grad()
    def scale_key(self, kv_head: int, factor: float) -> None:
        for p in self.k_pieces[kv_head]:
            p.of(p.param.data).mul_(factor)


def _rows(weight: nn.Parameter, bias: nn.Parameter | None, offset: int, size: int, weight_dim: int = 0) -> list[Piece]:
    pieces = [Piece(weight, weight_dim, offset, size)]
    if bias is not None:
        pieces.append(Piece(bias, 0, offset, size))
    return pieces


def _dropout_setter(module: nn.Module, *names: str) -> Callable[[float], None] | None:
    """Set attention dropout where the module keeps it: an ``nn.Dropout`` or a float attribute."""
    for name in names:
        value = getattr(module, name, None)
        if isinstance(value, nn.Dropout):
            return lambda p, d=value: setattr(d, "p", float(p))
        if isinstance(value, float) and not isinstance(value, bool):
            return lambda p, n=name: setattr(module, n, float(p))
    return None


def _has_qk_norm(module: nn.Module) -> bool:
    # an nn.Identity in the slot (timm without qk_norm) normalises nothing
    return any(isinstance(getattr(module, n, None), nn.Module) and not isinstance(getattr(module, n), nn.Identity)
               for n in ("q_norm", "k_norm", "q_layernorm", "k_layernorm"))


def _qk_separate(module: nn.Module) -> QKLayout | None:
    q, k = getattr(module, "q_proj", None), getattr(module, "k_proj", None)
    if not (isinstance(q, nn.Linear) and isinstance(k, nn.Linear)):
        return None
    d = getattr(module, "head_dim", None)
    if not isinstance(d, int):
        return None
    H, KV = q.out_features // d, k.out_features // d
    return QKLayout("separate", H, KV, d,
                    [_rows(q.weight, q.bias, h * d, d) for h in range(H)],
                    [_rows(k.weight, k.bias, g * d, d) for g in range(KV)],
                    qk_norm=_has_qk_norm(module),
                    set_dropout=_dropout_setter(module, "attention_dropout", "attn_dropout", "dropout"))


def _qk_bert(module: nn.Module) -> QKLayout | None:
    q, k = getattr(module, "query", None), getattr(module, "key", None)
    if not (isinstance(q, nn.Linear) and isinstance(k, nn.Linear)):
        return None
    H, d = module.num_attention_heads, module.attention_head_size
    return QKLayout("bert", H, H, d,
                    [_rows(q.weight, q.bias, h * d, d) for h in range(H)],
                    [_rows(k.weight, k.bias, h * d, d) for h in range(H)],
                    set_dropout=_dropout_setter(module, "dropout"))


def _qk_gpt2(module: nn.Module) -> QKLayout | None:
    c_attn = getattr(module, "c_attn", None)
    if c_attn is None or getattr(module, "is_cross_attention", False) or type(c_attn).__name__ != "Conv1D":
        return None
    H, d, E = module.num_heads, module.head_dim, module.embed_dim
    w, b = c_attn.weight, c_attn.bias  # Conv1D: weight (in, out), out columns [q | k | v]
    return QKLayout("gpt2", H, H, d,
                    [_rows(w, b, h * d, d, weight_dim=1) for h in range(H)],
                    [_rows(w, b, E + h * d, d, weight_dim=1) for h in range(H)],
                    set_dropout=_dropout_setter(module, "attn_dropout"))


def _qk_fused(module: nn.Module) -> QKLayout | None:
    qkv = getattr(module, "qkv_proj", None)
    if not isinstance(qkv, nn.Linear) or not isinstance(getattr(module, "head_dim", None), int):
        return None
    d = module.head_dim
    KV = getattr(module, "num_key_value_heads", None) or module.config.num_key_value_heads
    H = qkv.out_features // d - 2 * KV
    return QKLayout("fused", H, KV, d,
                    [_rows(qkv.weight, qkv.bias, h * d, d) for h in range(H)],
                    [_rows(qkv.weight, qkv.bias, H * d + g * d, d) for g in range(KV)],
                    qk_norm=_has_qk_norm(module),
                    set_dropout=_dropout_setter(module, "attention_dropout", "attn_dropout"))


def _qk_neox(module: nn.Module) -> QKLayout | None:
    qkv = getattr(module, "query_key_value", None)
    d = getattr(module, "head_size", None)
    if not isinstance(qkv, nn.Linear) or not isinstance(d, int):
        return None
    H = qkv.out_features // (3 * d)
    return QKLayout("neox", H, H, d,
                    [_rows(qkv.weight, qkv.bias, h * 3 * d, d) for h in range(H)],
                    [_rows(qkv.weight, qkv.bias, h * 3 * d + d, d) for h in range(H)],
                    set_dropout=_dropout_setter(module, "attention_dropout"))


def _fused_rows(name: str, module: nn.Module, qkv: nn.Linear, H: int, d: int, set_dropout) -> QKLayout:
    """One Linear whose output rows are [q (H·d) | k (H·d) | v (H·d)], head h at rows h·d."""
    E = H * d
    return QKLayout(name, H, H, d,
                    [_rows(qkv.weight, qkv.bias, h * d, d) for h in range(H)],
                    [_rows(qkv.weight, qkv.bias, E + h * d, d) for h in range(H)],
                    qk_norm=_has_qk_norm(module), set_dropout=set_dropout)


def _qk_nanogpt(module: nn.Module) -> QKLayout | None:
    c_attn, H = getattr(module, "c_attn", None), getattr(module, "n_head", None)
    if not isinstance(c_attn, nn.Linear) or not isinstance(H, int) or c_attn.out_features % (3 * H):
        return None
    drop = getattr(module, "attn_dropout", None)

    def set_dropout(p: float) -> None:
        # the flash path passes the float ``self.dropout`` to SDPA, the slow path uses ``attn_dropout``
        if isinstance(getattr(module, "dropout", None), float):
            module.dropout = float(p)
        if isinstance(drop, nn.Dropout):
            drop.p = float(p)

    return _fused_rows("nanogpt", module, c_attn, H, c_attn.out_features // (3 * H), set_dropout)


def _qk_timm(module: nn.Module) -> QKLayout | None:
    qkv, H, d = getattr(module, "qkv", None), getattr(module, "num_heads", None), getattr(module, "head_dim", None)
    if not isinstance(qkv, nn.Linear) or not isinstance(H, int) or not isinstance(d, int) or qkv.out_features != 3 * H * d:
        return None
    # timm's fused path passes ``self.attn_drop.p`` to SDPA: setting the module's p is enough
    return _fused_rows("timm", module, qkv, H, d, _dropout_setter(module, "attn_drop"))


def _qk_mha(module: nn.Module) -> QKLayout | None:
    if not isinstance(module, nn.MultiheadAttention):
        return None
    H, E = module.num_heads, module.embed_dim
    d = E // H
    b = module.in_proj_bias
    if module.in_proj_weight is not None:
        w = module.in_proj_weight
        q = [_rows(w, b, h * d, d) for h in range(H)]
        k = [_rows(w, b, E + h * d, d) for h in range(H)]
    else:
        q = [_rows(module.q_proj_weight, b, h * d, d) for h in range(H)]
        k = [[Piece(module.k_proj_weight, 0, h * d, d)] + ([Piece(b, 0, E + h * d, d)] if b is not None else [])
             for h in range(H)]
    return QKLayout("mha", H, H, d, q, k, set_dropout=_dropout_setter(module, "dropout"))



@dataclass(frozen=True)
class OutputLayout:
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


def _make(name: str, x_module: nn.Module, out_proj: nn.Module, hidden: int | None, heads: int | None) -> OutputLayout | None:
    width = _in_features(out_proj)
    if width is None or not isinstance(hidden, int) or not isinstance(heads, int) or heads <= 0 or width % heads:
        return None
    return OutputLayout(name, x_module, out_proj, hidden, heads, width // heads)


def _out_gpt2(m: nn.Module) -> OutputLayout | None:
    if type(m).__name__ != "GPT2Attention" and not (hasattr(m, "c_attn") and hasattr(m, "c_proj")):
        return None
    proj = getattr(m, "c_proj", None)
    return _make("gpt2", m, proj, getattr(m, "embed_dim", None), getattr(m, "num_heads", None)) if proj is not None else None


def _out_separate(m: nn.Module) -> OutputLayout | None:
    q, o = getattr(m, "q_proj", None), getattr(m, "o_proj", None)
    if not (isinstance(q, nn.Linear) and isinstance(o, nn.Linear)):
        return None
    d = getattr(m, "head_dim", None)
    if not isinstance(d, int) or o.in_features % d:
        return None
    return _make("separate", m, o, q.in_features, o.in_features // d)


def _out_bert(m: nn.Module) -> OutputLayout | None:
    inner, out = getattr(m, "self", None), getattr(m, "output", None)
    q, dense = getattr(inner, "query", None), getattr(out, "dense", None)
    if not (isinstance(q, nn.Linear) and isinstance(dense, nn.Linear)):
        return None
    return _make("bert", m, dense, q.in_features, getattr(inner, "num_attention_heads", None))


def _out_attnkit(m: nn.Module) -> OutputLayout | None:
    proj = getattr(m, "proj", None)
    if not getattr(type(m), "is_attnkit_attention", False) or not isinstance(proj, nn.Linear):
        return None
    return _make("attnkit", m, proj, getattr(m, "d_model", None), getattr(m, "n_head", None))



@dataclass(frozen=True)
class Layout:
    """One family: ``qk`` and ``output`` each return None for a module that is not theirs."""

    name: str
    qk: Callable[[nn.Module], QKLayout | None] | None = None
    output: Callable[[nn.Module], OutputLayout | None] | None = None


# name -> layout; the first that recognises a module wins (most specific first)
LAYOUTS: dict[str, Layout] = {
    "attnkit": Layout("attnkit", output=_out_attnkit),
    "mha": Layout("mha", qk=_qk_mha),
    "gpt2": Layout("gpt2", qk=_qk_gpt2, output=_out_gpt2),
    "neox": Layout("neox", qk=_qk_neox),
    "nanogpt": Layout("nanogpt", qk=_qk_nanogpt),
    "timm": Layout("timm", qk=_qk_timm),
    "fused": Layout("fused", qk=_qk_fused),
    "bert": Layout("bert", qk=_qk_bert, output=_out_bert),
    "separate": Layout("separate", qk=_qk_separate, output=_out_separate),
}


def _known(aspect: str) -> str:
    return ", ".join(name for name, layout in LAYOUTS.items() if getattr(layout, aspect) is not None)


def qk_layout(module: nn.Module) -> QKLayout:
    """The query/key layout of an attention module; a ``UserError`` naming it when none fits."""
    for layout in LAYOUTS.values():
        found = layout.qk(module) if layout.qk is not None else None
        if found is not None:
            return found
    raise UserError(f"attnkit does not know where {type(module).__name__} keeps its query/key weights "
                    f"(known layouts: {_known('qk')}); add one to attnkit.seam.layouts.LAYOUTS")


def output_layouts(model: nn.Module) -> list[OutputLayout]:
    """Every attention module of ``model`` whose output projection is known, in module order (=
    layer order); a ``UserError`` naming the model when there is none."""
    found: list[OutputLayout] = []
    taken: set[int] = set()
    for m in model.modules():
        if id(m) in taken:
            continue
        for layout in LAYOUTS.values():
            out = layout.output(m) if layout.output is not None else None
            if out is not None:
                found.append(out)
                taken.update(id(s) for s in m.modules())  # BertAttention's own .self is not another site
                break
    if not found:
        raise UserError(f"attnkit does not know where {type(model).__name__} keeps its attention output projection "
                        f"(known layouts: {_known('output')}); add one to attnkit.seam.layouts.LAYOUTS")
    return found
