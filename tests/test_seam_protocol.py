"""The protocol adapter: a hand-written module marked ``is_attnkit_attention`` that calls
``attnkit.seam.attention`` where it would call ``F.scaled_dot_product_attention``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from attnkit.seam.mods import PATTERNS
from attnkit.seam import MapCapture, Site, StatsCollector, attach, attention
from conftest import reference_probs

B, T, C, NH = 2, 7, 16, 4


class SelfAttention(nn.Module):
    """nanoGPT's CausalSelfAttention, with the SDPA call swapped for attnkit's."""

    is_attnkit_attention = True

    def __init__(self, layer_idx: int | None = None, kv_heads: int = NH) -> None:
        super().__init__()
        self.kv_heads = kv_heads
        hs = C // NH
        self.q = nn.Linear(C, C)
        self.kv = nn.Linear(C, 2 * kv_heads * hs)
        self.proj = nn.Linear(C, C)
        if layer_idx is not None:
            self.layer_idx = layer_idx
        self.last_qkv = None

    def qkv(self, x):
        hs = C // NH
        q = self.q(x).view(B, T, NH, hs).transpose(1, 2)
        k, v = self.kv(x).split(self.kv_heads * hs, dim=2)
        k = k.view(B, T, self.kv_heads, hs).transpose(1, 2)
        v = v.view(B, T, self.kv_heads, hs).transpose(1, 2)
        return q, k, v

    def forward(self, x, attn_mask=None, is_causal=True):
        q, k, v = self.qkv(x)
        self.last_qkv = (q.detach(), k.detach(), v.detach())
        y = attention(self, q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class TwoLayers(nn.Module):
    def __init__(self, kv_heads: int = NH) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([SelfAttention(kv_heads=kv_heads), SelfAttention(kv_heads=kv_heads)])

    def forward(self, x, **kw):
        for blk in self.blocks:
            x = x + blk(x, **kw)
        return x


def _model(kv_heads: int = NH, seed: int = 0) -> TwoLayers:
    torch.manual_seed(seed)
    m = TwoLayers(kv_heads)
    with torch.no_grad():
        for blk in m.blocks:
            blk.q.weight.mul_(4.0)
            blk.kv.weight.mul_(4.0)
    return m.eval()


def _x():
    return torch.randn(B, T, C, generator=torch.Generator().manual_seed(1))


def test_outside_a_session_it_is_sdpa():
    blk = _model().blocks[0]
    x = _x()
    q, k, v = blk.qkv(x)
    with torch.no_grad():
        got = attention(blk, q, k, v, is_causal=True)
        want = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        mask = torch.rand(B, 1, T, T, generator=torch.Generator().manual_seed(2)) > 0.3
        mask[..., torch.arange(T), torch.arange(T)] = True
        got_m = attention(blk, q, k, v, attn_mask=mask)
        want_m = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got_m, want_m, atol=1e-6, rtol=1e-6)


def test_inside_a_session_probs_are_causal_softmax_of_qk():
    model, x = _model(), _x()
    with torch.no_grad():
        plain = model(x)
        cap = MapCapture()
        with attach(model, taps=[cap]):
            seen = model(x)
    torch.testing.assert_close(seen, plain, atol=1e-5, rtol=1e-5)
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    assert sorted(site.layer for site in cap.maps) == [0, 1], "modules without layer_idx are numbered in call order"
    for layer, blk in enumerate(model.blocks):
        q, k, _ = blk.last_qkv
        want = reference_probs(q, k, causal)
        got = cap.maps[layer]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        assert torch.all(got[..., ~causal] == 0)
        assert got.amax() > 0.5


def test_grouped_kv_heads_and_bool_mask():
    model, x = _model(kv_heads=2), _x()
    pad = torch.ones(B, 1, 1, T, dtype=torch.bool)
    pad[1, ..., 5:] = False  # True = attend
    with torch.no_grad():
        plain = model(x, attn_mask=pad)
        cap = MapCapture()
        with attach(model, taps=[cap]):
            seen = model(x, attn_mask=pad)
    torch.testing.assert_close(seen, plain, atol=1e-5, rtol=1e-5)
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for layer, blk in enumerate(model.blocks):
        q, k, _ = blk.last_qkv
        want = reference_probs(q, k.repeat_interleave(2, dim=1), causal & pad)
        torch.testing.assert_close(cap.maps[layer], want, atol=1e-5, rtol=0)
        assert torch.all(cap.maps[layer][1, :, :, 5:] == 0)


def test_layer_idx_is_used_when_present_and_pattern_replaces_output():
    torch.manual_seed(0)
    blk = SelfAttention(layer_idx=7).eval()
    x = _x()
    stats = StatsCollector()
    with torch.no_grad():
        with attach(blk, taps=[stats]):
            blk(x)
        with attach(blk, **PATTERNS["uniform"]):
            y = blk(x)
        _, _, v = blk.last_qkv
        # uniform causal attention = running mean of the values
        mean_v = v.cumsum(2) / torch.arange(1, T + 1).view(1, 1, T, 1)
        want = blk.proj(mean_v.transpose(1, 2).reshape(B, T, C))
    assert list(stats.layers) == [Site(7)]
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    # the session is gone after the block: plain SDPA again
    with torch.no_grad():
        q, k, v = blk.qkv(x)
        torch.testing.assert_close(attention(blk, q, k, v, is_causal=True),
                                   F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-6, rtol=1e-6)
