"""Kernels and modifiers: one function, the same answer densely and in FlexAttention; the kernel
registry picks the fast path whenever nothing needs more."""

from __future__ import annotations

import warnings

import pytest
import torch

from attnkit.seam import kernels
from attnkit.seam.mods.mask import MASK_MODS, and_masks, causal, local_window, or_masks, sink_window
from attnkit.seam.mods import PATTERNS, SCORE_MODS, soft_cap, temperature
from attnkit.seam import Mods, Site, attach, build_call
from conftest import _ids, gpt2

MOD_CASES = {
    "temperature": {"score_mods": [SCORE_MODS["temperature"](2.0)]},
    "soft_cap": {"score_mods": [SCORE_MODS["soft_cap"](0.7)]},
    "clamp": {"score_mods": [SCORE_MODS["clamp"](0.5)]},
    "local_window": {"mask_mods": [MASK_MODS["local_window"](3)]},
    "sink_window": {"mask_mods": [MASK_MODS["sink_window"](2, 3)]},
    **{f"pattern-{name}": mods for name, mods in PATTERNS.items()},
    "composed": {"score_mods": [soft_cap(0.7), temperature(0.5)], "mask_mods": [or_masks(local_window(2), sink_window(1, 0))]},
}


@pytest.mark.parametrize("name", sorted(MOD_CASES))
def test_dense_and_flex_kernels_agree_on_every_modifier(name):
    model, ids = gpt2(attn="sdpa"), _ids(2, 12)
    mods = MOD_CASES[name]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex on CPU without torch.compile warns about speed
        plain = model(ids).logits
        with attach(model, **mods, kernel="dense"):
            dense = model(ids).logits
        with attach(model, **mods, kernel="flex"):
            flex = model(ids).logits
    assert (dense - plain).abs().amax() > 1e-4, "the modifier must change the model"
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)


def _call(**kw):
    q, k, v = (torch.randn(1, 2, 5, 4, generator=torch.Generator().manual_seed(i)) for i in range(3))
    return build_call(torch.nn.Linear(1, 1), Site(0), q, k, v, native=lambda scale: q * scale, **kw)


def test_registry_takes_the_fast_path_unless_a_modifier_needs_more():
    assert kernels.choose(_call(is_causal=True), Mods()).name == "native"
    assert kernels.choose(_call(is_causal=True), Mods((temperature(2.0),))).name == "native"  # folds into the scale
    assert kernels.choose(_call(is_causal=True), Mods((soft_cap(1.0),))).name == "dense"
    assert kernels.choose(_call(is_causal=True), Mods((), (local_window(2),))).name == "dense"
    # a model soft-cap of its own: a temperature after it is no rescaling of the raw logits
    assert kernels.choose(_call(softcap=5.0), Mods((temperature(2.0),))).name == "dense"
    assert Mods((temperature(2.0), temperature(4.0))).scale_factor == pytest.approx(1 / 8)


def test_a_temperature_runs_on_the_native_kernel_and_equals_the_dense_one():
    model, ids = gpt2(attn="sdpa"), _ids(2, 12)
    with torch.no_grad():
        with attach(model, score_mods=[temperature(2.0)]):
            native = model(ids).logits
        with attach(model, score_mods=[temperature(2.0)], kernel="dense"):
            dense = model(ids).logits
        plain = model(ids).logits
    assert (native - plain).abs().amax() > 1e-3
    torch.testing.assert_close(native, dense, atol=1e-5, rtol=1e-5)


def test_flex_refuses_cpu_training_with_a_clear_error():
    model, ids = gpt2(attn="sdpa").train(), _ids(2, 8)
    with pytest.raises(ValueError, match="flex kernel cannot run"):
        with attach(model, score_mods=[soft_cap(1.0)], kernel="flex"):
            model(ids)
    with pytest.raises(ValueError, match="no attention kernel 'fast'"):
        with attach(model, score_mods=[soft_cap(1.0)], kernel="fast"):
            model(ids)
    assert model.config._attn_implementation == "sdpa"


def test_mask_combinators_on_a_dense_grid():
    b, h = torch.zeros(1, 1, 1, 1, dtype=torch.long), torch.zeros(1, 1, 1, 1, dtype=torch.long)
    q, kv = torch.arange(6).view(1, 1, 6, 1), torch.arange(6).view(1, 1, 1, 6)
    tri = torch.tril(torch.ones(6, 6, dtype=torch.bool))
    band = (torch.arange(6)[:, None] - torch.arange(6)[None, :]).abs() <= 1
    assert torch.equal(causal(b, h, q, kv)[0, 0], tri)
    assert torch.equal(and_masks(causal, local_window(1))(b, h, q, kv)[0, 0], tri & band)
    first = torch.zeros(6, 6, dtype=torch.bool)
    first[:, 0] = True
    assert torch.equal(or_masks(local_window(1), sink_window(1, 0))(b, h, q, kv)[0, 0], band | first)
    with pytest.raises(ValueError):
        and_masks()
