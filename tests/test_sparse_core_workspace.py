"""The workspace the sparse calls write their temporaries into: reused across calls of different
shapes, it changes nothing they compute, and nothing a call returns or keeps is a view of it.

By category: the selection (``keep_best`` through every training-free pattern), the split kernel's
plan and its forward and backward (calls of different shapes interleaved on one workspace, their
backwards run after both forwards), and ``sparse_attention`` on models (one workspace per model,
two models apart, a model called twice before one backward). References: the same calls without a
workspace, and dense attention restricted to the kept blocks in float64 (``dense_reference``).
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from attnkit.seam.kernels.blocks import keep_best
from attnkit.seam.kernels.split_sdpa import split_sdpa_attention, split_sdpa_plan
from attnkit.seam.kernels.workspace import Workspace
from attnkit.sparse import BlockGeometry, SparseConfig, dense_reference, sparse_attention
from attnkit.sparse.attention import choose_blocks, workspace_of
from sparse_helpers import random_qkv, random_selection


def test_take_grows_and_names_do_not_alias():
    ws = Workspace()
    a = ws.take("a", (2, 3), torch.float32, torch.device("cpu"))
    b = ws.take("b", (2, 3), torch.float32, torch.device("cpu"))
    a.fill_(1.0)
    b.fill_(2.0)
    assert a.shape == (2, 3) and bool((a == 1).all())  # another name is another buffer
    small = ws.take("a", (4,), torch.float32, torch.device("cpu"))
    assert small.data_ptr() == a.data_ptr()  # a smaller shape reuses the buffer
    big = ws.take("a", (5, 5), torch.float32, torch.device("cpu"))
    assert big.shape == (5, 5) and ws.nbytes == (25 + 6) * 4  # grown
    assert ws.take("a", (2,), torch.int64, torch.device("cpu")).dtype == torch.int64  # per dtype
    ws.clear()
    assert ws.nbytes == 0


def test_a_buffer_made_in_inference_mode_is_made_again_outside_it():
    ws = Workspace()
    with torch.inference_mode():
        inside = ws.take("a", (3,), torch.float32, torch.device("cpu"))
        assert inside.is_inference()
    outside = ws.take("a", (3,), torch.float32, torch.device("cpu"))
    assert not outside.is_inference()
    outside.fill_(1.0)  # writable


# (B, H, Hkv, Q, T, block): GQA and MHA, a partial last block, a KV cache before the queries
SHAPES = [(1, 4, 2, 45, 45, 8), (2, 3, 3, 37, 37, 4), (1, 4, 2, 20, 41, 4), (2, 4, 1, 64, 64, 8)]


@pytest.mark.parametrize("pattern", ["moba", "quest", "sinks_window", "window"])
def test_selection_with_a_shared_workspace_equals_a_fresh_one(pattern):
    """Calls of every shape in turn on one workspace (each shape twice, larger and smaller shapes
    between): each selection equals the one made without a workspace, and a later call leaves an
    earlier selection unchanged."""
    ws = Workspace()
    kept = []
    for i, (B, H, Hk, Q, T, bs) in enumerate(SHAPES * 2):
        q, k, _ = random_qkv(B, H, Hk, Q, T, 8, dtype=torch.float32, seed=i)
        cfg = SparseConfig(pattern=pattern, density=0.3, block_size=bs)
        fresh = choose_blocks(q, k, cfg)
        shared = choose_blocks(q, k, cfg, workspace=ws)
        assert torch.equal(shared.indices, fresh.indices) and torch.equal(shared.valid, fresh.valid)
        kept.append((shared, shared.indices.clone()))
    assert ws.nbytes > 0
    for sel, indices in kept:
        assert torch.equal(sel.indices, indices)


def test_keep_best_with_ties_and_non_finite_scores_equals_a_fresh_call():
    ws = Workspace()
    geo = BlockGeometry(4, 40, 40)
    forced = geo.forced(1, 1, sinks=True)
    _, _, valid = geo.selection_budget(0.4, 1, 1, True)
    g = torch.Generator().manual_seed(0)
    for scores in (torch.randint(0, 3, (2, 2, 10, 10), generator=g).float(),  # many ties
                   torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0]).repeat(2, 2, 10, 2)):
        fresh = keep_best(scores, geo, forced, valid)
        shared = keep_best(scores, geo, forced, valid, ws)
        assert torch.equal(shared.indices, fresh.indices)


def _plan_record(plan):
    return (plan.others.tolist(), [(b.i0, b.i1, b.at, b.n) for b in plan.buckets],
            None if plan.own_bias is None else plan.own_bias.tolist(),
            [None if b.mask is None else b.mask.tolist() for b in plan.buckets])


@pytest.mark.parametrize("with_bias", [False, True], ids=["plain", "gate-term"])
def test_split_plan_with_a_shared_workspace_equals_a_fresh_one(with_bias):
    ws = Workspace()
    plans = []
    for i, (B, H, Hk, Q, T, bs) in enumerate(SHAPES * 2):
        sel, geo = random_selection(B, Hk, T, bs, 0.3, seed=i, Q=Q)
        bias = torch.randn(sel.indices.shape, generator=torch.Generator().manual_seed(i)) if with_bias else None
        fresh = split_sdpa_plan(sel.indices, sel.valid, geo, torch.float32, bias)
        shared = split_sdpa_plan(sel.indices, sel.valid, geo, torch.float32, bias, workspace=ws)
        assert _plan_record(shared) == _plan_record(fresh)
        plans.append((shared, _plan_record(shared)))
    for plan, record in plans:  # what a plan keeps for the backward is its own
        assert _plan_record(plan) == record


def test_split_kernel_forwards_of_different_shapes_then_their_backwards_on_one_workspace():
    """Two forwards of different shapes on one workspace, then both backwards: each output and
    gradient equals dense attention restricted to its kept blocks (float64)."""
    ws = Workspace()
    runs = []
    for i, (B, H, Hk, Q, T, bs) in enumerate(SHAPES[:2] + SHAPES[3:]):
        sel, geo = random_selection(B, Hk, T, bs, 0.3, seed=i, Q=Q)
        q, k, v = random_qkv(B, H, Hk, Q, T, 5, seed=i)
        out = split_sdpa_attention(q, k, v, sel.indices, sel.valid, geo, scale=5 ** -0.5, workspace=ws)
        runs.append((q, k, v, sel, geo, out))
    for q, k, v, sel, geo, out in runs:
        ref = dense_reference(q, k, v, sel.block_mask(), geo, scale=5 ** -0.5)
        assert torch.allclose(out, ref, atol=1e-12)
        w = torch.randn_like(out)
        for a, b in zip(torch.autograd.grad((out * w).sum(), (q, k, v)),
                        torch.autograd.grad((ref * w).sum(), (q, k, v))):
            assert torch.allclose(a, b, atol=1e-12)


def _llama(seed: int, layers: int = 2):
    import transformers

    from arch_zoo import LLAMA_LIKE

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**dict(LLAMA_LIKE, num_hidden_layers=layers, max_position_embeddings=128))
    return transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa")


def test_one_workspace_per_model_kept_across_blocks_and_freed_with_the_model():
    a, b = _llama(0), _llama(1)
    assert workspace_of(a) is workspace_of(a) and workspace_of(a) is not workspace_of(b)
    ids = torch.randint(3, 100, (1, 40), generator=torch.Generator().manual_seed(0))
    cfg = SparseConfig(pattern="moba", density=0.3, block_size=8)
    with torch.no_grad(), sparse_attention(a, cfg):
        a(input_ids=ids)
    held = workspace_of(a).nbytes
    assert held > 0 and workspace_of(b).nbytes == 0
    with torch.no_grad(), sparse_attention(a, cfg):
        a(input_ids=ids)
    assert workspace_of(a).nbytes == held  # the same shapes: nothing new
    gone = weakref.ref(workspace_of(a))
    del a
    gc.collect()
    assert gone() is None


def test_two_forwards_of_different_lengths_before_one_backward_equal_the_portable_kernel():
    """A model called twice (different lengths, so the shared buffers change shape between them)
    before one backward: logits and gradients equal those of the portable kernel, which keeps no
    workspace."""
    model = _llama(0)
    g = torch.Generator().manual_seed(0)
    first, second = torch.randint(3, 100, (2, 45), generator=g), torch.randint(3, 100, (1, 61), generator=g)
    results = {}
    for kernel in ("auto", "portable"):
        cfg = SparseConfig(pattern="moba", density=0.3, block_size=8, kernel=kernel)
        model.zero_grad(set_to_none=True)
        with sparse_attention(model, cfg) as handle:
            out1 = model(input_ids=first, labels=first)
            out2 = model(input_ids=second, labels=second)
            (out1.loss + out2.loss).backward()
        results[kernel] = (out1.logits.detach(), out2.logits.detach(), [p.grad.clone() for p in model.parameters()],
                           dict(handle.kernels))
    assert results["auto"][3] == {"split_sdpa": 4}
    for a, b in zip(results["auto"][:2], results["portable"][:2]):
        assert (a - b).abs().max() < 1e-5
    for a, b in zip(results["auto"][2], results["portable"][2]):
        assert (a - b).abs().max() < 1e-5


def test_a_sessions_selection_is_freed_without_the_cycle_collector():
    model = _llama(0)
    ids = torch.randint(3, 100, (1, 40), generator=torch.Generator().manual_seed(0))
    gc.collect()
    gc.disable()
    try:
        with torch.no_grad(), sparse_attention(model, SparseConfig(pattern="moba", density=0.3, block_size=8)) as handle:
            model(input_ids=ids)
        selections = [weakref.ref(s) for s in handle.block_masks._by_site.values()]
        assert len(selections) == 2 and all(s() is not None for s in selections)
        del handle
        assert all(s() is None for s in selections)
    finally:
        gc.enable()
