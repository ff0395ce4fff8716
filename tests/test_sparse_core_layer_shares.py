"""The budget moved between layers (``SparseConfig.layer_shares``) and its calibration
(``attnkit.sparse.distill.calibrate_layer_shares``): each layer keeps what a uniform config at its own
density keeps, for every pattern; the config round-trips and is unchanged on disk without shares; the
calibration's measured KL is the KL of that layer alone, its choice stays within the uniform budget,
and the model is left as found."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from attnkit.errors import UserError
from attnkit.metrics.fidelity import next_token_kl
from attnkit.seam import Site
from attnkit.sparse import PATTERNS, SparseConfig, make_gates, sparse_attention
from attnkit.sparse.distill import calibrate_layer_shares

V, T, BS = 61, 64, 8  # 8 blocks


def _llama(layers: int = 3):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()


IDS = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(1))


def _gates(model, cfg):
    gates = make_gates(model, cfg)
    if gates is not None:
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for p in gates.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
    return gates


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_each_layer_keeps_what_a_uniform_config_at_its_density_keeps(pattern):
    model = _llama()
    shares = (0.5, 4.0, 1.5)  # layer 1 asks for more than every block: it runs dense
    cfg = SparseConfig(pattern=pattern, density=0.25, block_size=BS, layer_shares=shares)
    gates = _gates(model, cfg)
    with torch.no_grad(), sparse_attention(model, cfg, gates=gates, keep_masks=True) as handle:
        model(input_ids=IDS)
        masks = dict(handle.block_masks)
    assert [cfg.density_of_layer(i) for i in range(3)] == [0.125, 1.0, 0.375]
    for layer in range(3):
        alone = SparseConfig(pattern=pattern, density=cfg.density_of_layer(layer), block_size=BS)
        with torch.no_grad(), sparse_attention(model, alone, gates=gates, keep_masks=True) as h:
            model(input_ids=IDS)
        # the same blocks as the uniform config at that density, in that layer (its input differs
        # only where earlier layers ran at other densities: compare the counts, and layer 0 exactly)
        assert torch.equal(masks[Site(layer)].sum(-1), h.block_masks[Site(layer)].sum(-1)), layer
        if layer == 0:
            assert torch.equal(masks[Site(0)], h.block_masks[Site(0)])
    geo_candidates = torch.ones(T // BS, T // BS, dtype=torch.bool).tril()
    assert torch.equal(masks[Site(1)][0, 0], geo_candidates)  # share 4 at 0.25: every causal block


def test_shares_of_one_are_the_uniform_config():
    model = _llama()
    with torch.no_grad():
        with sparse_attention(model, SparseConfig(pattern="quest", density=0.25, block_size=BS)):
            a = model(input_ids=IDS).logits
        with sparse_attention(model, SparseConfig(pattern="quest", density=0.25, block_size=BS,
                                                  layer_shares=(1.0, 1.0, 1.0))):
            b = model(input_ids=IDS).logits
    assert torch.equal(a, b)


def test_the_config_round_trips_and_reads_as_before_without_shares():
    plain = SparseConfig(pattern="moba", density=0.25)
    assert "layer_shares" not in plain.to_dict()  # files written without shares are unchanged
    assert SparseConfig.from_dict(plain.to_dict()) == plain
    shared = SparseConfig(pattern="moba", density=0.25, layer_shares=[0.5, 1.5])
    assert shared.layer_shares == (0.5, 1.5) and shared.to_dict()["layer_shares"] == [0.5, 1.5]
    assert SparseConfig.from_dict(shared.to_dict()) == shared
    assert shared.at_layer(1) == SparseConfig(pattern="moba", density=0.375)
    for bad in ([], [1.0, 0.0], [1.0, float("nan")], ["a"]):
        with pytest.raises(UserError, match="layer_shares must be positive"):
            SparseConfig(layer_shares=bad)
    with pytest.raises(UserError, match="none for layer 2"):
        shared.density_of_layer(2)


def test_calibration_measures_each_layer_alone_and_keeps_within_the_uniform_budget():
    model = _llama()
    # straight_through: the output is plain attention over the kept blocks, so density 1 is dense
    cfg = SparseConfig(pattern="learned_gate", density=0.25, block_size=BS, sinks=False, gate_grad="straight_through")
    gates = _gates(model, cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grid = (0.125, 0.25, 0.5, 1.0)
    cal = calibrate_layer_shares(model, cfg, gates, IDS, grid=grid)
    assert {n: p for n, p in model.named_parameters()}.keys() == before.keys()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()) and not model.training
    with torch.no_grad():
        dense = model(input_ids=IDS).logits.float()
        with sparse_attention(model, replace(cfg, density=0.5), gates=gates, layers=[1]):
            sparse = model(input_ids=IDS).logits.float()
    assert cal.kl[1][0.5] == pytest.approx(float(next_token_kl(dense, sparse)), rel=1e-4, abs=1e-7)
    assert all(cal.kl[layer][1.0] < 1e-6 for layer in range(3))  # density 1 is dense attention
    # at 64 tokens in blocks of 8, densities 0.125 and 0.25 keep the same blocks (the floor of 2):
    # the higher one is free here and keeps more at longer lengths
    assert cal.kept[0][0.125] == cal.kept[0][0.25] and all(d >= 0.25 for d in cal.densities.values())
    used = sum(cal.kept[layer][cal.densities[layer]] for layer in range(3)) / 3
    assert used <= cal.budget + 1e-9
    assert cal.budget == pytest.approx(sum(cal.kept[layer][0.25] for layer in range(3)) / 3)
    assert cal.shares == tuple(cal.densities[layer] / 0.25 for layer in range(3))
    # the chosen allocation costs no more KL, summed over layers, than the uniform one
    assert sum(cal.kl[layer][cal.densities[layer]] for layer in range(3)) <= \
        sum(cal.kl[layer][0.25] for layer in range(3)) + 1e-12
