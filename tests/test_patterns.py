"""Pattern overrides and score modifiers, checked against models whose own eager attention
does the same thing (zeroed query/key weights = uniform; halved query weights = temperature 2)."""

from __future__ import annotations

import copy

import pytest
import torch

from attnkit.seam.mods import PATTERNS, SCORE_MODS, local_pattern
from attnkit.seam import MapCapture, Site, attach
from conftest import _ids, gpt2

E, H, D = 32, 4, 8


def _causal(n: int) -> torch.Tensor:
    return torch.tril(torch.ones(n, n, dtype=torch.bool))


def _inv_counts(counts: torch.Tensor) -> torch.Tensor:
    return torch.ones((), dtype=torch.float32) / counts.to(torch.float32)


def _pattern_maps(model, ids, pattern):
    cap = MapCapture()
    with torch.no_grad(), attach(model, taps=[cap], **pattern):
        out = model(ids)
    return cap, out


# --------------------------------------------------------------------------- uniform
def test_uniform_rows_are_exactly_one_over_visible():
    model, ids = gpt2(), _ids(2, 9)
    cap, _ = _pattern_maps(model, ids, PATTERNS["uniform"])
    causal = _causal(9)
    want = torch.where(causal, _inv_counts(torch.arange(1, 10)).view(9, 1), torch.zeros(()))
    for layer in (0, 1):
        assert torch.equal(cap.maps[layer], want.expand(2, 4, 9, 9))


def test_uniform_respects_padding():
    model, ids = gpt2(), _ids(2, 8)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0
    cap = MapCapture()
    with torch.no_grad(), attach(model, taps=[cap], **PATTERNS["uniform"]):
        model(ids, attention_mask=mask)
    got = cap.maps[0][1]  # (H, Q, K), left-padded sequence
    for i in range(3, 8):
        visible = torch.zeros(8, dtype=torch.bool)
        visible[3 : i + 1] = True
        row = torch.where(visible, _inv_counts(visible.sum()), torch.zeros(()))
        assert torch.equal(got[:, i], row.expand(4, 8))
    assert torch.isfinite(got).all()


def _zero_qk(model):
    """A copy whose query and key projections are zero: its own eager attention is uniform."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for block in twin.transformer.h:
            block.attn.c_attn.weight[:, : 2 * E] = 0
            block.attn.c_attn.bias[: 2 * E] = 0
    return twin


def test_uniform_output_equals_eager_model_with_zero_qk():
    model, ids = gpt2(), _ids(2, 10)
    twin = _zero_qk(model)
    with torch.no_grad():
        ref = twin(ids, output_attentions=True)
        learned = model(ids).logits
        with attach(model, **PATTERNS["uniform"]):
            got = model(ids).logits
    # the reference really is uniform attention, and the pattern really changed the model
    torch.testing.assert_close(ref.attentions[1][0, 0, 3, :4], torch.full((4,), 0.25), atol=1e-7, rtol=0)
    assert (learned - ref.logits).abs().amax() > 1e-2
    torch.testing.assert_close(got, ref.logits, atol=1e-5, rtol=1e-5)


def test_uniform_on_selected_heads_only():
    """heads=[1] gets the running mean of its values; heads 0, 2, 3 keep their learned attention."""
    model, ids = gpt2(), _ids(2, 10)
    grabbed = {}
    h0 = model.transformer.h[0].attn
    hooks = [
        h0.c_attn.register_forward_hook(lambda m, a, o: grabbed.__setitem__("qkv", o.detach())),
        h0.c_proj.register_forward_pre_hook(lambda m, a: grabbed.setdefault("merged", []).append(a[0].detach())),
    ]
    cap = MapCapture()
    try:
        with torch.no_grad():
            model(ids)  # learned
            with attach(model, taps=[cap], **PATTERNS["uniform"], layers=[0], heads=[1]):
                model(ids)
    finally:
        for hk in hooks:
            hk.remove()
    learned, patched = (m.view(2, 10, H, D) for m in grabbed["merged"])
    v = grabbed["qkv"][..., 2 * E :].view(2, 10, H, D)
    running_mean = v.cumsum(1) / torch.arange(1, 11).view(1, 10, 1, 1)
    others = [0, 2, 3]
    torch.testing.assert_close(patched[:, :, others], learned[:, :, others], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(patched[:, :, 1], running_mean[:, :, 1], atol=1e-6, rtol=1e-6)
    assert (learned[:, :, 1] - running_mean[:, :, 1]).abs().amax() > 1e-2
    assert cap.head_ids == {Site(0): [1]}
    assert torch.equal(cap.maps[0][0, 0, 4, :5], torch.full((5,), 0.2))


# --------------------------------------------------------------------------- local, first token
@pytest.mark.parametrize("window", [2, 5])
def test_local_window_respects_window_and_causal_mask(window):
    n = 12
    model, ids = gpt2(), _ids(1, n)
    pattern = PATTERNS["local"] if window == 5 else local_pattern(window)
    cap, _ = _pattern_maps(model, ids, pattern)
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    inside = (j <= i) & (i - j <= window)
    want = torch.where(inside, _inv_counts(inside.sum(-1, keepdim=True)), torch.zeros(()))
    for layer in (0, 1):
        assert torch.equal(cap.maps[layer][0], want.expand(4, n, n))


def test_first_token_puts_all_mass_on_key_zero():
    model, ids = gpt2(), _ids(2, 8)
    cap, _ = _pattern_maps(model, ids, PATTERNS["first_token"])
    want = torch.zeros(2, 4, 8, 8)
    want[..., 0] = 1.0
    assert torch.equal(cap.maps[0], want)
    assert torch.equal(cap.maps[1], want)


def test_first_token_with_left_padding_uses_first_visible_key():
    model, ids = gpt2(), _ids(2, 8)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :2] = 0
    cap = MapCapture()
    with torch.no_grad(), attach(model, taps=[cap], **PATTERNS["first_token"]):
        model(ids, attention_mask=mask)
    got = cap.maps[0][1, :, 2:]  # real rows of the padded sequence
    assert torch.equal(got[..., 2], torch.ones(4, 6))
    assert got.sum() == 4 * 6


def test_previous_token_pattern():
    model, ids = gpt2(), _ids(1, 6)
    cap, _ = _pattern_maps(model, ids, PATTERNS["previous_token"])
    want = torch.zeros(1, 4, 6, 6)
    want[..., 0, 0] = 1.0
    for i in range(1, 6):
        want[..., i, i - 1] = 1.0
    assert torch.equal(cap.maps[0], want)


# --------------------------------------------------------------------------- score mods
def _half_q(model):
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for block in twin.transformer.h:
            block.attn.c_attn.weight[:, :E] *= 0.5
            block.attn.c_attn.bias[:E] *= 0.5
    return twin


def test_temperature_two_equals_softmax_of_halved_logits():
    model, ids = gpt2(), _ids(2, 10)
    plain = MapCapture(keep_logits=True)
    hot = MapCapture()
    with torch.no_grad():
        with attach(model, taps=[plain]):
            model(ids)
        with attach(model, taps=[hot], score_mods=[SCORE_MODS["temperature"](2.0)]):
            model(ids)
    # layer 0 sees the same input in both runs: probs = softmax(logits / 2) of the plain run
    want = torch.softmax(plain.logits[0] / 2, dim=-1)
    torch.testing.assert_close(hot.maps[0], want, atol=1e-6, rtol=0)
    assert (hot.maps[0] - plain.maps[0]).abs().amax() > 1e-2
    assert torch.all(hot.maps[0][..., ~_causal(10)] == 0)


def test_temperature_two_equals_eager_model_with_halved_queries():
    model, ids = gpt2(), _ids(2, 10)
    twin = _half_q(model)
    with torch.no_grad():
        ref = twin(ids, output_attentions=True)
        cap = MapCapture()
        with attach(model, taps=[cap], score_mods=[SCORE_MODS["temperature"](2.0)]):
            got = model(ids).logits
    for layer in (0, 1):
        torch.testing.assert_close(cap.maps[layer], ref.attentions[layer], atol=1e-5, rtol=0)
    torch.testing.assert_close(got, ref.logits, atol=1e-5, rtol=1e-5)


def test_temperature_on_one_layer_leaves_the_others():
    model, ids = gpt2(), _ids(2, 10)
    plain = MapCapture(keep_logits=True)
    hot = MapCapture()
    with torch.no_grad():
        with attach(model, taps=[plain], layers=[1]):
            model(ids)
        with attach(model, taps=[hot], layers=[1], score_mods=[SCORE_MODS["temperature"](2.0)]):
            model(ids)
    assert list(hot.maps) == [Site(1)]
    torch.testing.assert_close(hot.maps[1], torch.softmax(plain.logits[1] / 2, -1), atol=1e-6, rtol=0)


def test_soft_cap_and_clamp_bound_the_logits():
    model, ids = gpt2(), _ids(2, 10)
    plain = MapCapture(keep_logits=True)
    capped = MapCapture(keep_logits=True)
    clamped = MapCapture(keep_logits=True)
    with torch.no_grad():
        with attach(model, taps=[plain], layers=[0]):
            model(ids)
        with attach(model, taps=[capped], layers=[0], score_mods=[SCORE_MODS["soft_cap"](1.0)]):
            model(ids)
        with attach(model, taps=[clamped], layers=[0], score_mods=[SCORE_MODS["clamp"](0.5)]):
            model(ids)
    visible = _causal(10)
    base = plain.logits[0][..., visible]
    assert base.abs().amax() > 1.0  # the cap really bites
    torch.testing.assert_close(capped.logits[0][..., visible], torch.tanh(base), atol=1e-6, rtol=0)
    torch.testing.assert_close(clamped.logits[0][..., visible], base.clamp(-0.5, 0.5), atol=1e-6, rtol=0)
    torch.testing.assert_close(capped.maps[0], torch.softmax(capped.logits[0], -1), atol=1e-6, rtol=0)
    with pytest.raises(ValueError):
        SCORE_MODS["temperature"](0.0)
