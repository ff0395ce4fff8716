"""The workspace a sparse call carves its temporaries from: sized by the call before (too small,
too large or exact), it changes nothing a call computes, and nothing a call returns or keeps is a
view of it.

By category: the selection (``keep_best`` through every training-free pattern), the split kernel's
plan and its forward and backward (calls of different shapes in turn, their backwards run after
every forward), and ``sparse_attention`` on models (sizes per model and site, two models apart, a
model called twice before one backward). References: the same calls without a workspace, and
dense attention restricted to the kept blocks in float64 (``dense_reference``).
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
from attnkit.sparse.attention import choose_blocks, workspace_bytes
from arch_zoo import VOCAB
from sparse_helpers import random_qkv, random_selection, runs_by_kernel


def test_a_release_hands_the_arena_back_and_later_takes_get_the_room_left():
    ws = Workspace(1024)
    a = ws.take((16,), torch.float32, torch.device("cpu"))  # 64 bytes
    ws.release()
    b = ws.take((16,), torch.float32, torch.device("cpu"))  # a new arena of the 960 bytes left
    assert b.untyped_storage().data_ptr() != a.untyped_storage().data_ptr()
    assert b.untyped_storage().nbytes() == 1024 - 64
    c = ws.take((200,), torch.float32, torch.device("cpu"))  # 800 more: still fits
    assert c.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    a.fill_(1.0), b.fill_(2.0), c.fill_(3.0)
    assert float(a.sum()) == 16 and float(b.sum()) == 32 and float(c.sum()) == 600  # no overlap
    assert ws.take((100,), torch.float32, torch.device("cpu")).untyped_storage().nbytes() == 400  # past it: fresh


def test_takes_share_no_memory_and_what_does_not_fit_is_fresh():
    ws = Workspace(1024)
    a = ws.take((2, 3), torch.float32, torch.device("cpu"))
    b = ws.take((5,), torch.int64, torch.device("cpu"))
    a.fill_(1.0)
    b.fill_(-1)
    assert bool((a == 1).all()) and bool((b == -1).all())  # no overlap
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()  # one arena
    big = ws.take((300,), torch.float32, torch.device("cpu"))  # past the capacity: a tensor of its own
    assert big.untyped_storage().data_ptr() != a.untyped_storage().data_ptr() and big.shape == (300,)
    assert ws.used == 64 + 64 + 1216  # what the next call's workspace should hold (64-byte aligned)
    assert Workspace().take((3,), torch.float32, torch.device("cpu")).shape == (3,)  # no capacity: fresh


# (B, H, Hkv, Q, T, block): GQA and MHA, a partial last block, a KV cache before the queries
SHAPES = [(1, 4, 2, 45, 45, 8), (2, 3, 3, 37, 37, 4), (1, 4, 2, 20, 41, 4), (2, 4, 1, 64, 64, 8)]


@pytest.mark.parametrize("pattern", ["moba", "quest", "sinks_window", "window"])
def test_selection_with_a_workspace_equals_a_fresh_call(pattern):
    """Calls of every shape in turn, each with a workspace of the size the call before needed
    (larger and smaller shapes between): each selection equals the one made without a workspace,
    and a later call leaves an earlier selection unchanged."""
    kept, capacity = [], 0
    for i, (B, H, Hk, Q, T, bs) in enumerate(SHAPES * 2):
        q, k, _ = random_qkv(B, H, Hk, Q, T, 8, dtype=torch.float32, seed=i)
        cfg = SparseConfig(pattern=pattern, density=0.3, block_size=bs)
        fresh = choose_blocks(q, k, cfg)
        ws = Workspace(capacity)  # the last call's size: too small, too large or exact
        shared = choose_blocks(q, k, cfg, workspace=ws)
        capacity = ws.used
        assert torch.equal(shared.indices, fresh.indices) and torch.equal(shared.valid, fresh.valid)
        assert ws._arena is None or shared.indices.untyped_storage().data_ptr() != ws._arena.data_ptr()
        kept.append((shared, shared.indices.clone()))
    assert capacity > 0
    for sel, indices in kept:
        assert torch.equal(sel.indices, indices)


def test_keep_best_with_ties_and_non_finite_scores_equals_a_fresh_call():
    geo = BlockGeometry(4, 40, 40)
    forced = geo.forced(1, 1, sinks=True)
    _, _, valid = geo.selection_budget(0.4, 1, 1, True)
    g = torch.Generator().manual_seed(0)
    for scores in (torch.randint(0, 3, (2, 2, 10, 10), generator=g).float(),  # many ties
                   torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0]).repeat(2, 2, 10, 2),
                   torch.randn(1, 1, 1, 10, generator=g)):  # one row for every query block: broadcast
        fresh = keep_best(scores, geo, forced, valid)
        shared = keep_best(scores, geo, forced, valid, Workspace(1 << 16))
        assert torch.equal(shared.indices, fresh.indices)


def _plan_record(plan):
    return (plan.others.tolist(), [(b.i0, b.i1, b.at, b.n, b.c) for b in plan.buckets],
            None if plan.own_bias is None else plan.own_bias.tolist(),
            [None if plan.mask(b, torch.float32) is None else plan.mask(b, torch.float32).tolist()
             for b in plan.buckets])


@pytest.mark.parametrize("with_bias", [False, True], ids=["plain", "gate-term"])
def test_split_plan_with_a_workspace_equals_a_fresh_call(with_bias):
    plans, capacity = [], 0
    for i, (B, H, Hk, Q, T, bs) in enumerate(SHAPES * 2):
        sel, geo = random_selection(B, Hk, T, bs, 0.3, seed=i, Q=Q)
        bias = torch.randn(sel.indices.shape, generator=torch.Generator().manual_seed(i)) if with_bias else None
        fresh = split_sdpa_plan(sel.indices, sel.valid, geo, bias)
        ws = Workspace(capacity)
        shared = split_sdpa_plan(sel.indices, sel.valid, geo, bias, workspace=ws)
        capacity = ws.used
        assert _plan_record(shared) == _plan_record(fresh)
        plans.append((shared, _plan_record(shared)))
    for plan, record in plans:  # what a plan keeps for the backward is its own
        assert _plan_record(plan) == record


def test_split_kernel_forwards_of_different_shapes_then_their_backwards():
    """Forwards of different shapes, each with a workspace of the size the one before needed, then
    every backward: each output and gradient equals dense attention restricted to its kept blocks
    (float64)."""
    runs, capacity = [], 0
    for i, (B, H, Hk, Q, T, bs) in enumerate(SHAPES):
        sel, geo = random_selection(B, Hk, T, bs, 0.3, seed=i, Q=Q)
        q, k, v = random_qkv(B, H, Hk, Q, T, 5, seed=i)
        ws = Workspace(capacity)
        out = split_sdpa_attention(q, k, v, sel.indices, sel.valid, geo, scale=5 ** -0.5, workspace=ws)
        capacity = ws.used
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


def test_workspace_sizes_are_kept_per_model_and_site_and_freed_with_the_model():
    a, b = _llama(0), _llama(1)
    assert workspace_bytes(a) is workspace_bytes(a) and workspace_bytes(a) is not workspace_bytes(b)
    ids = torch.randint(3, VOCAB, (1, 40), generator=torch.Generator().manual_seed(0))
    cfg = SparseConfig(pattern="moba", density=0.3, block_size=8)
    with torch.no_grad(), sparse_attention(a, cfg):
        a(input_ids=ids)
    sizes = dict(workspace_bytes(a))
    assert len(sizes) == 2 and all(n > 0 for n in sizes.values()) and workspace_bytes(b) == {}
    with torch.no_grad(), sparse_attention(a, cfg):
        a(input_ids=ids[:, :24])
    assert all(workspace_bytes(a)[s] < sizes[s] for s in sizes)  # the last call's size, smaller
    from attnkit.sparse.attention import _WORKSPACE_BYTES

    held = len(_WORKSPACE_BYTES)
    del a
    gc.collect()
    assert len(_WORKSPACE_BYTES) == held - 1  # the model's entry went with it


def test_two_forwards_of_different_lengths_before_one_backward_equal_the_portable_kernel():
    """A model called twice (different lengths, so the shared buffers change shape between them)
    before one backward: logits and gradients equal those of the portable kernel, which keeps no
    workspace."""
    model = _llama(0)
    g = torch.Generator().manual_seed(0)
    first, second = torch.randint(3, VOCAB, (2, 45), generator=g), torch.randint(3, VOCAB, (1, 61), generator=g)
    results = runs_by_kernel(model, [first, second], pattern="moba", density=0.3, block_size=8)
    assert results["auto"][2] == {"split_sdpa": 4}
    for a, b in zip(results["auto"][0], results["portable"][0]):
        assert (a - b).abs().max() < 1e-5
    for a, b in zip(results["auto"][1], results["portable"][1]):
        assert (a - b).abs().max() < 1e-5


def test_a_sessions_selection_is_freed_without_the_cycle_collector():
    model = _llama(0)
    ids = torch.randint(3, VOCAB, (1, 40), generator=torch.Generator().manual_seed(0))
    gc.collect()
    gc.disable()
    try:
        with torch.no_grad(), sparse_attention(model, SparseConfig(pattern="moba", density=0.3, block_size=8),
                                               keep_masks=True) as handle:
            model(input_ids=ids)
        selections = [weakref.ref(s) for s in handle.block_masks._by_site.values()]
        assert len(selections) == 2 and all(s() is not None for s in selections)
        del handle
        assert all(s() is None for s in selections)
    finally:
        gc.enable()


@pytest.mark.parametrize("key_blocks,dtype", [(10, torch.int16), (40_000, torch.int32)])
def test_a_compact_selection_has_the_same_block_mask(key_blocks, dtype):
    from attnkit.seam.kernels.blocks import BlockSelection

    geo = BlockGeometry(1, 1, key_blocks)  # one query at the end of key_blocks keys, blocks of one
    indices = torch.tensor([[[[key_blocks - 1, 0, key_blocks // 2]]], [[[3, key_blocks - 2, 1]]]])  # (2, 1, 1, 3)
    valid = torch.tensor([True, True, False]).view(1, 1, 1, 3)
    sel = BlockSelection(indices, valid, geo)
    small = sel.compact()
    assert small.indices.dtype == dtype and torch.equal(small.indices.long(), indices)
    assert torch.equal(small.block_mask(), sel.block_mask()) and small.kept_blocks() == sel.kept_blocks() == 4


@pytest.mark.parametrize("pattern,kernel", [("moba", "auto"), ("moba", "portable"), ("quest", "auto"),
                                            ("learned_gate", "auto")])
def test_no_arena_outlives_its_call(pattern, kernel, monkeypatch):
    """Every arena the forwards made (a first one sizes the sites' workspaces, the training forward uses
    them) is gone when the forward returns, and already when the split kernel's attention runs: the
    attention and the backward never hold one; the step's gradients are those of the same step with no
    workspace."""
    from torch.multiprocessing.reductions import StorageWeakRef

    from attnkit.sparse import make_gates

    arenas, real_take = [], Workspace.take

    def take(self, shape, dtype, device):
        out = real_take(self, shape, dtype, device)
        if self._arena is not None:
            arenas.append(StorageWeakRef(self._arena.untyped_storage()))
        return out

    import attnkit.seam.kernels.split_sdpa as split

    real_apply, attended = split._SplitAttention.apply, []

    def apply(*args):  # the split kernel's attention: the selection's and plan's arenas handed back
        attended.append(all(ref.expired() for ref in arenas))
        return real_apply(*args)

    monkeypatch.setattr(split._SplitAttention, "apply", apply)
    model = _llama(0)
    ids = torch.randint(3, VOCAB, (1, 48), generator=torch.Generator().manual_seed(0))
    cfg = SparseConfig(pattern=pattern, density=0.3, block_size=8, kernel=kernel)
    gates = make_gates(model, cfg) if pattern == "learned_gate" else None
    grads = []
    for with_workspace in (True, False):
        if not with_workspace:
            monkeypatch.setattr("attnkit.sparse.attention.Workspace", lambda capacity: None)
        else:
            monkeypatch.setattr(Workspace, "take", take)
        model.zero_grad(set_to_none=True)
        with sparse_attention(model, cfg, gates=gates):
            with torch.no_grad():
                model(input_ids=ids)  # sizes each site's workspace for the next call
            loss = model(input_ids=ids, labels=ids).loss
            if with_workspace:
                assert arenas and all(ref.expired() for ref in arenas)
            loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    assert all(attended) and bool(attended) == (kernel == "auto")


def test_a_gate_term_whose_session_has_ended_says_so():
    from attnkit.sparse.attention import GateBias, SparseSelector

    selector = SparseSelector(SparseConfig(pattern="learned_gate"), None, None)
    term = GateBias(selector)
    assert term.selector is selector
    del selector
    gc.collect()
    with pytest.raises(RuntimeError, match="session of this gate term has ended"):
        term.selector
