"""QK-clip on every query/key weight layout: after the clip each head's max logit, measured
through the seam on the same batch, is <= tau (and about tau where it was above), heads below tau
keep their logits, and a QK-norm model is refused."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attnkit.errors import UserError
from attnkit.monitor import qk_clip_layout
from attnkit.seam import StatsCollector, attach
from attnkit.seam.layouts import qk_layout

TAU = 4.0


def _hf(kind: str):
    import transformers as tf

    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = tf.GPT2Config(n_layer=1, n_head=4, n_embd=32, n_positions=16, vocab_size=50)
        return tf.GPT2LMHeadModel._from_config(cfg, attn_implementation="sdpa")
    if kind == "llama_gqa":
        cfg = tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=50, max_position_embeddings=16)
        return tf.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")
    if kind == "bert":
        cfg = tf.BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                            vocab_size=50, max_position_embeddings=16)
        return tf.BertModel._from_config(cfg, attn_implementation="sdpa")
    if kind == "phi3_fused":
        cfg = tf.Phi3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=50, max_position_embeddings=16, pad_token_id=0)
        return tf.Phi3ForCausalLM._from_config(cfg, attn_implementation="sdpa")
    if kind == "neox":
        cfg = tf.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                               vocab_size=50, max_position_embeddings=16)
        return tf.GPTNeoXForCausalLM._from_config(cfg, attn_implementation="sdpa")
    raise ValueError(kind)


class _MHAModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(50, 32)
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), 1,
                                         enable_nested_tensor=False)

    def forward(self, input_ids):
        return self.enc(self.emb(input_ids))


def _byo(kind: str):
    """nanoGPT (fused ``c_attn`` Linear) and a timm-style ViT (fused ``qkv`` Linear), as written there."""
    import byo_models

    torch.manual_seed(0)
    # one layer, as the HF models above: every head measured is one the clip acted on directly
    return (byo_models.build({"vocab_size": 50, "block_size": 16, "n_layer": 1}) if kind == "nanogpt"
            else byo_models.build_vit({"depth": 1}))


def _inputs(kind: str) -> dict:
    g = torch.Generator().manual_seed(1)
    if kind == "nanogpt":
        return {"idx": torch.randint(0, 50, (2, 16), generator=g)}
    if kind == "timm":
        return {"x": torch.randn(2, 3, 16, 16, generator=g)}
    return {"input_ids": torch.randint(0, 50, (2, 16), generator=g)}


def _model(kind: str) -> nn.Module:
    if kind == "mha":
        return _MHAModel()
    return _byo(kind) if kind in ("nanogpt", "timm") else _hf(kind)


def _max_logits(model, ids) -> tuple[list[float], nn.Module]:
    stats = StatsCollector()
    module = {}

    from attnkit.seam import Tap

    class Grab(Tap):  # the attention module of the call, from the observation
        def observe_rows(self, rows):
            module.setdefault("m", rows.call.module)

        def observe(self, chunk):
            module.setdefault("m", chunk.call.module)

    with torch.no_grad(), attach(model, taps=[stats, Grab()]):
        model(**(ids if isinstance(ids, dict) else {"input_ids": ids}))
    return [h["logit_max"] for h in stats.heads()], module["m"]


KINDS = ["gpt2", "llama_gqa", "bert", "phi3_fused", "neox", "mha", "nanogpt", "timm"]
LAYOUT_NAMES = {"gpt2": "gpt2", "llama_gqa": "separate", "bert": "bert", "phi3_fused": "fused", "neox": "neox",
                "mha": "mha", "nanogpt": "nanogpt", "timm": "timm"}


@pytest.mark.parametrize("kind", KINDS)
def test_qk_clip_bounds_each_head_max_logit(kind):
    model = _model(kind).eval()
    ids = _inputs(kind)
    _, module = _max_logits(model, ids)
    layout = qk_layout(module)
    assert layout.name == LAYOUT_NAMES[kind] and not layout.qk_norm
    with torch.no_grad():  # make head 1 (and in GQA its whole group) far too sharp
        layout.scale_query(1, 400.0)
        layout.scale_key(layout.kv_head(1), 5.0)
    before, _ = _max_logits(model, ids)
    assert before[1] > 4 * TAU
    clipped = qk_clip_layout(layout, before, TAU)
    assert 1 in clipped
    after, _ = _max_logits(model, ids)
    for h, (b, a) in enumerate(zip(before, after)):
        if b > TAU:
            assert a <= TAU * (1 + 1e-4) and a == pytest.approx(TAU, rel=1e-3), (h, b, a)
        else:
            assert a == pytest.approx(b, rel=1e-4), (h, b, a)  # heads below tau (also in a clipped group) keep theirs


@pytest.mark.parametrize("kind", ["nanogpt", "timm"])
def test_fused_layouts_slice_exactly_the_heads_q_and_k(kind):
    """Independent of the layout: the q/k of head h computed by hand from the fused projection's
    output ([q | k | v], head h at columns h·d) change only when head h's pieces are scaled."""
    model = _model(kind)
    attn = model.transformer.h[0].attn if kind == "nanogpt" else model.blocks[0].attn
    proj = attn.c_attn if kind == "nanogpt" else attn.qkv
    layout = qk_layout(attn)
    H, d = layout.num_heads, layout.head_dim
    x = torch.randn(3, proj.in_features)
    before = proj(x).detach().view(3, 3, H, d)  # (rows, q|k|v, head, hs)
    with torch.no_grad():
        layout.scale_query(2, 3.0)
        layout.scale_key(1, 0.5)
    after = proj(x).detach().view(3, 3, H, d)
    expect = before.clone()
    expect[:, 0, 2] *= 3.0
    expect[:, 1, 1] *= 0.5
    torch.testing.assert_close(after, expect, rtol=1e-5, atol=1e-6)


def test_fused_layout_dropout_setters_reach_what_sdpa_is_given():
    nano, vit = _model("nanogpt"), _model("timm")
    qk_layout(nano.transformer.h[0].attn).set_dropout(0.3)
    qk_layout(vit.blocks[0].attn).set_dropout(0.2)
    assert nano.transformer.h[0].attn.dropout == 0.3 and nano.transformer.h[0].attn.attn_dropout.p == 0.3
    assert vit.blocks[0].attn.attn_drop.p == 0.2


def test_timm_identity_norms_are_not_qk_norm_and_real_ones_are():
    vit = _model("timm")
    attn = vit.blocks[0].attn
    attn.q_norm, attn.k_norm = nn.Identity(), nn.Identity()  # timm's Attention(qk_norm=False)
    assert not qk_layout(attn).qk_norm
    attn.q_norm, attn.k_norm = nn.LayerNorm(attn.head_dim), nn.LayerNorm(attn.head_dim)  # qk_norm=True
    with pytest.raises(UserError, match="QK-norm"):
        qk_clip_layout(qk_layout(attn), [1e3] * attn.num_heads, TAU)


def test_qk_norm_models_are_refused():
    import transformers as tf

    cfg = tf.Qwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, vocab_size=50, max_position_embeddings=16)
    model = tf.Qwen3ForCausalLM._from_config(cfg, attn_implementation="sdpa")
    layout = qk_layout(model.model.layers[0].self_attn)
    assert layout.qk_norm and layout.num_kv_heads == 2
    with pytest.raises(UserError, match="QK-norm"):
        qk_clip_layout(layout, [1e3] * 4, TAU)


def test_unknown_layout_is_a_clear_error():
    class Odd(nn.Module):
        pass

    with pytest.raises(UserError, match="query/key weights"):
        qk_layout(Odd())
