"""The seam's contract: the model leaves the ``with`` block exactly as it entered, also on errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attnkit.errors import UserError
from attnkit.seam import MapCapture, NoAttentionError, Tap, attach
from conftest import _ids, encoder, gpt2, llama, mha


class Boom(Tap):
    def observe(self, chunk):
        raise RuntimeError("observer failed")


def _mha_state(model: nn.Module):
    return [("forward" in m.__dict__, m.__dict__.get("forward")) for m in model.modules()
            if isinstance(m, nn.MultiheadAttention)]


def _training_flags(model: nn.Module):
    return [m.training for m in model.modules()]


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("how", ["normal", "observer_raises", "bad_input", "body_raises"])
def test_hf_attn_implementation_restored(impl, how):
    model = gpt2(impl)
    model.transformer.h[1].train()  # a mixed training state must survive too
    flags = _training_flags(model)
    ids = _ids(1, 6)
    observers = [Boom()] if how == "observer_raises" else [MapCapture()]
    if how == "normal":
        with torch.no_grad(), attach(model, taps=observers):
            assert model.config._attn_implementation == "attnkit"
            model(ids)
    else:
        with pytest.raises((RuntimeError, IndexError, ValueError)):
            with torch.no_grad(), attach(model, taps=observers):
                if how == "bad_input":
                    model(torch.tensor([[10_000]]))  # id beyond the vocabulary
                elif how == "body_raises":
                    raise ValueError("user code failed")
                else:
                    model(ids)
    assert model.config._attn_implementation == impl
    for block in model.transformer.h:
        assert block.attn.config._attn_implementation == impl
    assert _training_flags(model) == flags
    # and the model still works as before: eager gives weights again, sdpa gives none
    model.eval()
    with torch.no_grad():
        out = model(ids, output_attentions=True)
    if impl == "eager":
        assert out.attentions[0] is not None and out.attentions[0].shape == (1, 4, 6, 6)


def test_hf_sessions_detached_after_block():
    """A model left on the attnkit function (someone else switched it) falls back to SDPA, unobserved."""
    model = gpt2("sdpa")
    cap = MapCapture()
    ids = _ids(1, 6)
    with torch.no_grad():
        with attach(model, taps=[cap]):
            model(ids)
        cap.maps.clear()
        plain = model(ids).logits
        model.set_attn_implementation("attnkit")
        try:
            again = model(ids).logits
        finally:
            model.set_attn_implementation("sdpa")
    assert cap.maps == {}
    torch.testing.assert_close(again, plain, atol=1e-5, rtol=1e-5)


def test_llama_restored_after_error():
    model = llama("sdpa").train()
    with pytest.raises(RuntimeError):
        with attach(model, taps=[Boom()]):
            model(_ids(1, 5))
    assert model.config._attn_implementation == "sdpa"
    assert model.training and all(m.training for m in model.modules())


@pytest.mark.parametrize("fastpath", [True, False])
@pytest.mark.parametrize("how", ["normal", "observer_raises", "bad_input"])
def test_mha_forward_fastpath_and_mode_restored(fastpath, how):
    enc = encoder()
    enc.layers[0].train()
    flags = _training_flags(enc)
    x = torch.randn(2, 5, 16)
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(fastpath)
    try:
        observers = [Boom()] if how == "observer_raises" else [MapCapture()]
        if how == "normal":
            with torch.no_grad(), attach(enc, taps=observers):
                assert all(state[0] for state in _mha_state(enc)), "the adapter wraps every MultiheadAttention"
                assert torch.backends.mha.get_fastpath_enabled() is False
                enc(x)
        else:
            with pytest.raises((RuntimeError, AssertionError)):
                with torch.no_grad(), attach(enc, taps=observers):
                    enc(x if how == "observer_raises" else torch.randn(2, 5, 7))  # wrong width
        assert torch.backends.mha.get_fastpath_enabled() is fastpath
    finally:
        torch.backends.mha.set_fastpath_enabled(before)
    assert _mha_state(enc) == [(False, None), (False, None)], "no instance forward may be left behind"
    assert _training_flags(enc) == flags


def test_mha_own_instance_forward_is_put_back():
    m = mha()
    marker = []

    def own_forward(*args, **kwargs):
        marker.append(1)
        return type(m).forward(m, *args, **kwargs)

    m.forward = own_forward
    x = torch.randn(1, 3, 16)
    with torch.no_grad(), attach(m, taps=[MapCapture()]):
        assert m.__dict__["forward"] is not own_forward
        m(x, x, x)
    assert m.__dict__["forward"] is own_forward
    m(x, x, x)
    assert marker == [1]


def test_no_attention_is_a_user_error():
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(NoAttentionError) as info:
        with attach(model, taps=[MapCapture()]):
            pass
    assert isinstance(info.value, UserError)
    assert "Sequential" in str(info.value)
    assert torch.backends.mha.get_fastpath_enabled() is True


def test_mixed_model_hf_and_mha_restored_together():
    """Two adapters in one model: both undo their change when the forward fails."""

    class Both(nn.Module):
        def __init__(self):
            super().__init__()
            self.lm = gpt2("sdpa")
            self.extra = mha()

        def forward(self, ids):
            h = self.lm(ids, output_hidden_states=True).hidden_states[-1]
            h = h[..., :16]
            return self.extra(h, h, h)[0]

    model = Both()
    cap = MapCapture()
    with torch.no_grad(), attach(model, taps=[cap]):
        model(_ids(1, 4))
    assert model.lm.config._attn_implementation == "sdpa"
    assert "forward" not in model.extra.__dict__
    with pytest.raises(RuntimeError):
        with torch.no_grad(), attach(model, taps=[Boom()]):
            model(_ids(1, 4))
    assert model.lm.config._attn_implementation == "sdpa"
    assert "forward" not in model.extra.__dict__
