"""Every block-sparse kernel of the registry against dense attention restricted to the kept blocks.

By category: causal / bidirectional, grouped-query / multi-head, block counts with a partial last
block, densities 0.125 to 1, a KV-cache offset (queries at the end of the keys, not aligned to
blocks, a single decoding query); forward and backward in float64 against ``dense_reference``,
density 1 against plain SDPA. Then the registry's decision: which kernel runs which call, and
through ``sparse_attention`` on a model the default CPU kernel equals the portable reference.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnkit.seam.kernels import paged_cpu
from attnkit.seam.kernels.block_kernels import BLOCK_KERNELS, BlockCall, choose_block_kernel
from attnkit.sparse import BlockGeometry, dense_reference, select_blocks
from sparse_helpers import random_qkv as _qkv, random_selection

CPU_KERNELS = ["split_sdpa", "gather_sdpa", "portable"]  # flex needs torch.compile and has no CPU backward


def _takes(kernel, geo) -> bool:
    """Whether ``kernel`` runs calls of this geometry (split_sdpa: causal, several query blocks)."""
    return kernel != "split_sdpa" or (geo.causal and geo.n_query_blocks > 1)


def _selection(B, Hk, Q, T, bs, density, causal, seed=0):
    return random_selection(B, Hk, T, bs, density, seed=seed, causal=causal, Q=Q)


def _run(name, q, k, v, sel, scale, **extras):
    call = BlockCall(q, k, v, sel, scale, **extras)
    kernel = choose_block_kernel(call, name)
    assert kernel.name == name
    return kernel.run(call)


# (B, H, Hkv, Q, T, block): MHA and GQA, block counts with a partial last block, a KV cache
SHAPES = {
    "mha-ragged": (2, 3, 3, 37, 37, 4),
    "gqa-ragged": (1, 4, 2, 45, 45, 8),
    "gqa-aligned": (2, 4, 1, 32, 32, 4),
    "mqa-one-block": (1, 2, 1, 5, 5, 8),
    "gqa-kv-cache": (1, 4, 2, 9, 30, 4),
    "mha-kv-cache-one-block": (2, 2, 2, 3, 23, 8),
    "gqa-decode": (1, 4, 2, 1, 27, 4),
}


# every shape causal; bidirectional too where there is no KV cache (a KV cache is causal)
CATEGORIES = [pytest.param(shape, causal, id=f"{shape}-{'causal' if causal else 'bidirectional'}")
              for shape in sorted(SHAPES) for causal in (True, False) if causal or SHAPES[shape][3] == SHAPES[shape][4]]


@pytest.mark.parametrize("kernel", CPU_KERNELS)
@pytest.mark.parametrize("density", [0.125, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("shape,causal", CATEGORIES)
def test_equals_restricted_dense_forward_and_backward(kernel, density, shape, causal):
    B, H, Hk, Q, T, bs = SHAPES[shape]
    D = 5
    sel, geo = _selection(B, Hk, Q, T, bs, density, causal)
    q, k, v = _qkv(B, H, Hk, Q, T, D)
    if not _takes(kernel, geo):  # refused with a clear error, and auto runs the call elsewhere
        with pytest.raises(ValueError, match=f"the {kernel} block-sparse kernel cannot run"):
            choose_block_kernel(BlockCall(q, k, v, sel, D ** -0.5), kernel)
        return
    out = _run(kernel, q, k, v, sel, D ** -0.5)
    ref = dense_reference(q, k, v, sel.block_mask(), geo, scale=D ** -0.5)
    assert out.shape == ref.shape and out.dtype == torch.float64
    assert torch.allclose(out, ref, atol=1e-12)
    w = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad((out * w).sum(), (q, k, v)), torch.autograd.grad((ref * w).sum(), (q, k, v))):
        assert torch.allclose(a, b, atol=1e-12)


@pytest.mark.parametrize("kernel", CPU_KERNELS)
def test_gradcheck(kernel):
    B, H, Hk, T, bs, D = 1, 4, 2, 19, 4, 3
    sel, geo = _selection(B, Hk, T, T, bs, 0.4, causal=True)
    q, k, v = _qkv(B, H, Hk, T, T, D)
    assert torch.autograd.gradcheck(lambda q, k, v: _run(kernel, q, k, v, sel, 0.6), (q, k, v), fast_mode=True)


@pytest.mark.parametrize("kernel,causal", [(k, c) for k in CPU_KERNELS for c in (True, False)
                                           if k != "split_sdpa" or c])  # split_sdpa: causal calls only
@pytest.mark.parametrize("H,Hk", [(4, 2), (3, 3)], ids=["gqa", "mha"])
def test_density_one_is_plain_sdpa(kernel, causal, H, Hk):
    B, T, bs, D = 2, 29, 8, 8
    sel, geo = _selection(B, Hk, T, T, bs, 1.0, causal)
    q, k, v = _qkv(B, H, Hk, T, T, D, dtype=torch.float32)
    out = _run(kernel, q, k, v, sel, D ** -0.5)
    G = H // Hk
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), is_causal=causal)
    assert (out - ref).abs().max() < 1e-5
    w = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad((out * w).sum(), (q, k, v)), torch.autograd.grad((ref * w).sum(), (q, k, v))):
        assert (a - b).abs().max() < 1e-4


@pytest.mark.parametrize("kernel,causal", [("split_sdpa", True), ("gather_sdpa", True), ("gather_sdpa", False)])
def test_gate_term_without_gradient(kernel, causal):
    """A trained gate at inference: its log-probability of each kept block on that block's scores."""
    B, H, Hk, T, bs, D = 2, 4, 2, 26, 4, 3
    sel, geo = _selection(B, Hk, T, T, bs, 0.5, causal)
    q, k, v = _qkv(B, H, Hk, T, T, D)
    g = torch.Generator().manual_seed(3)
    gate = torch.randn(B, Hk, geo.n_query_blocks, geo.n_key_blocks, generator=g, dtype=torch.float64)
    log_p = torch.log_softmax(gate.masked_fill(~geo.candidates, -math.inf), -1)
    block_bias = torch.where(sel.valid, torch.gather(log_p, -1, sel.indices), 0.0)
    out = _run(kernel, q, k, v, sel, 0.5, block_bias=block_bias)
    ref = dense_reference(q, k, v, sel.block_mask(), geo, scale=0.5, block_log_probs=log_p)
    assert torch.allclose(out, ref, atol=1e-12)
    w = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad((out * w).sum(), (q, k, v)), torch.autograd.grad((ref * w).sum(), (q, k, v))):
        assert torch.allclose(a, b, atol=1e-12)


@pytest.mark.parametrize("kernel", ["split_sdpa", "gather_sdpa"])
def test_training_keeps_no_gathered_blocks(kernel):
    """Memory: what autograd keeps for the backward is O(T · D) per head (q, k, v, the output and a
    log-sum-exp per row), nothing of the gathered keys' O(T · kept keys)."""
    B, H, Hk, T, bs, D = 1, 4, 2, 4096, 16, 8
    sel, _ = _selection(B, Hk, T, T, bs, 0.25, causal=True)
    q, k, v = _qkv(B, H, Hk, T, T, D, dtype=torch.float32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        out = _run(kernel, q, k, v, sel, D ** -0.5)
    out.sum().backward()
    assert max(saved) <= B * H * T * D  # the queries (padded to blocks) or the output
    kept_keys = sel.kept_blocks() * bs * D  # what the gathered keys of one forward hold (and as much the values)
    assert sum(saved) < kept_keys / 4
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))



@pytest.mark.parametrize("shape", ["gqa-ragged", "gqa-kv-cache", "mha-ragged"])
def test_rows_keeping_different_counts_per_head(shape):
    """A selection whose kept count differs between batch rows and KV heads and does not grow with
    the query block: each row keeps a random prefix of its slots, its own block always (slot 0: the
    forced local block). split_sdpa (buckets of whole query blocks) refuses it; auto runs it on
    gather_sdpa (rows bucketed one by one), equal to the reference."""
    B, H, Hk, Q, T, bs = SHAPES[shape]
    D = 5
    sel, geo = _selection(B, Hk, Q, T, bs, 0.75, causal=True)
    g = torch.Generator().manual_seed(7)
    kept = sel.valid.expand(B, Hk, -1, -1).sum(-1)  # (B, Hk, nQb)
    prefix = 1 + (torch.rand(kept.shape, generator=g) * kept).long().clamp(max=kept - 1)
    sel.valid = torch.arange(sel.slots) < prefix[..., None]  # (B, Hk, nQb, S)
    q, k, v = _qkv(B, H, Hk, Q, T, D)
    with pytest.raises(ValueError, match="the split_sdpa block-sparse kernel cannot run"):
        choose_block_kernel(BlockCall(q, k, v, sel, D ** -0.5), "split_sdpa")
    out = _run("gather_sdpa", q, k, v, sel, D ** -0.5)
    assert choose_block_kernel(BlockCall(q, k, v, sel, D ** -0.5)).name == "gather_sdpa"
    ref = dense_reference(q, k, v, sel.block_mask(), geo, scale=D ** -0.5)
    assert torch.allclose(out, ref, atol=1e-12)
    w = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad((out * w).sum(), (q, k, v)), torch.autograd.grad((ref * w).sum(), (q, k, v))):
        assert torch.allclose(a, b, atol=1e-12)



@pytest.mark.parametrize("kernel", ["split_sdpa", "gather_sdpa"])
def test_half_precision_merges_in_float32(kernel):
    """bfloat16 q/k/v: the output equals the float32 reference on the same (rounded) inputs to
    bfloat16's resolution, forward and backward (the parts merge in float32, then round once)."""
    B, H, Hk, T, bs, D = 1, 4, 2, 64, 8, 16
    sel, geo = _selection(B, Hk, T, T, bs, 0.5, causal=True)
    q, k, v = (t.detach().to(torch.bfloat16).requires_grad_() for t in _qkv(B, H, Hk, T, T, D))
    out = _run(kernel, q, k, v, sel, D ** -0.5)
    assert out.dtype == torch.bfloat16
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = dense_reference(q32, k32, v32, sel.block_mask(), geo, scale=D ** -0.5)
    assert (out.float() - ref).abs().max() < 2e-2
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    grads = torch.autograd.grad((out.float() * w).sum(), (q, k, v))
    for a, b in zip(grads, torch.autograd.grad((ref * w).sum(), (q32, k32, v32))):
        assert a.dtype == torch.bfloat16 and (a.float() - b).abs().max() < 5e-2 * max(1.0, b.abs().max().item())


# --- the registry's decision -----------------------------------------------------------------------

def _plain_call(**extras):
    B, H, Hk, T, bs, D = 1, 4, 2, 20, 4, 3
    sel, geo = _selection(B, Hk, T, T, bs, 0.5, causal=True)
    q, k, v = _qkv(B, H, Hk, T, T, D)
    return BlockCall(q, k, v, sel, 0.5, **extras), sel, geo


def test_auto_takes_an_sdpa_kernel_on_the_cpu_for_a_plain_call():
    """Causal calls of several query blocks: split_sdpa; bidirectional ones: gather_sdpa; a decoding step: paged_cpu
    (paged_decode with a gradient)."""
    call, _, _ = _plain_call()
    assert choose_block_kernel(call).name == "split_sdpa"
    assert list(BLOCK_KERNELS) == ["paged_cpu", "paged_decode", "flex", "split_sdpa", "gather_sdpa", "portable"]
    for Q, causal, expected in ((20, False, "gather_sdpa"), (1, True, "paged_decode")):  # with a gradient
        sel, _ = _selection(1, 2, Q, 20, 4, 0.5, causal=causal)
        q, k, v = _qkv(1, 4, 2, Q, 20, 3)
        assert choose_block_kernel(BlockCall(q, k, v, sel, 0.5)).name == expected
    with torch.no_grad():  # a decoding step without one: the C++ step where it builds
        assert choose_block_kernel(BlockCall(q, k, v, sel, 0.5)).name == (
            "paged_cpu" if paged_cpu.load() is not None else "paged_decode")


@pytest.mark.parametrize("extra", ["allowed", "bias", "softcap", "sinks", "dropout", "mods", "gate_gradient"])
def test_what_sdpa_cannot_express_falls_back_to_the_portable_kernel(extra):
    from attnkit.seam.plan import Mods

    _, sel, geo = _plain_call()
    T, nQ = 20, geo.n_query_blocks
    value = {
        "allowed": dict(allowed=torch.ones(1, 1, T, T, dtype=torch.bool)),
        "bias": dict(bias=torch.zeros(1, 1, T, T, dtype=torch.float64)),
        "softcap": dict(softcap=30.0),
        "sinks": dict(sinks=torch.zeros(1, 4, 1, 1, dtype=torch.float64)),
        "dropout": dict(dropout_p=0.1),
        "mods": dict(mods=Mods(score=(lambda s, b, h, q, kv: s * 0.5,))),
        "gate_gradient": dict(block_bias=torch.zeros(1, 2, nQ, sel.slots, dtype=torch.float64, requires_grad=True)),
    }[extra]
    call, _, _ = _plain_call(**value)
    assert choose_block_kernel(call).name == "portable"
    for name in ("split_sdpa", "gather_sdpa"):
        with pytest.raises(ValueError, match=f"{name} block-sparse kernel cannot run"):
            choose_block_kernel(call, name)


def test_a_causal_row_without_its_own_block_falls_back():
    """The kernel masks only each row's own (diagonal) block; a selection that drops it runs portable."""
    B, H, Hk, T, bs, D = 1, 2, 1, 16, 4, 3
    geo = BlockGeometry(bs, T, T, causal=True)
    scores = torch.randn(B, Hk, 4, 4)
    sel = select_blocks(scores, geo, geo.forced(1, 1, sinks=True), 0.5)
    sel.indices[0, 0, 3, 0] = 0 if int(sel.indices[0, 0, 3, 1]) != 0 else 1  # row 3 keeps two past blocks instead
    q, k, v = _qkv(B, H, Hk, T, T, D)
    call = BlockCall(q, k, v, sel, 0.5)
    assert choose_block_kernel(call).name == "portable"
    out = choose_block_kernel(call).run(call)
    assert torch.allclose(out, dense_reference(q, k, v, sel.block_mask(), geo, scale=0.5), atol=1e-12)


def test_sparse_attention_runs_split_sdpa_by_default_and_equals_portable():
    """On a model (GQA Llama), without padding: the default CPU kernel is split_sdpa; its logits and
    gradients equal the portable kernel's. With a padding mask the call runs on the portable kernel."""
    import transformers

    from arch_zoo import LLAMA_LIKE, VOCAB
    from attnkit.sparse import SparseConfig, sparse_attention
    from sparse_helpers import runs_by_kernel

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(
        transformers.LlamaConfig(**dict(LLAMA_LIKE, max_position_embeddings=128)), attn_implementation="sdpa")
    ids = torch.randint(3, VOCAB, (2, 45), generator=torch.Generator().manual_seed(0))
    results = runs_by_kernel(model, [ids], pattern="moba", density=0.3, block_size=8)
    layers = model.config.num_hidden_layers
    assert results["auto"][2] == {"split_sdpa": layers} and results["portable"][2] == {"portable": layers}
    assert (results["auto"][0][0] - results["portable"][0][0]).abs().max() < 1e-5
    for a, b in zip(results["auto"][1], results["portable"][1]):
        assert (a - b).abs().max() < 1e-5
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    with torch.no_grad(), sparse_attention(model, SparseConfig(pattern="moba", density=0.3, block_size=8)) as handle:
        model(input_ids=ids, attention_mask=mask)
    assert dict(handle.kernels) == {"portable": layers}
