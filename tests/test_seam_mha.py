"""nn.MultiheadAttention adapter, alone and inside nn.TransformerEncoder(Layer).

The reference is PyTorch's own ``need_weights=True, average_attn_weights=False`` of the class
forward, called outside any session.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attnkit.seam.mods import PATTERNS
from attnkit.seam import MapCapture, StatsCollector, attach
from conftest import causal_block, encoder, mha

N, L, E = 2, 6, 16


def _x(seed: int = 1) -> torch.Tensor:
    return torch.randn(N, L, E, generator=torch.Generator().manual_seed(seed))


def _padding() -> torch.Tensor:
    kpm = torch.zeros(N, L, dtype=torch.bool)
    kpm[1, 4:] = True  # True = padding key
    return kpm


def _ref_weights(m: nn.MultiheadAttention, x, **masks):
    with torch.no_grad():
        return type(m).forward(m, x, x, x, need_weights=True, average_attn_weights=False, **masks)


@pytest.mark.parametrize(
    "masks",
    [{}, {"attn_mask": "causal"}, {"key_padding_mask": "pad"}, {"attn_mask": "causal", "key_padding_mask": "pad"},
     {"attn_mask": "float"}],
    ids=["none", "causal", "padding", "causal+padding", "float_mask"],
)
def test_probs_equal_need_weights(masks):
    m, x = mha(), _x()
    table = {
        "causal": causal_block(L),
        "pad": _padding(),
        "float": torch.randn(L, L, generator=torch.Generator().manual_seed(3)),
    }
    kw = {k: table[v] for k, v in masks.items()}
    out_ref, w_ref = _ref_weights(m, x, **kw)
    cap = MapCapture()
    with torch.no_grad(), attach(m, taps=[cap]):
        out, w = m(x, x, x, need_weights=True, average_attn_weights=False, **kw)
        out_fast, w_none = m(x, x, x, need_weights=False, **kw)
        _, w_avg = m(x, x, x, need_weights=True, **kw)
    assert w_ref.amax() > 0.5  # peaked: a uniform map would not pass by accident
    torch.testing.assert_close(cap.maps[0], w_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(w, w_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(w_avg, w_ref.mean(1), atol=1e-5, rtol=0)
    assert w_none is None
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_fast, out_ref, atol=1e-5, rtol=1e-5)
    if "attn_mask" in masks and masks["attn_mask"] == "causal":
        assert torch.all(cap.maps[0][..., causal_block(L)] == 0)
    if "key_padding_mask" in masks:
        assert torch.all(cap.maps[0][1, :, :, 4:] == 0)
    torch.testing.assert_close(cap.maps[0].sum(-1), torch.ones(N, 4, L), atol=1e-6, rtol=0)


def test_sequence_first_and_unbatched_layouts():
    m = mha(batch_first=False)
    x = _x().transpose(0, 1)  # (L, N, E)
    out_ref, w_ref = _ref_weights(m, x, attn_mask=causal_block(L))
    cap = MapCapture()
    with torch.no_grad(), attach(m, taps=[cap]):
        out, w = m(x, x, x, attn_mask=causal_block(L), need_weights=True, average_attn_weights=False)
        out1, w1 = m(x[:, 0], x[:, 0], x[:, 0], attn_mask=causal_block(L), need_weights=True,
                     average_attn_weights=False)
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w, w_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(out1, out_ref[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w1, w_ref[0], atol=1e-5, rtol=0)


def test_need_weights_with_head_selection_returns_every_head():
    """A caller asking for weights gets all heads, even when the session observes a subset."""
    m, x = mha(), _x()
    _, w_ref = _ref_weights(m, x, attn_mask=causal_block(L))
    cap = MapCapture()
    with torch.no_grad(), attach(m, taps=[cap], heads=[0, 2]):
        _, w = m(x, x, x, attn_mask=causal_block(L), need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(cap.maps[0], w_ref[:, [0, 2]], atol=1e-5, rtol=0)
    torch.testing.assert_close(w, w_ref, atol=1e-5, rtol=0)


def test_head_selection_with_per_head_mask():
    """A 3-D attn_mask (N*H, L, S) differs per head; selecting heads must select its heads too."""
    m, x = mha(), _x()
    g = torch.Generator().manual_seed(5)
    mask3 = torch.rand(N * 4, L, L, generator=g) < 0.3
    mask3[:, torch.arange(L), torch.arange(L)] = False  # every row sees at least itself
    _, w_ref = _ref_weights(m, x, attn_mask=mask3)
    cap = MapCapture()
    with torch.no_grad(), attach(m, taps=[cap], heads=[1, 3]):
        m(x, x, x, attn_mask=mask3, need_weights=False)
    torch.testing.assert_close(cap.maps[0], w_ref[:, [1, 3]], atol=1e-5, rtol=0)
    assert torch.all(cap.maps[0][mask3.view(N, 4, L, L)[:, [1, 3]]] == 0)


def test_fast_path_is_taken_without_the_seam():
    """Precondition of the next test: in eval + no_grad the encoder layer skips self_attn.forward."""
    enc = encoder(layers=1)
    calls = []
    sa = enc.layers[0].self_attn
    sa.forward = lambda *a, **k: (calls.append(1), type(sa).forward(sa, *a, **k))[1]
    try:
        with torch.no_grad():
            enc(_x())
    finally:
        del sa.forward
    assert calls == [], "fused fast path not taken: the encoder tests below would prove nothing"


def _encoder_reference(enc: nn.TransformerEncoder, x, src_mask, kpm):
    """Per-layer probabilities from the class forward of each self_attn, layer by layer."""
    maps, h = [], x
    before = torch.backends.mha.get_fastpath_enabled()
    with torch.no_grad():
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            for lyr in enc.layers:
                _, w = type(lyr.self_attn).forward(lyr.self_attn, h, h, h, attn_mask=src_mask, key_padding_mask=kpm,
                                                   need_weights=True, average_attn_weights=False)
                maps.append(w)
                h = lyr(h, src_mask=src_mask, src_key_padding_mask=kpm)
        finally:
            torch.backends.mha.set_fastpath_enabled(before)
    return maps, h


def test_transformer_encoder_eval_no_grad_causal_and_padding():
    enc, x = encoder(), _x()
    causal, kpm = causal_block(L), _padding()
    ref_maps, ref_out = _encoder_reference(enc, x, causal, kpm)
    with torch.no_grad():
        plain = enc(x, mask=causal, src_key_padding_mask=kpm, is_causal=True)  # fast path allowed
    cap = MapCapture()
    with torch.no_grad(), attach(enc, taps=[cap]):
        assert torch.backends.mha.get_fastpath_enabled() is False
        out = enc(x, mask=causal, src_key_padding_mask=kpm, is_causal=True)
    assert sorted(site.layer for site in cap.maps) == [0, 1], "both layers' attention must be seen despite the fast path"
    for layer in (0, 1):
        got = cap.maps[layer]
        torch.testing.assert_close(got, ref_maps[layer], atol=1e-5, rtol=0)
        assert torch.all(got[..., causal] == 0)
        assert torch.all(got[1, :, :, 4:] == 0)
        torch.testing.assert_close(got.sum(-1), torch.ones(N, 4, L), atol=1e-6, rtol=0)
    real = ~kpm
    torch.testing.assert_close(out[real], plain[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[real], ref_out[real], atol=1e-5, rtol=1e-5)


def test_single_encoder_layer_and_pattern_changes_output():
    lyr = encoder(layers=1).layers[0]
    x = _x()
    with torch.no_grad():
        plain = lyr(x)
        cap = MapCapture()
        with attach(lyr, taps=[cap]):
            same = lyr(x)
        with attach(lyr, **PATTERNS["uniform"]):
            uni = lyr(x)
    torch.testing.assert_close(same, plain, atol=1e-5, rtol=1e-5)
    assert cap.maps[0].shape == (N, 4, L, L)
    assert (uni - plain).abs().amax() > 1e-3, "a uniform pattern must change the layer's output"


def test_layer_numbers_follow_module_order():
    enc = encoder(layers=3)
    stats = StatsCollector()
    with torch.no_grad(), attach(enc, taps=[stats], layers=[2]):
        enc(_x())
    assert [site.layer for site in stats.layers] == [2]
    assert stats.heads()[0]["rows"] == N * L
