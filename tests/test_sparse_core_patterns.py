"""Every block-selection pattern: forced blocks kept, the density's budget (the same k for every
pattern), no future block, what each pattern's score means, GQA groups sharing their blocks, and
a new pattern registered by name. The patterns' docstring examples run as doctests."""

from __future__ import annotations

import doctest
import importlib
import math

import pytest
import torch

from attnkit.errors import UserError
from attnkit.sparse import PATTERNS, BlockGate, Pattern, SparseConfig, choose_blocks, register_pattern

B, H, HK, T, BS, D = 2, 4, 2, 100, 8, 6  # 13 key blocks, the last one partial


def _qk(seed=0, T=T):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, T, D, generator=g), torch.randn(B, HK, T, D, generator=g)


def _random_gate(seed=0):
    gate = BlockGate(HK, H // HK, D, gate_dim=8)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in gate.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return gate


def _select(pattern, density, causal=True, seed=0, **cfg):
    q, k = _qk(seed)
    gate = _random_gate(seed) if PATTERNS[pattern].learned else None
    config = SparseConfig(pattern=pattern, density=density, block_size=BS, **cfg)
    return choose_blocks(q, k, config, gate=gate, causal=causal), config


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
@pytest.mark.parametrize("density", [0.1, 0.25, 0.5, 1.0])
def test_budget_forced_blocks_and_causality(pattern, density):
    sel, cfg = _select(pattern, density)
    geo = sel.geometry
    mask = sel.block_mask()  # (B, Hkv, nQb, nKb)
    assert mask.shape == (B, HK, geo.n_query_blocks, geo.n_key_blocks)
    assert not (mask & ~geo.candidates).any()  # causal: no future block
    i = torch.arange(geo.n_query_blocks)
    assert mask[..., i, i].all()  # the local block, always
    if cfg.keeps_sinks:
        assert mask[..., 0].all()
    # the budget: ⌈density · (i + 1)⌉ blocks for query block i, at least sinks + local for every
    # pattern (whether it forces the sinks or not)
    kept = mask.sum(-1)
    forced = 1 + (i > 0).long()
    want = torch.maximum(torch.ceil(density * (i + 1) - 1e-9).long(), forced).clamp(max=i + 1)
    assert (kept == want).all()
    if density == 1.0:
        assert (mask == geo.candidates).all()


@pytest.mark.parametrize("density", [0.1, 0.3, 0.6])
def test_equal_k_for_every_pattern_at_equal_density(density):
    """At one density all patterns keep the same number of blocks per query block, whether they
    force the sinks or not: they differ only in which."""
    counts = {p: _select(p, density)[0].block_mask().sum(-1) for p in PATTERNS}
    counts.update({f"{p} sinks={s}": _select(p, density, sinks=s)[0].block_mask().sum(-1)
                   for p in ("window", "moba") for s in (True, False)})
    first = next(iter(counts.values()))
    assert all(torch.equal(c, first) for c in counts.values()), counts


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_more_sinks_and_local_blocks(pattern):
    sel, cfg = _select(pattern, 0.2, sink_blocks=2, local_blocks=3)
    mask, geo = sel.block_mask(), sel.geometry
    for i in range(geo.n_query_blocks):
        assert mask[..., i, max(0, i - 2): i + 1].all()  # three local blocks
        if cfg.keeps_sinks:
            assert mask[..., i, : min(2, i + 1)].all()  # two sinks
        floor = min(i + 1, len(set(range(max(0, i - 2), i + 1)) | {0, 1}))
        assert (mask[..., i, :].sum(-1) == max(floor, math.ceil(0.2 * (i + 1) - 1e-9))).all()
    assert not (mask & ~geo.candidates).any()


def test_measured_density_honours_the_knob():
    """Over a long call the share kept is the density (ceil rounding adds under one block a row)."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 2048, 4, generator=g), torch.randn(1, 2, 2048, 4, generator=g)
    for density in (0.1, 0.25, 0.5):
        sel = choose_blocks(q, k, SparseConfig(pattern="moba", density=density, block_size=16))
        measured = sel.kept_blocks() / sel.candidate_blocks()
        n = sel.geometry.n_key_blocks
        assert density <= measured <= density + 2 * n / (n * (n + 1) / 2) + 1e-9


def test_window_keeps_the_most_recent_blocks():
    sel, _ = _select("window", 0.3)
    geo = sel.geometry
    mask = sel.block_mask()
    for i in range(geo.n_query_blocks):
        k = int(mask[0, 0, i].sum())
        assert mask[:, :, i, i - k + 1: i + 1].all()


def test_sinks_window_is_sinks_plus_recent():
    sel, _ = _select("sinks_window", 0.3)
    mask = sel.block_mask()
    for i in range(2, sel.geometry.n_query_blocks):
        k = int(mask[0, 0, i].sum())
        expect = torch.zeros(sel.geometry.n_key_blocks, dtype=torch.bool)
        expect[0] = True
        expect[i - (k - 1) + 1: i + 1] = True
        assert torch.equal(mask[0, 0, i], expect)


def _brute_block_scores(pattern, q, k, geo):
    """Scores computed the slow, obvious way: loops over blocks and the group's heads."""
    G = q.shape[1] // k.shape[1]
    nQ, nK, bs = geo.n_query_blocks, geo.n_key_blocks, geo.block_size
    out = torch.zeros(q.shape[0], k.shape[1], nQ, nK, dtype=torch.float64)
    for b in range(q.shape[0]):
        for hk in range(k.shape[1]):
            for i in range(nQ):
                for j in range(nK):
                    keys = k[b, hk, j * bs: (j + 1) * bs].double()
                    for g in range(G):
                        qm = q[b, hk * G + g, i * bs: (i + 1) * bs].double().mean(0)
                        if pattern == "moba":
                            out[b, hk, i, j] += qm @ keys.mean(0)
                        else:  # quest: the upper bound, and it must bound every key of the block
                            bound = torch.maximum(qm * keys.amax(0), qm * keys.amin(0)).sum()
                            assert bound >= (keys @ qm).max() - 1e-9
                            out[b, hk, i, j] += bound
    return out


@pytest.mark.parametrize("pattern", ["moba", "quest"])
def test_training_free_top_k_picks_the_best_scored_blocks(pattern):
    q, k = _qk(3, T=60)
    cfg = SparseConfig(pattern=pattern, density=0.4, block_size=BS)
    sel = choose_blocks(q, k, cfg)
    geo = sel.geometry
    ref = _brute_block_scores(pattern, q, k, geo)
    mask = sel.block_mask()
    forced = geo.forced(cfg.sink_blocks, cfg.local_blocks, cfg.keeps_sinks)
    for b in range(B):
        for hk in range(HK):
            for i in range(geo.n_query_blocks):
                free = geo.candidates[i] & ~forced[i]
                chosen, rest = mask[b, hk, i] & free, ~mask[b, hk, i] & free
                if chosen.any() and rest.any():  # every chosen block scores at least every dropped one
                    assert ref[b, hk, i][chosen].min() >= ref[b, hk, i][rest].max() - 1e-5


def test_gqa_heads_of_a_group_share_their_blocks():
    """One selection per KV group, from all its query heads: changing a head of group 0 changes
    group 0's blocks and leaves group 1's alone."""
    q, k = _qk(1)
    cfg = SparseConfig(pattern="moba", density=0.3, block_size=BS)
    before = choose_blocks(q, k, cfg).block_mask()
    q2 = q.clone()
    q2[:, 1] = torch.randn_like(q2[:, 1]) * 10  # query head 1 belongs to KV group 0 (G = 2)
    after = choose_blocks(q2, k, cfg).block_mask()
    assert before.shape[1] == HK
    assert torch.equal(before[:, 1], after[:, 1])
    assert not torch.equal(before[:, 0], after[:, 0])


def test_uniform_gate_keeps_what_sinks_window_keeps():
    q, k = _qk(2)
    gate = BlockGate(HK, H // HK, D, gate_dim=8)  # fresh: the query projection is zero
    learned = choose_blocks(q, k, SparseConfig(pattern="learned_gate", density=0.3, block_size=BS), gate=gate)
    window = choose_blocks(q, k, SparseConfig(pattern="sinks_window", density=0.3, block_size=BS))
    assert torch.equal(learned.block_mask(), window.block_mask())
    lp = learned.log_probs
    n = learned.geometry.candidates.sum(-1)
    assert torch.allclose(lp.exp().sum(-1), torch.ones(()))  # a distribution over candidate blocks
    assert torch.allclose(lp[..., 0], -torch.log(n.float()))  # uniform
    assert torch.isinf(lp[..., ~learned.geometry.candidates]).all()  # -inf on future blocks


def test_moba_initialised_gate_keeps_what_moba_keeps():
    q, k = _qk(8)
    gate = BlockGate(HK, H // HK, D, gate_dim=8).init_moba()
    for sinks in (False, True):
        learned = choose_blocks(q, k, SparseConfig(pattern="learned_gate", density=0.3, block_size=BS, sinks=sinks),
                                gate=gate)
        moba = choose_blocks(q, k, SparseConfig(pattern="moba", density=0.3, block_size=BS, sinks=sinks))
        assert torch.equal(learned.block_mask(), moba.block_mask())
    with pytest.raises(UserError, match="gate_dim"):
        BlockGate(HK, H // HK, D, gate_dim=D - 1).init_moba()


def test_learned_gate_scores_have_gradient_and_follow_the_gate():
    q, k = _qk(4)
    gate = _random_gate(5)
    sel = choose_blocks(q, k, SparseConfig(pattern="learned_gate", density=0.3, block_size=BS), gate=gate)
    assert sel.log_probs.requires_grad
    sel.log_probs[..., 0].sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gate.parameters())
    other = choose_blocks(q, k, SparseConfig(pattern="learned_gate", density=0.3, block_size=BS), gate=_random_gate(6))
    assert not torch.equal(sel.block_mask(), other.block_mask())


def test_bidirectional_selection_sees_both_sides():
    sel, cfg = _select("moba", 0.3, causal=False)
    mask = sel.block_mask()
    geo = sel.geometry
    assert (mask.sum(-1) == math.ceil(0.3 * geo.n_key_blocks)).all()  # every key block is a candidate
    assert mask[..., 0, 1:].any()  # a first query block keeps later blocks


def test_register_a_new_pattern_by_name():
    strided = Pattern("test_strided", score=lambda x: (x.key_blocks() % 3 == 0).float(), sinks=False)
    register_pattern(strided)
    try:
        sel, _ = _select("test_strided", 0.3)
        mask = sel.block_mask()[0, 0]
        last = sel.geometry.n_query_blocks - 1
        kept = set(torch.nonzero(mask[last]).flatten().tolist()) - {last}
        assert kept and all(j % 3 == 0 for j in kept)
    finally:
        del PATTERNS["test_strided"]


def test_bad_config_is_a_user_error():
    for bad in (dict(pattern="nope"), dict(density=0.0), dict(density=1.5), dict(block_size=0),
                dict(local_blocks=0), dict(kernel="cuda"), dict(gate_grad="x"), dict(gate_init="x")):
        with pytest.raises(UserError):
            SparseConfig(**bad)


@pytest.mark.parametrize("name", ["window", "sinks_window", "moba", "quest", "learned_gate"])
def test_docstring_examples(name):
    """Each pattern's example runs as written, with nothing but what it imports itself."""
    module = importlib.import_module(f"attnkit.sparse.patterns.{name}")
    result = doctest.testmod(module, globs={}, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_blocks_the_models_mask_hides_are_chosen_last(pattern):
    """Left padding and a sliding window (the call's own mask): a block the mask hides entirely is
    kept only when every visible block is kept already (or it is forced)."""
    from attnkit.sparse.attention import visible_blocks

    q, k = _qk(7)
    pos = torch.arange(T)
    allowed = (pos[None, :] <= pos[:, None]) & (pos[:, None] - pos[None, :] < 30)  # a window of 30
    allowed = allowed[None, None].repeat(B, 1, 1, 1)
    allowed[1, :, :, :20] = False  # sample 1: 20 tokens of left padding
    cfg = SparseConfig(pattern=pattern, density=0.3, block_size=BS)
    gate = _random_gate(7) if PATTERNS[pattern].learned else None
    sel = choose_blocks(q, k, cfg, gate=gate, allowed=allowed)
    geo = sel.geometry
    mask = sel.block_mask()
    visible = visible_blocks(allowed, geo).expand_as(mask)
    forced = geo.forced(cfg.sink_blocks, cfg.local_blocks, cfg.keeps_sinks).expand_as(mask)
    hidden_kept = mask & ~visible & ~forced
    all_visible_kept = ((visible & geo.candidates) <= mask).all(-1, keepdim=True)
    assert (~hidden_kept | all_visible_kept).all()
    if pattern in ("moba", "quest", "learned_gate"):  # content-scored: without the mask they pick hidden blocks
        without = choose_blocks(q, k, cfg, gate=gate).block_mask()
        assert (without & ~visible & ~forced).any()
