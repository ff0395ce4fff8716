"""SeerAttention's target (attnkit.sparse.targets): the tap's block-max-pooled map equals the full dense
map captured by MapCapture and max-pooled by hand, for GQA Llama and GPT-2, with chunks of query rows
that do not line up with blocks; the loss is the KL written out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from attnkit.seam import AttentionSession, MapCapture, Site, attach
from attnkit.sparse import SparseConfig, make_gates, sparse_attention
from attnkit.sparse.targets import PooledMapTarget, block_kl, map_loss, pool_rows


def _llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()


def _gpt2():
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=61, n_embd=32, n_layer=2, n_head=4, n_positions=128)
    return GPT2LMHeadModel._from_config(cfg, attn_implementation="sdpa").eval()


MODELS = {"llama-gqa": _llama, "gpt2": _gpt2}


def _pool_by_hand(full, block: int, reduce: str):
    """(B, H, T, T) -> (B, H, nQb, nKb): each tile's max ("max") or sum ("mass"), written out with loops."""
    B, H, T, _ = full.shape
    n = math.ceil(T / block)
    out = torch.zeros(B, H, n, n)
    for i in range(n):
        for j in range(n):
            tile = full[:, :, i * block:(i + 1) * block, j * block:(j + 1) * block]
            out[:, :, i, j] = tile.amax((-1, -2)) if reduce == "max" else tile.sum((-1, -2))
    return out


@pytest.mark.parametrize("reduce", ["max", "mass"])
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("length,block", [(37, 8), (16, 16), (5, 8)])  # ragged, exact, shorter than a block
def test_pooled_map_equals_the_full_map_pooled_by_hand(name, length, block, reduce):
    model = MODELS[name]()
    ids = torch.randint(0, 61, (2, length), generator=torch.Generator().manual_seed(1))
    capture, pooled = MapCapture(), PooledMapTarget(block, reduce)
    with torch.no_grad(), attach(model, taps=[capture]):
        model(input_ids=ids)
    # small chunks: 3 rows at a time, not aligned to the blocks
    with torch.no_grad(), attach(model, AttentionSession(taps=[pooled], chunk_elements=2 * 4 * 3 * length)):
        model(input_ids=ids)
    for site, full in capture.maps.items():
        want = _pool_by_hand(full.float(), block, reduce)  # (B, H, nQb, nKb)
        assert torch.allclose(pooled.pooled[site], want, atol=1e-5), site
        if reduce == "mass":  # every query row's probabilities sum to 1: a query block's mass is its row count
            rows = torch.tensor([min(block, length - i * block) for i in range(want.shape[2])], dtype=torch.float)
            assert torch.allclose(pooled.pooled[site].sum(-1), rows.expand_as(want[..., 0]), atol=1e-4)
        H = full.shape[1]
        groups = 2 if name == "llama-gqa" else 1
        t = pooled.target(site, num_kv_heads=H // groups)
        grouped = want.view(want.shape[0], H // groups, groups, *want.shape[2:])
        grouped = grouped.amax(2) if reduce == "max" else grouped.sum(2)  # the heads of a KV group share blocks
        assert torch.allclose(t, grouped / grouped.sum(-1, keepdim=True), atol=1e-5)
        assert torch.allclose(t.sum(-1), torch.ones_like(t.sum(-1)))
        assert (t.triu(1) == 0).all()  # no future block


def test_an_unknown_map_target_is_a_clear_error():
    from attnkit.errors import UserError
    from attnkit.sparse.distill import DistillSettings

    with pytest.raises(UserError, match="unknown map target 'sum'.*max, mass"):
        DistillSettings(map_target="sum")
    with pytest.raises(UserError, match="unknown map target"):
        PooledMapTarget(8, "mean")


def test_target_fits_the_gate_scores_and_the_loss_is_the_kl_by_hand():
    model = _llama()
    ids = torch.randint(0, 61, (1, 40), generator=torch.Generator().manual_seed(2))
    cfg = SparseConfig(pattern="learned_gate", density=0.5, block_size=8)
    gates = make_gates(model, cfg)
    pooled = PooledMapTarget(cfg.block_size)
    with torch.no_grad(), attach(model, taps=[pooled]):
        model(input_ids=ids)
    with sparse_attention(model, cfg, gates=gates) as handle:
        model(input_ids=ids)
    loss = map_loss(handle.gate_log_probs, pooled)
    by_hand = []
    for site, lp in handle.gate_log_probs.items():
        lp = lp.detach()
        t = pooled.target(site, lp.shape[1])
        assert t.shape == lp.shape
        rows = []
        for b, h, i in torch.cartesian_prod(*(torch.arange(s) for s in lp.shape[:3])).tolist():
            rows.append(sum(float(t[b, h, i, j]) * (math.log(float(t[b, h, i, j])) - float(lp[b, h, i, j]))
                            for j in range(lp.shape[-1]) if t[b, h, i, j] > 0))
        by_hand.append(sum(rows) / len(rows))
    assert float(loss.detach()) == pytest.approx(sum(by_hand) / len(by_hand), rel=1e-3, abs=1e-8)  # float32 sums
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in gates.parameters())


def test_padding_queries_teach_nothing_and_pooling_keeps_a_key_prefix():
    probs = torch.rand(1, 1, 3, 5)
    out = pool_rows(probs, 2, key_blocks=4)  # 5 keys -> 3 blocks, padded to 4
    assert out.shape == (1, 1, 3, 4) and (out[..., 3] == 0).all()
    assert torch.equal(out[..., 0], probs[..., :2].amax(-1)) and torch.equal(out[..., 2], probs[..., 4])
    t = torch.tensor([[0.0, 0.0]])
    assert float(block_kl(t, torch.log(torch.tensor([[0.5, 0.5]])))) == 0.0  # an all-padding block row


def test_padding_rows_of_a_batch_are_zero_in_the_pooled_map():
    model = _llama()
    ids = torch.randint(0, 61, (2, 24), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, 16:] = 0  # right padding: the second sequence's last block is padding only
    pooled = PooledMapTarget(8)
    session = AttentionSession(taps=[pooled])
    session.query_mask = mask.bool()
    with torch.no_grad(), attach(model, session):
        model(input_ids=ids, attention_mask=mask)
    for site in pooled.pooled:
        assert (pooled.pooled[site][1, :, 2] == 0).all() and (pooled.pooled[site][0, :, 2] > 0).any()
        assert Site(0) in pooled.pooled


def test_mass_ranks_the_block_that_holds_the_attention_first_where_max_ranks_a_sharp_one():
    # two rows of one query block over two key blocks of 4 keys: block 0 has one sharp entry seen by
    # one row, block 1 holds most of both rows' attention, spread thin
    probs = torch.tensor([[0.60, 0.00, 0.00, 0.00, 0.10, 0.10, 0.10, 0.10],
                          [0.00, 0.00, 0.00, 0.00, 0.25, 0.25, 0.25, 0.25]]).view(1, 1, 2, 8)
    by_max, by_mass = (pool_rows(probs, 4, 2, reduce).amax(2) if reduce == "max" else pool_rows(probs, 4, 2, reduce).sum(2)
                       for reduce in ("max", "mass"))
    assert by_max.argmax(-1).item() == 0 and by_mass.argmax(-1).item() == 1
    assert torch.allclose(by_mass, torch.tensor([[[0.6, 1.4]]]))  # what dropping each block removes
