"""The portable block-sparse kernel against dense attention restricted to the same blocks.

Forward and backward (gradcheck in float64, the gate's gradient included), partial last blocks,
grouped-query heads, padding masks and rows that see nothing, a KV-cache offset, bidirectional
calls, chunking and checkpointing, and the memory claim: no tensor autograd saves has T×T
elements per head at T = 1024.
"""

from __future__ import annotations

import math

import pytest
import torch

from attnkit.sparse import block_sparse_attention, dense_reference
from sparse_helpers import random_qkv as _qkv, random_selection as _selection




def _gate_bias(gate_scores, sel, geo):
    """The gate's log-prob of each kept block (what the learned pattern adds), from free scores."""
    log_p = torch.log_softmax(gate_scores.masked_fill(~geo.candidates, -math.inf), -1)
    picked = torch.gather(log_p, -1, sel.indices)
    return torch.where(sel.valid, picked, 0.0), log_p


@pytest.mark.parametrize("T,bs,H,Hk", [(10, 4, 2, 1), (12, 4, 4, 2), (7, 8, 2, 2)])
def test_gradcheck_against_restricted_dense(T, bs, H, Hk):
    """Forward equals the restricted dense reference; gradcheck (float64) of q, k, v and the gate."""
    B, D = 2, 3
    sel, geo = _selection(B, Hk, T, bs, density=0.5)
    q, k, v = _qkv(B, H, Hk, T, T, D)
    gate = torch.randn(B, Hk, geo.n_query_blocks, geo.n_key_blocks, dtype=torch.float64, requires_grad=True)
    scale = D ** -0.5

    def sparse(q, k, v, gate):
        bias, _ = _gate_bias(gate, sel, geo)
        return block_sparse_attention(q, k, v, sel.indices, sel.valid, geo, scale=scale, block_bias=bias,
                                      chunk_elements=B * H * bs * sel.slots * bs)  # one query block a chunk

    def dense(q, k, v, gate):
        _, log_p = _gate_bias(gate, sel, geo)
        return dense_reference(q, k, v, sel.block_mask(), geo, scale=scale, block_log_probs=log_p)

    out, ref = sparse(q, k, v, gate), dense(q, k, v, gate)
    assert torch.allclose(out, ref, atol=1e-12)
    w = torch.randn_like(out)
    g_sparse = torch.autograd.grad((out * w).sum(), (q, k, v, gate))
    g_dense = torch.autograd.grad((ref * w).sum(), (q, k, v, gate))
    for a, b in zip(g_sparse, g_dense):
        assert torch.allclose(a, b, atol=1e-12)
    if geo.n_key_blocks > 1:  # with one block its log-prob is 0 whatever the gate
        assert g_sparse[3].abs().sum() > 0  # the gate gets a gradient from the output
    assert torch.autograd.gradcheck(sparse, (q, k, v, gate), fast_mode=True)


def test_checkpointed_chunks_equal_one_pass():
    B, H, Hk, T, bs, D = 1, 4, 2, 37, 4, 5
    sel, geo = _selection(B, Hk, T, bs, density=0.4)
    q, k, v = _qkv(B, H, Hk, T, T, D)
    grads = []
    for chunk, ckpt in ((1, True), (10**9, False), (50, True)):
        out = block_sparse_attention(q, k, v, sel.indices, sel.valid, geo, scale=0.3, chunk_elements=chunk, checkpoint=ckpt)
        grads.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v))))
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            assert torch.allclose(a, b, atol=1e-12)


def test_model_mask_and_all_padding_rows():
    """The call's own mask is honoured; a row that may see nothing is zero, its gradient finite."""
    B, H, Hk, T, bs, D = 2, 2, 1, 11, 4, 3
    sel, geo = _selection(B, Hk, T, bs, density=0.6)
    q, k, v = _qkv(B, H, Hk, T, T, D)
    allowed = torch.ones(B, 1, T, T, dtype=torch.bool)
    allowed[1, :, :, :3] = False  # left padding: keys 0..2 of sample 1 hidden
    allowed[1, :, :3, :] = False  # and its padding queries see nothing
    out = block_sparse_attention(q, k, v, sel.indices, sel.valid, geo, scale=0.5, allowed=allowed)
    ref = dense_reference(q, k, v, sel.block_mask(), geo, scale=0.5, allowed=allowed)
    assert torch.isfinite(out).all() and torch.allclose(out, ref, atol=1e-12)
    assert (out[1, :, :3] == 0).all()
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("Q,bs", [(6, 4), (2, 8), (1, 4)])
def test_kv_cache_offset_and_partial_blocks(Q, bs):
    """Queries at the end of the keys (a KV cache), not aligned to blocks: blocks by key position
    (across two query blocks, or within one: a decoding step's rows are not padded to a block)."""
    B, H, Hk, T, D = 1, 2, 2, 23, 3
    sel, geo = _selection(B, Hk, T, bs, density=0.5, Q=Q)
    assert geo.front == (T - Q) % bs and geo.front > 0
    q, k, v = _qkv(B, H, Hk, Q, T, D)
    out = block_sparse_attention(q, k, v, sel.indices, sel.valid, geo, scale=0.5)
    ref = dense_reference(q, k, v, sel.block_mask(), geo, scale=0.5)
    assert torch.allclose(out, ref, atol=1e-12)


def test_bidirectional_call():
    B, H, Hk, T, bs, D = 1, 2, 1, 13, 4, 3
    sel, geo = _selection(B, Hk, T, bs, density=0.5, causal=False)
    assert bool(sel.block_mask()[0, 0].triu(1).any())  # future blocks are candidates
    q, k, v = _qkv(B, H, Hk, T, T, D)
    out = block_sparse_attention(q, k, v, sel.indices, sel.valid, geo, scale=0.5)
    assert torch.allclose(out, dense_reference(q, k, v, sel.block_mask(), geo, scale=0.5), atol=1e-12)


def test_full_density_is_dense_sdpa():
    B, H, Hk, T, bs, D = 2, 4, 2, 29, 8, 8
    sel, geo = _selection(B, Hk, T, bs, density=1.0)
    q, k, v = _qkv(B, H, Hk, T, T, D, dtype=torch.float32)
    out = block_sparse_attention(q, k, v, sel.indices, sel.valid, geo, scale=D ** -0.5)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    assert (out - ref).abs().max() < 1e-5


@pytest.mark.parametrize("checkpoint", [False, True])
def test_no_saved_tensor_is_t_by_t_per_head(checkpoint):
    """An independent check of sub-quadratic memory: every tensor autograd keeps for backward
    (forward + backward of T = 1024, block 64, density 0.25) has fewer than T×T elements per head."""
    torch.manual_seed(0)
    B, H, Hk, T, bs, D = 1, 4, 2, 1024, 64, 16
    sel, geo = _selection(B, Hk, T, bs, density=0.25)
    q, k, v = _qkv(B, H, Hk, T, T, D, dtype=torch.float32)
    gate = torch.zeros(B, Hk, geo.n_query_blocks, geo.n_key_blocks, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        bias, _ = _gate_bias(gate, sel, geo)
        out = block_sparse_attention(q, k, v, sel.indices, sel.valid, geo, scale=D ** -0.5, block_bias=bias,
                                     checkpoint=checkpoint)
    out.sum().backward()
    per_head = max(saved) / (B * H)
    assert per_head <= T * sel.slots * bs  # O(T · S · block), S = kept blocks: here T² / 4
    assert per_head < T * T / 2
    assert q.grad is not None and torch.isfinite(q.grad).all() and gate.grad is not None
    if checkpoint:  # only the chunks' inputs are kept: O(T · D) per head, nothing of T · S · block
        assert max(saved) <= B * H * T * D * 2


def test_softcap_bias_and_sinks_against_the_seams_dense_kernel():
    """The model's own soft-cap, an additive bias and learned sinks, checked against attnkit's
    dense kernel restricted to the kept blocks (forward and gradients; that kernel's scores are
    float32, hence the tolerance)."""
    from torch import nn

    from attnkit.seam.kernels.dense import dense_attention
    from attnkit.seam import Site, build_call
    from attnkit.seam.plan import Mods

    B, H, Hk, T, bs, D = 1, 4, 2, 14, 4, 3
    sel, geo = _selection(B, Hk, T, bs, density=0.5)
    q, k, v = _qkv(B, H, Hk, T, T, D)
    g = torch.Generator().manual_seed(7)
    bias = torch.randn(1, H, T, T, generator=g, dtype=torch.float64, requires_grad=True)
    sinks = torch.randn(H, generator=g, dtype=torch.float64, requires_grad=True)
    blocks = sel.block_mask()

    def keep(b, h, q_idx, kv_idx):
        return blocks[b, h // (H // Hk), q_idx // bs, kv_idx // bs] & (kv_idx <= q_idx)

    call = build_call(nn.Module(), Site(0), q, k, v, scale=0.7, softcap=2.0, bias=bias, sinks=sinks)
    ref = dense_attention(call, Mods(mask=(keep,)), 1 << 20)
    out = block_sparse_attention(q, k, v, sel.indices, sel.valid, geo, scale=0.7, softcap=2.0, bias=bias,
                                 sinks=call.sinks)
    assert torch.allclose(out, ref, atol=1e-6)
    w = torch.randn_like(out)
    ga = torch.autograd.grad((out * w).sum(), (q, k, v, bias, sinks))
    gb = torch.autograd.grad((ref * w).sum(), (q, k, v, bias, sinks))
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ga, gb))
    assert all(g.abs().sum() > 0 for g in ga)
    fn = lambda q, k, v, bias, s: block_sparse_attention(  # noqa: E731
        q, k, v, sel.indices, sel.valid, geo, scale=0.7, softcap=2.0, bias=bias, sinks=s.view(1, -1, 1, 1))
    assert torch.autograd.gradcheck(fn, (q, k, v, bias, sinks), fast_mode=True)


def test_straight_through_gate_term():
    """``gate_grad="straight_through"``: log p − stopgrad(log p) on the kept blocks' scores. The
    output is attention over the kept blocks whatever the gate; the gate's gradient equals the
    restricted dense reference's with the same term."""
    B, H, Hk, T, bs, D = 1, 4, 2, 16, 4, 3
    sel, geo = _selection(B, Hk, T, bs, density=0.5)
    q, k, v = _qkv(B, H, Hk, T, T, D)
    gate = torch.randn(B, Hk, geo.n_query_blocks, geo.n_key_blocks, dtype=torch.float64, requires_grad=True)

    def st(gate):
        _, log_p = _gate_bias(gate, sel, geo)
        log_p = torch.where(geo.candidates, log_p, 0.0)
        return log_p - log_p.detach()

    term = st(gate)
    bias = torch.where(sel.valid, torch.gather(term, -1, sel.indices), 0.0)
    out = block_sparse_attention(q, k, v, sel.indices, sel.valid, geo, scale=0.5, block_bias=bias)
    plain = dense_reference(q, k, v, sel.block_mask(), geo, scale=0.5)
    assert torch.allclose(out, plain, atol=1e-12)  # the gate changes nothing in the forward
    ref = dense_reference(q, k, v, sel.block_mask(), geo, scale=0.5, block_log_probs=term)
    w = torch.randn_like(out)
    g_out = torch.autograd.grad((out * w).sum(), gate, retain_graph=True)[0]
    g_ref = torch.autograd.grad((ref * w).sum(), gate)[0]
    assert torch.allclose(g_out, g_ref, atol=1e-12) and g_out.abs().sum() > 0
