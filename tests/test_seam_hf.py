"""Hugging Face adapter: captured probabilities equal the model's own eager attention.

The reference is ``output_attentions=True`` of the same model in ``eager``: transformers'
own softmax over its own mask, independent of attnkit. Observation must not change outputs
(compared with a plain SDPA run), and layer/head selection captures exactly what was asked.
"""

from __future__ import annotations

import pytest
import torch

from attnkit.seam import MapCapture, StatsCollector, attach
from conftest import MISTRAL_WINDOW, _ids, bert, gpt2, llama, mistral

ATOL = 1e-5


def _observe(model, inputs: dict, **attach_kwargs):
    cap = MapCapture()
    with torch.no_grad(), attach(model, taps=[cap], **attach_kwargs):
        out = model(**inputs)
    return cap, out


def _eager(model, inputs: dict):
    with torch.no_grad():
        return model(**inputs, output_attentions=True)


def _causal(n: int) -> torch.Tensor:
    return torch.tril(torch.ones(n, n, dtype=torch.bool))


# --------------------------------------------------------------------------- GPT-2
def test_gpt2_probs_equal_eager(ids):
    model = gpt2()
    ref = _eager(model, {"input_ids": ids})
    cap, _ = _observe(model, {"input_ids": ids})
    assert sorted(site.layer for site in cap.maps) == [0, 1]
    for layer, want in enumerate(ref.attentions):
        got = cap.maps[layer]
        assert got.shape == want.shape == (2, 4, 10, 10)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
        # attention is far from uniform, so the comparison means something
        assert got.amax() > 0.5
        assert torch.all(got[..., ~_causal(10)] == 0), "future keys must get exactly zero"
        torch.testing.assert_close(got.sum(-1), torch.ones(2, 4, 10), atol=1e-6, rtol=0)


def test_gpt2_keep_logits_are_scaled_qk_with_minus_inf_on_future(ids):
    model = gpt2()
    captured_qkv = {}

    def grab(module, args, output):
        captured_qkv["qkv"] = output.detach()

    handle = model.transformer.h[0].attn.c_attn.register_forward_hook(grab)
    cap = MapCapture(keep_logits=True)
    try:
        with torch.no_grad(), attach(model, taps=[cap], layers=[0]):
            model(ids)
    finally:
        handle.remove()
    q, k, _ = captured_qkv["qkv"].split(32, dim=-1)
    q = q.view(2, 10, 4, 8).transpose(1, 2)
    k = k.view(2, 10, 4, 8).transpose(1, 2)
    want = (q @ k.transpose(-1, -2)) / 8**0.5
    got = cap.logits[0]
    visible = _causal(10)
    torch.testing.assert_close(got[..., visible], want[..., visible], atol=1e-5, rtol=1e-5)
    assert torch.all(got[..., ~visible] == -torch.inf)


# --------------------------------------------------------------------------- BERT
@pytest.mark.parametrize("padded", [False, True], ids=["no_mask", "right_padding"])
def test_bert_probs_equal_eager(ids, padded):
    model = bert()
    mask = torch.ones(2, 10, dtype=torch.long)
    if padded:
        mask[1, 7:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    ref = _eager(model, inputs)
    cap, _ = _observe(model, inputs)
    for layer, want in enumerate(ref.attentions):
        got = cap.maps[layer]
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
        # bidirectional: no causal mask, every real key visible
        assert torch.all(got[0] > 0)
        if padded:
            assert torch.all(got[1, :, :, 7:] == 0), "padding keys must get exactly zero"
            assert torch.all(got[1, :, :, :7] > 0)
        torch.testing.assert_close(got.sum(-1), torch.ones_like(got.sum(-1)), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- Llama, GQA
def test_llama_gqa_probs_equal_eager_with_left_padding():
    model = llama()
    assert model.config.num_key_value_heads < model.config.num_attention_heads
    ids = _ids(2, 10)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    inputs = {"input_ids": ids, "attention_mask": mask}
    ref = _eager(model, inputs)
    cap, _ = _observe(model, inputs)
    for layer, want in enumerate(ref.attentions):
        got = cap.maps[layer]
        assert got.shape == (2, 4, 10, 10)
        torch.testing.assert_close(got[0], want[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(got[1, :, 3:], want[1, :, 3:], atol=ATOL, rtol=0)  # real rows only
        assert torch.all(got[1, :, 3:, :3] == 0), "left-padding keys must get exactly zero"
        assert torch.all(got[..., ~_causal(10)] == 0)
        # the padding query rows see nothing: the seam gives all-zero rows (finite, not NaN)
        pad_rows = got[1, :, :3]
        assert torch.isfinite(pad_rows).all()
        assert torch.all(pad_rows == 0)
        torch.testing.assert_close(got[1, :, 3:].sum(-1), torch.ones(4, 7), atol=1e-6, rtol=0)
        # the two heads of a key/value group share keys but not queries: their maps differ
        assert not torch.allclose(got[0, 0], got[0, 1], atol=1e-3)


# --------------------------------------------------------------------------- Mistral, sliding window
def test_mistral_sliding_window_probs_equal_eager_and_zero_outside_window():
    model = mistral()
    n = 12
    assert MISTRAL_WINDOW < n
    ids = _ids(2, n)
    ref = _eager(model, {"input_ids": ids})
    cap, _ = _observe(model, {"input_ids": ids})
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    inside = (j <= i) & (i - j < MISTRAL_WINDOW)
    for layer, want in enumerate(ref.attentions):
        got = cap.maps[layer]
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
        assert torch.all(got[..., ~inside] == 0), "keys outside the sliding window must get exactly zero"
        assert torch.all(got[..., inside] > 0)
        torch.testing.assert_close(got.sum(-1), torch.ones_like(got.sum(-1)), atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- outputs unchanged
@pytest.mark.parametrize("factory", [gpt2, bert, llama, mistral], ids=["gpt2", "bert", "llama", "mistral"])
def test_observation_does_not_change_outputs(factory):
    model = factory("sdpa")
    ids = _ids(2, 12)
    mask = torch.ones(2, 12, dtype=torch.long)
    if factory is bert:
        mask[1, 8:] = 0  # right padding
    else:
        mask[1, :3] = 0  # left padding
    real = mask.bool()
    inputs = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        plain = model(**inputs)
        with attach(model, taps=[MapCapture(), StatsCollector()]):
            seen = model(**inputs)
        with attach(model, taps=[StatsCollector()], heads=[1, 3], sample_rows=4):
            sampled = model(**inputs)
    name = "last_hidden_state" if factory is bert else "logits"
    a, b, c = getattr(plain, name), getattr(seen, name), getattr(sampled, name)
    assert a.abs().amax() > 0
    torch.testing.assert_close(b[real], a[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c[real], a[real], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- selection
def test_layer_selection_captures_only_that_layer(ids):
    model = gpt2(layers=3)
    ref = _eager(model, {"input_ids": ids})
    cap, _ = _observe(model, {"input_ids": ids}, layers=[1])
    assert [site.layer for site in cap.maps] == [1]
    torch.testing.assert_close(cap.maps[1], ref.attentions[1], atol=ATOL, rtol=0)


def test_head_selection_captures_only_those_heads(ids):
    model = gpt2()
    ref = _eager(model, {"input_ids": ids})
    cap, _ = _observe(model, {"input_ids": ids}, heads=[0, 2])
    stats = StatsCollector()
    with torch.no_grad(), attach(model, taps=[stats], heads={1: [3]}):
        model(ids)
    for layer in (0, 1):
        assert cap.head_ids[layer] == [0, 2]
        assert cap.maps[layer].shape == (2, 2, 10, 10)
        torch.testing.assert_close(cap.maps[layer], ref.attentions[layer][:, [0, 2]], atol=ATOL, rtol=0)
    # dict form: only head 3 of layer 1; layer 0 keeps all its heads
    assert {site.layer: h for site, h in stats.head_ids.items()} == {0: [0, 1, 2, 3], 1: [3]}
    assert [(h["layer"], h["head"]) for h in stats.heads()] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 3)]


def test_head_selection_out_of_range_is_an_error(ids):
    model = gpt2()
    with pytest.raises(ValueError, match="no head 7"):
        with torch.no_grad(), attach(model, taps=[MapCapture()], heads=[7]):
            model(ids)
    assert model.config._attn_implementation == "eager"
