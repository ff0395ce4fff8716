"""A session that computes some calls on its own (``AttentionSession.answer_plain``), asked by the seam
before it builds the call, only when the answer cannot differ from the general path's:

- alone on the model, active, on every head of a site it touches, for a plain call: asked at every
  site, and its output is the attention's output;
- another session on the model, inactive, a site outside its layers, some heads only, a call with
  dropout in force, a soft-cap, a position bias or sinks, or a checkpoint's recompute: never asked,
  and the model computes exactly what it computes unattached.
"""

from __future__ import annotations

import pytest
import torch

import torch.nn.functional as F

from attnkit.seam import AttentionSession, Site, Tap, attach
from attnkit.seam.adapters.hf import attnkit_attention
from arch_zoo import enable_checkpointing
from conftest import _ids, gpt2, llama


class Answering(AttentionSession):
    """Answers every call it is asked with a zero output (or, ``causal``, with causal SDPA over its
    keys), and notes where it was asked."""

    def __init__(self, causal: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.asked: list[Site] = []
        self.causal = causal

    def answer_plain(self, module, site, query, key, value, mask, scale):
        self.asked.append(site)
        if self.causal:
            return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale, enable_gqa=True)
        B, H, Q, _ = query.shape
        return query.new_zeros(B, H, Q, value.shape[-1])


def _zero_attention(module, query, key, value, attention_mask, **kwargs):
    B, H, Q, _ = query.shape
    return query.new_zeros(B, Q, H, value.shape[-1]), None


class _Nothing(Tap):
    wants_call = wants_chunks = False


def _logits(model, ids, *sessions):
    with torch.no_grad():
        if not sessions:
            return model(input_ids=ids).logits
        with attach(model, sessions[0]):
            if len(sessions) == 1:
                return model(input_ids=ids).logits
            with attach(model, sessions[1]):
                return model(input_ids=ids).logits


@pytest.mark.parametrize("make", [llama, gpt2], ids=["llama-gqa", "gpt2-mha"])
def test_a_session_alone_answers_every_plain_call(make):
    model = make("sdpa")
    ids = _ids(2, 9)
    plain = _logits(model, ids)
    session = Answering()
    answered = _logits(model, ids, session)
    layers = model.config.num_hidden_layers
    assert session.asked == [Site(i) for i in range(layers)]
    assert session.sites_seen == set(session.asked)
    assert not torch.allclose(answered, plain)  # attention's output was the answer's zeros
    # the same as the model with an attention function of its own that outputs zeros
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register("test_zero_attention", _zero_attention)
    AttentionMaskInterface.register("test_zero_attention", sdpa_mask)
    model.set_attn_implementation("test_zero_attention")
    try:
        zeros = _logits(model, ids)
    finally:
        model.set_attn_implementation("sdpa")
    assert torch.equal(zeros, answered)


@pytest.mark.parametrize("why", ["another session", "inactive", "outside its layers", "some heads"])
def test_a_session_is_not_asked_where_the_general_path_must_run(why):
    model = llama("sdpa")
    ids = _ids(1, 7)
    plain = _logits(model, ids)
    kwargs = {"layers": [1]} if why == "outside its layers" else {"heads": [0]} if why == "some heads" else {}
    session = Answering(**kwargs)
    if why == "inactive":
        session.active = False
    others = (AttentionSession(taps=[_Nothing()]),) if why == "another session" else ()
    got = _logits(model, ids, session, *others)
    if why == "outside its layers":
        assert session.asked == [Site(1)]  # layer 1 answered, layer 0 left to the model
        return
    assert session.asked == []
    assert torch.equal(got, plain)


def test_a_call_with_dropout_in_force_is_not_plain():
    model = gpt2("sdpa")
    model.config.attn_pdrop = 0.5
    for block in model.transformer.h:
        block.attn.attn_dropout.p = 0.5
        block.attn.attn_dropout.train()
    ids = _ids(1, 7)
    session = Answering()
    model.train()
    try:
        with attach(model, session), torch.no_grad():
            model(input_ids=ids)
    finally:
        model.eval()
    assert session.asked == []  # dropout applies: the general path, with its dropout
    with attach(model, session), torch.no_grad():
        model(input_ids=ids)
    assert len(session.asked) == model.config.num_hidden_layers  # in eval mode the same call is plain


@pytest.mark.parametrize("extra", ["softcap", "position_bias", "s_aux", "sinks"])
def test_a_call_with_a_soft_cap_bias_or_sinks_is_not_plain(extra):
    model = llama("eager")  # its own kernel takes (and ignores) them, where SDPA refuses a soft-cap
    module = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(1, 4, 5, 8, generator=g), torch.randn(1, 2, 5, 8, generator=g), torch.randn(1, 2, 5, 8, generator=g)
    value = {"softcap": 30.0, "position_bias": torch.zeros(1, 4, 5, 5), "s_aux": torch.zeros(4),
             "sinks": torch.zeros(1, 4, 5, 1)}[extra]
    session = Answering()
    with attach(model, session), torch.no_grad():
        attnkit_attention(module, q, k, v, None, scaling=0.35, **{extra: value})
        assert session.asked == []
        attnkit_attention(module, q, k, v, None, scaling=0.35)
    assert session.asked == [Site(0)]


def test_a_checkpoint_recompute_is_not_asked():
    model = llama("sdpa")
    enable_checkpointing(model, use_reentrant=False)
    model.train()
    ids = _ids(1, 7)
    session = Answering(causal=True)  # what the model computes: the recompute matches the forward
    try:
        with attach(model, session):
            model(input_ids=ids, labels=ids).loss.backward()
    finally:
        model.eval()
    assert session.asked == [Site(0), Site(1)]  # the forward's calls only


@pytest.mark.parametrize("masked,module_causal,queries,keys,want", [
    (False, True, 1, 8, True),    # a decoding step of a causal model
    (False, False, 1, 8, False),  # an encoder's or cross-attention's one query
    (True, False, 1, 8, True),    # with a mask, no key is in the last query's future
    (True, True, 1, 0, False),    # a masked query over no keys: more queries than keys
    (False, True, 4, 8, False),   # several queries and no mask: not known to be causal
    (True, True, 4, 2, False),    # more queries than keys
], ids=["step", "not-causal-module", "masked-step", "no-keys", "prompt-no-mask", "more-queries"])
def test_one_rule_for_a_calls_causality(masked, module_causal, queries, keys, want):
    from torch import nn

    from attnkit.seam.call import AttentionCall
    from attnkit.seam.sites import Site
    from attnkit.sparse.attention import is_causal_call, is_causal_step

    module = nn.Module()
    module.is_causal = module_causal
    q, k = torch.randn(1, 2, queries, 8), torch.randn(1, 2, keys, 8)
    allowed = torch.ones(1, 1, queries, keys, dtype=torch.bool) if masked else None
    assert is_causal_call(AttentionCall(module, Site(0), q, k, k, 1.0, allowed=allowed)) is want
    if queries == 1 and keys:  # the rule paged_step asks before any call is built
        assert is_causal_step(module, masked) is want
