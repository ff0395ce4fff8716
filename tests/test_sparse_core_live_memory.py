"""What a sparse training step keeps alive between its forward and its backward, beyond what dense
SDPA keeps: the split kernel's list of kept blocks (2 bytes a block), not its plan, and no
selection unless the handle is asked to keep the masks (``keep_masks``).

By category: the split kernel alone (plain and with the gate's term, its saved tensors counted
against the selection), a model's training step (keep_masks off and on: which objects are alive as
the backward starts; the same loss, gradients and density either way; the masks it keeps against
the handle's own count of kept blocks), and the error for masks not kept.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import attnkit.seam.kernels.split_sdpa as split
from attnkit.errors import UserError
from attnkit.seam import Site
from attnkit.seam.kernels.blocks import BlockSelection
from attnkit.sparse import SparseConfig, dense_reference, sparse_attention
from arch_zoo import VOCAB
from sparse_helpers import random_qkv, random_selection


@pytest.fixture
def plans(monkeypatch) -> list[weakref.ref]:
    """Weak references to every plan the split kernel makes while the test runs."""
    made, real = [], split.split_sdpa_plan

    def plan(*args, **kwargs):
        out = real(*args, **kwargs)
        made.append(weakref.ref(out))
        return out

    monkeypatch.setattr(split, "split_sdpa_plan", plan)
    return made


def _split_node(out: torch.Tensor):
    """The split kernel's autograd node behind ``out``."""
    todo = [out.grad_fn]
    while todo:
        node = todo.pop()
        if type(node).__name__ == "_SplitAttentionBackward":
            return node
        todo += [n for n, _ in node.next_functions if n is not None]
    raise AssertionError("no split kernel node")


# (B, H, Hkv, Q, T, block): GQA and MHA, a partial last block, a KV cache before the queries
SHAPES = [(1, 4, 2, 45, 45, 8), (2, 3, 3, 37, 37, 4), (1, 4, 2, 20, 41, 4)]


@pytest.mark.parametrize("with_bias", [False, True], ids=["plain", "gate-term"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_the_split_kernel_keeps_its_kept_blocks_for_the_backward_not_its_plan(shape, with_bias, plans):
    B, H, Hk, Q, T, bs = shape
    sel, geo = random_selection(B, Hk, T, bs, 0.3, seed=1, Q=Q)
    q, k, v = random_qkv(B, H, Hk, Q, T, 8, seed=2)
    g = torch.Generator().manual_seed(3)
    bias = torch.randn(sel.indices.shape, generator=g, dtype=torch.float64) if with_bias else None
    out = split.split_sdpa_attention(q, k, v, sel.indices, sel.valid, geo, scale=8 ** -0.5, block_bias=bias)
    assert len(plans) == 1 and plans[0]() is None  # the plan, and its buckets' masks, went with the forward
    rows = B * Hk * geo.n_query_blocks
    others = int(sel.valid.expand(sel.indices.shape).sum()) - rows  # every row's kept blocks but its own
    saved = _split_node(out).saved_tensors
    assert len(saved) == 8  # q (padded to whole blocks), k, v, the output, its log-sum-exp; the plan's three
    assert saved[1].data_ptr() == k.data_ptr() and saved[2].data_ptr() == v.data_ptr()
    kept, others_bias, own_bias = saved[5:]
    assert kept.dtype == torch.int16 and kept.shape == (others,)
    if with_bias:
        assert others_bias.shape == (others,) and own_bias.shape == (geo.n_query_blocks, B * Hk)
    else:
        assert others_bias is None and own_bias is None
    # the backward rebuilds the plan from them: the gradients of attention restricted to the kept
    # blocks (float64), with the gate's term on the scores of each kept block
    full = None
    if with_bias:
        full = torch.zeros(B, Hk, geo.n_query_blocks, geo.n_key_blocks, dtype=torch.float64)
        full.scatter_(-1, sel.indices, torch.where(sel.valid, bias, 0.0))
    ref = dense_reference(q, k, v, sel.block_mask(), geo, scale=8 ** -0.5, block_log_probs=full)
    assert torch.allclose(out, ref, atol=1e-12)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for a, b in zip(torch.autograd.grad((out * w).sum(), (q, k, v)), torch.autograd.grad((ref * w).sum(), (q, k, v))):
        assert torch.allclose(a, b, atol=1e-12)


def _llama(layers: int = 2):
    import transformers

    from arch_zoo import LLAMA_LIKE

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**dict(LLAMA_LIKE, num_hidden_layers=layers, max_position_embeddings=128))
    return transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa")


def _selections() -> dict[int, BlockSelection]:
    return {id(o): o for o in gc.get_objects() if type(o) is BlockSelection}


def test_a_training_step_holds_no_plan_and_keeps_masks_only_when_asked(plans):
    """As the backward starts (no collector run: a reference cycle would count as held), no split
    plan is alive and, without ``keep_masks``, no selection of the step; with it, one per site, held
    by the handle. Loss, gradients and density are the same either way, and the masks kept hold as
    many blocks as the handle counted."""
    model = _llama()
    ids = torch.randint(3, VOCAB, (2, 48), generator=torch.Generator().manual_seed(0))
    cfg = SparseConfig(pattern="moba", density=0.3, block_size=8)
    before = _selections()
    results = {}
    for keep in (False, True):
        model.zero_grad(set_to_none=True)
        del plans[:]
        with sparse_attention(model, cfg, keep_masks=keep) as handle:
            out = model(input_ids=ids, labels=ids)
            alive = [s for i, s in _selections().items() if i not in before]
            assert len(plans) == 2 and all(p() is None for p in plans)
            assert len(alive) == (2 if keep else 0)
            del alive
            out.loss.backward()
        assert dict(handle.kernels) == {"split_sdpa": 2}
        results[keep] = (out.logits.detach(), [p.grad.clone() for p in model.parameters()], handle.densities())
        if keep:
            masks = handle.block_masks
            assert set(masks) == {Site(0), Site(1)} and handle.kept_blocks is masks
            candidates = int(torch.ones(6, 6).tril().sum()) * 2 * model.config.num_key_value_heads  # (B = 2)
            for site, mask in masks.items():
                assert mask.shape == (2, model.config.num_key_value_heads, 6, 6)
                assert int(mask.sum()) / candidates == handle.density(site)
    assert torch.equal(results[False][0], results[True][0])
    assert all(torch.equal(a, b) for a, b in zip(results[False][1], results[True][1]))
    assert results[False][2] == results[True][2]


def test_masks_not_kept_say_how_to_keep_them():
    model = _llama(layers=1)
    ids = torch.randint(3, VOCAB, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), sparse_attention(model, SparseConfig(pattern="moba", density=0.3, block_size=8)) as handle:
        model(input_ids=ids)
    assert 0 < handle.density() <= 1
    for name in ("block_masks", "kept_blocks", "block_bias"):
        with pytest.raises(UserError, match=r"keep_masks=True"):
            getattr(handle, name)
