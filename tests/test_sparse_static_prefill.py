"""A prompt into a preallocated cache (Hugging Face's StaticCache) under ``sparse_attention``.

The model then hands attention every slot of the cache and its own mask: causal over the written
keys, the unwritten slots hidden. Such a call runs on the written keys alone, without the mask, so
the SDPA kernels take it; any other mask (left padding, a sliding window) reaches the kernel as it
is. By category: multi-head (GPT-2) and grouped-query (Llama) models, a prompt then a few decoding
steps; references: the portable kernel forced on the same calls, and the same generation with a
DynamicCache (whose prompt carries no mask); padded and windowed prompts against dense generation.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers import StaticCache

from attnkit.seam import AttentionSession, attach
from attnkit.seam.call import causal_allowed
from attnkit.seam.kernels import paged_cpu
from attnkit.seam.kernels.block_kernels import BlockCall, choose_block_kernel
from attnkit.seam.taps import Tap
from attnkit.sparse import SparseConfig, dense_reference, sparse_attention
from attnkit.sparse.attention import _causal_prefix
from conftest import VOCAB, gpt2, llama, mistral
from sparse_helpers import random_qkv, random_selection

MODELS = {"gpt2-mha": gpt2, "llama-gqa": llama}
BS = 4
STEPS = 4
DECODE_KERNEL = "paged_cpu" if paged_cpu.load() is not None else "paged_decode"


def _cache(model, cache) -> dict:
    """``cache`` as the keyword this transformers takes it by: ``cache`` from 5.2x on (the old name
    warns there), ``past_key_values`` before (where ``cache=`` would be ignored)."""
    import inspect

    return {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}


def _generate(model, ids, cfg, cache, attention_mask=None, steps=STEPS):
    """(tokens, logits (B, steps, V), the kernels' call counts) of greedy generation under ``cfg``
    (dense where None) with Hugging Face's ``cache`` implementation ("static" or "dynamic")."""
    kwargs = dict(attention_mask=attention_mask, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                  pad_token_id=2, output_logits=True, return_dict_in_generate=True, cache_implementation=cache)
    with torch.no_grad():
        if cfg is None:
            out, kernels = model.generate(ids, **kwargs), {}
        else:
            with sparse_attention(model, cfg) as handle:
                out = model.generate(ids, **kwargs)
            kernels = dict(handle.kernels)
    return out.sequences, torch.stack(out.logits, 1), kernels


@pytest.mark.parametrize("pattern", ["moba", "quest"])
@pytest.mark.parametrize("name", MODELS)
def test_static_prompt_runs_on_the_sdpa_kernel(name, pattern):
    model = MODELS[name]("sdpa")
    layers = model.config.num_hidden_layers
    ids = torch.randint(3, VOCAB, (1, 23), generator=torch.Generator().manual_seed(0))
    cfg = SparseConfig(pattern=pattern, density=0.5, block_size=BS)
    tokens, logits, kernels = _generate(model, ids, cfg, "static")
    assert kernels == {"split_sdpa": layers, DECODE_KERNEL: (STEPS - 1) * layers}
    # the same selections on the portable kernel (the model's mask over every slot would go there too)
    p_tokens, p_logits, p_kernels = _generate(model, ids, replace(cfg, kernel="portable"), "static")
    assert p_kernels == {"portable": STEPS * layers}
    assert torch.equal(tokens, p_tokens)
    assert (logits - p_logits).abs().max() < 1e-5
    # a DynamicCache's prompt has no unwritten slots and no mask: the same selection, the same logits
    d_tokens, d_logits, d_kernels = _generate(model, ids, cfg, "dynamic")
    assert d_kernels == kernels
    assert torch.equal(tokens, d_tokens)
    assert (logits - d_logits).abs().max() < 1e-5


@pytest.mark.parametrize("given_mask", [False, True], ids=["no_mask", "model_mask"])
def test_a_prompt_mask_is_shared_by_the_layers_and_dies_with_the_forward(given_mask):
    """The layers of one prompt forward share its (Q, K) mask and what is derived from it (one check
    a forward); once the forward returns, the session keeps neither (it would hold Q x K bytes)."""
    import gc
    import weakref

    from attnkit.sparse import attention as sparse_module

    model = llama("sdpa")
    ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(3))
    cfg = SparseConfig(pattern="quest", density=0.5, block_size=BS)
    checks, seen = [], []
    real = sparse_module._causal_prefix
    with torch.no_grad(), sparse_attention(model, cfg) as handle:
        sparse_module._causal_prefix = lambda allowed, K, Q: (checks.append(1), seen.append(weakref.ref(allowed)),
                                                              real(allowed, K, Q))[-1]
        try:
            cache = StaticCache(config=model.config, max_cache_len=40)
            mask = torch.ones(1, 12, dtype=torch.long) if given_mask else None
            model(ids, attention_mask=mask, use_cache=True, **_cache(model, cache))
        finally:
            sparse_module._causal_prefix = real
        assert dict(handle.kernels) == {"split_sdpa": model.config.num_hidden_layers}
        assert len(checks) == 1  # one check for the forward, shared by its layers
        gc.collect()
        assert seen[0]() is None  # the forward's mask is gone while the session is still open


def test_static_cache_passed_in_and_a_second_prompt_chunk():
    """A StaticCache object given to the model, filled by two prompt chunks: the second chunk's
    queries follow the first's keys, causal over both, the rest of the cache hidden."""
    model = llama("sdpa")
    ids = torch.randint(3, VOCAB, (1, 24), generator=torch.Generator().manual_seed(2))
    cfg = SparseConfig(pattern="quest", density=0.5, block_size=BS)
    logits = {}
    for kernel in ("auto", "portable"):
        cache = StaticCache(config=model.config, max_cache_len=40)
        with torch.no_grad(), sparse_attention(model, replace(cfg, kernel=kernel)) as handle:
            first = model(ids[:, :12], use_cache=True, **_cache(model, cache)).logits
            second = model(ids[:, 12:], use_cache=True, **_cache(model, cache)).logits
        logits[kernel] = torch.cat([first, second], 1)
        if kernel == "auto":
            assert dict(handle.kernels) == {"split_sdpa": 2 * model.config.num_hidden_layers}
    with torch.no_grad(), sparse_attention(model, cfg):
        dynamic = model(ids, use_cache=False).logits
    assert (logits["auto"] - logits["portable"]).abs().max() < 1e-5
    # chunks of whole blocks: every query block keeps what it keeps in the whole prompt at once
    assert (logits["auto"] - dynamic).abs().max() < 1e-5


@pytest.mark.parametrize("name, make, padded", [("llama-left-padded", llama, True), ("gpt2-left-padded", gpt2, True),
                                                ("mistral-window", mistral, False)])
def test_other_masks_keep_their_kernel(name, make, padded):
    """Left padding or a sliding window: the model's mask reaches a kernel that applies it. At
    density 1 that is dense generation, token for token."""
    model = make("sdpa")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 19), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        ids[1, :6], mask[1, :6] = 2, 0
    cfg = SparseConfig(pattern="moba", density=1.0, block_size=BS)
    tokens, logits, _ = _generate(model, ids, None, "static", mask)
    s_tokens, s_logits, kernels = _generate(model, ids, cfg, "static", mask)
    assert torch.equal(tokens, s_tokens)
    assert (logits - s_logits).abs().max() < 1e-5
    assert kernels.get("split_sdpa", 0) == kernels.get("gather_sdpa", 0) == 0
    assert kernels["portable"] == model.config.num_hidden_layers  # the prompt


def _mask(kind: str, Q: int = 8, end: int = 11, K: int = 16) -> torch.Tensor:
    """(B, 1, Q, K) bool: a prompt's mask of each kind over a preallocated cache of K slots."""
    m = torch.zeros(2, 1, Q, K, dtype=torch.bool)
    m[..., :end] = causal_allowed(Q, end, m.device)
    if kind == "padding":
        m[1, ..., :2] = False
    elif kind == "window":  # each query sees its own key and the 2 before it
        position = torch.arange(Q)[:, None] + end - Q
        m[..., :end] &= torch.arange(end)[None, :] > position - 3
    elif kind == "one-row-differs":
        m[0, 0, 3, 0] = False
    elif kind == "a-slot-after-shown":
        m[0, 0, -1, end + 2] = True
    elif kind == "no-unwritten-slot":
        m = m[..., :end]
    return m


@pytest.mark.parametrize("kind", ["padding", "window", "one-row-differs", "a-slot-after-shown", "no-unwritten-slot"])
def test_only_the_causal_written_prefix_is_cut(kind):
    assert _causal_prefix(_mask("causal"), 16, 8) == 11
    assert _causal_prefix(_mask("causal")[:1], 16, 8) == 11  # one mask for the batch
    assert _causal_prefix(_mask("causal")[0, 0], 16, 8) == 11  # (Q, K): no batch and head dimensions
    mask = _mask(kind)
    assert _causal_prefix(mask, mask.shape[-1], 8) is None


# (B, H, Hkv, written keys = queries, cache slots, block)
BUFFERS = {
    "gqa-slots-whole-blocks": (2, 4, 2, 24, 40, 4),  # gathered in place from the buffer
    "mha-slots-not-whole-blocks": (2, 3, 3, 24, 37, 4),  # gathered from a copy
    "gqa-written-partial-block": (1, 4, 2, 22, 32, 4),  # padded to whole blocks
}


@pytest.mark.parametrize("kernel", ["split_sdpa", "gather_sdpa"])
@pytest.mark.parametrize("shape", BUFFERS)
def test_kernels_read_the_written_prefix_of_a_longer_buffer(kernel, shape):
    """Keys and values as a StaticCache hands them over once cut to the written slots: the first
    T slots of a longer (B, Hkv, slots, D) buffer, a strided view. Forward and backward in float64
    against dense attention restricted to the kept blocks."""
    B, H, Hk, T, slots, bs = BUFFERS[shape]
    D = 5
    sel, _ = random_selection(B, Hk, T, bs, 0.4, seed=2, causal=True, Q=T)
    q, k, v = random_qkv(B, H, Hk, T, T, D)
    k_buffer = torch.randn(B, Hk, slots, D, dtype=torch.float64)
    v_buffer = torch.randn(B, Hk, slots, D, dtype=torch.float64)
    with torch.no_grad():
        k_buffer[:, :, :T], v_buffer[:, :, :T] = k, v
    k_buffer.requires_grad_(True), v_buffer.requires_grad_(True)
    call = BlockCall(q, k_buffer[:, :, :T], v_buffer[:, :, :T], sel, D ** -0.5)
    assert choose_block_kernel(call, kernel).name == kernel
    out = choose_block_kernel(call, kernel).run(call)
    ref = dense_reference(q, k, v, sel.block_mask(), sel.geometry, scale=D ** -0.5)
    assert torch.allclose(out, ref, atol=1e-12)
    w = torch.randn_like(out)
    got = torch.autograd.grad((out * w).sum(), (q, k_buffer, v_buffer))
    want = torch.autograd.grad((ref * w).sum(), (q, k, v))
    assert torch.allclose(got[0], want[0], atol=1e-12)
    for g, r in zip(got[1:], want[1:]):
        assert torch.allclose(g[:, :, :T], r, atol=1e-12) and not g[:, :, T:].any()


class _Masks(Tap):
    """Each call's mask (True = may attend), as the seam hands it to sessions."""

    wants_call, wants_chunks = True, False

    def __init__(self) -> None:
        self.masks: list[torch.Tensor | None] = []

    def on_call(self, call) -> None:
        self.masks.append(call.allowed)


def test_prompt_into_a_static_cache_without_a_mask_is_top_left_causal():
    """Without the model's mask the adapter hides the unwritten slots itself: one (1, 1, Q, K)
    top-left causal mask, shared by the layers (what the written-keys cut is decided on once per
    forward), and the model's own output through the seam."""
    model = llama("sdpa")
    ids = torch.randint(3, VOCAB, (1, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = model(ids, use_cache=True, **_cache(model, StaticCache(config=model.config, max_cache_len=20))).logits
        tap = _Masks()
        with attach(model, AttentionSession(taps=[tap])):
            got = model(ids, use_cache=True, **_cache(model, StaticCache(config=model.config, max_cache_len=20))).logits
    assert (got - want).abs().max() < 1e-5
    assert len(tap.masks) == model.config.num_hidden_layers and all(m is tap.masks[0] for m in tap.masks)
    assert torch.equal(tap.masks[0], torch.ones(1, 1, 12, 20, dtype=torch.bool).tril())
