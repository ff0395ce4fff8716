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
from attnkit.seam.adapters.qk_weights import qk_layout

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
        model(input_ids=ids)
    return [h["logit_max"] for h in stats.heads()], module["m"]


@pytest.mark.parametrize("kind", ["gpt2", "llama_gqa", "bert", "phi3_fused", "neox", "mha"])
def test_qk_clip_bounds_each_head_max_logit(kind):
    model = (_MHAModel() if kind == "mha" else _hf(kind)).eval()
    ids = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))
    _, module = _max_logits(model, ids)
    layout = qk_layout(module)
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
