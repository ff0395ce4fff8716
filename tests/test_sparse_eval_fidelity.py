"""``attnkit.sparse.evaluate`` on real forwards: the sparse probabilities the error tap measures are the
kernel's own (p̃ @ V equals the kernel's output, every pattern), the metrics vanish where sparse equals
dense (density 1, a sequence shorter than a block), and the edge cases (padding, all-padding rows,
repeated tokens) give finite numbers."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from attnkit.seam import AttentionSession, attach
from attnkit.sparse import PATTERNS, SparseConfig, sparse_attention
from attnkit.sparse.distill import _seeded_gates
from attnkit.sparse.evaluate import (TARGETS, ProbErrorTap, dense_baseline, evaluate_pattern, smallest_densities)

V = 53


def _llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128)
    m = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()
    with torch.no_grad():  # sharper attention than a random init's, so patterns differ
        for layer in m.model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
    return m


def _gates(model, cfg):
    gates = _seeded_gates(model, cfg, 0)
    if gates is not None:
        with torch.no_grad():
            for g in gates.gates.values():
                g.q_weight.normal_()  # an opinionated gate: its prior reweights the kept blocks
    return gates


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("length", [37, 5])  # ragged blocks; shorter than one block
def test_measured_sparse_probabilities_are_the_kernels(pattern, length):
    model = _llama()
    cfg = SparseConfig(pattern=pattern, density=0.4, block_size=8)
    gates = _gates(model, cfg)
    ids = torch.randint(0, V, (2, length), generator=torch.Generator().manual_seed(1))
    checked = []

    def check(call, rows, p_sparse, out):
        want = out[:, :, rows].double()
        got = p_sparse @ call.value.detach().double()
        checked.append(float((got - want).abs().max()))

    with torch.no_grad(), sparse_attention(model, cfg, gates=gates, keep_masks=True) as handle:
        tap = ProbErrorTap(handle)
        tap.check = check
        with attach(model, AttentionSession(taps=[tap])):
            model(input_ids=ids)
    assert len(checked) >= 2 and max(checked) < 1e-5
    total = sum(e.entries for e in tap.errors.values())
    assert total == 2 * 2 * 4 * length * (length + 1) // 2  # layers x batch x heads x causal pairs
    for e in tap.errors.values():
        if length <= 8:  # one block: nothing to drop
            assert e.mse < 1e-12 and e.mean_dropped_mass == 0.0
        elif pattern != "learned_gate":
            assert e.mean_dropped_mass > 0


def test_padding_rows_do_not_count_and_all_padding_rows_are_finite():
    model = _llama()
    cfg = SparseConfig(pattern="moba", density=0.3, block_size=8)
    ids = torch.randint(0, V, (2, 32), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 32, dtype=torch.long)
    mask[1, 12:] = 0  # right padding
    with torch.no_grad(), sparse_attention(model, cfg, keep_masks=True) as handle:
        tap = ProbErrorTap(handle)
        tap.query_mask = mask.bool()
        with attach(model, AttentionSession(taps=[tap])):
            out = model(input_ids=ids, attention_mask=mask).logits
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[1, :12]).all()
    rows = {e.rows for e in tap.errors.values()}
    assert rows == {4 * (32 + 12)}  # heads x valid query rows, per layer
    assert all(math.isfinite(e.mse) for e in tap.errors.values())


def test_evaluate_pattern_against_dense():
    model = _llama()
    ids = torch.randint(0, V, (2, 48), generator=torch.Generator().manual_seed(3))
    base = dense_baseline(model, ids, grad_windows=1)
    full = evaluate_pattern(model, SparseConfig(pattern="window", density=1.0, block_size=8), None, base)
    assert full["kl"] < 1e-9 and full["prob_mse"] < 1e-12 and full["top1_agreement"] == 1.0
    assert full["grad_cosine_min"] == pytest.approx(1.0, abs=1e-6) and full["measured_density"] == 1.0
    assert full["perplexity_ratio"] == pytest.approx(1.0, abs=1e-6)
    results = []
    for pattern in PATTERNS:
        cfg = SparseConfig(pattern=pattern, density=0.25, block_size=8)
        r = evaluate_pattern(model, cfg, _gates(model, cfg), base)
        results.append(r)
        assert r["kl"] > 1e-6 and 0 < r["grad_cosine_min"] < 1 and r["prob_mse"] > 0, pattern
        assert r["prob_mse"] == pytest.approx(r["prob_mse_kept"] + r["prob_mse_dropped"])
        assert set(r["grad_cosine_by_layer"]) == {"layer 0", "layer 1"}
        assert 0.25 <= r["measured_density"] < 0.6
    # repeated tokens: one token over and over is still a valid input
    same = torch.full((1, 40), 7)
    r = evaluate_pattern(model, SparseConfig(pattern="quest", density=0.25, block_size=8), None,
                         dense_baseline(model, same, grad_windows=1))
    assert all(math.isfinite(r[k]) for k in ("kl", "perplexity", "prob_mse", "grad_cosine_min"))


def test_smallest_density_per_target():
    rows = [{"seq_len": 1024, "pattern": "moba", "density": d, "kl": kl, "prob_mse": 1e-5, "grad_cosine_min": g,
             "top1_accuracy_ratio": 0.99} for d, kl, g in ((0.125, 0.01, 0.9), (0.25, 0.0008, 0.97), (0.5, 0.0001, 0.99))]
    got = smallest_densities(rows)["1024"]["moba"]
    assert got == {"prob_mse": 0.125, "grad_cosine": 0.25, "kl": 0.25, "accuracy": 0.125}
    assert set(TARGETS) == set(got)


def test_encoder_embeddings_with_padding_and_an_all_padding_sequence():
    from transformers import BertConfig, BertModel

    from attnkit.sparse.evaluate import embedding_fidelity

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                     max_position_embeddings=64, initializer_range=0.3)
    model = BertModel._from_config(cfg, attn_implementation="sdpa").eval()
    ids = torch.randint(1, V, (3, 40), generator=torch.Generator().manual_seed(4))
    mask = torch.ones(3, 40, dtype=torch.long)
    mask[1, 25:] = 0  # padding
    mask[2] = 0  # a sequence that is all padding
    batch = {"input_ids": ids, "attention_mask": mask}
    dense = embedding_fidelity(model, batch, SparseConfig(pattern="window", density=1.0, block_size=8))
    assert dense["sentences"] == 2 and dense["embedding_cosine_min"] > 1 - 1e-6 and dense["prob_mse"] < 1e-12
    sparse = embedding_fidelity(model, batch, SparseConfig(pattern="moba", density=0.3, block_size=8))
    assert sparse["sentences"] == 2 and 0 < sparse["embedding_cosine_min"] < 1 - 1e-6
    assert math.isfinite(sparse["prob_mse"]) and sparse["prob_mse"] > 0
    assert sparse["tokens"] == 40 + 25


@pytest.mark.parametrize("gate_grad", ["prior", "straight_through"])
def test_measured_probabilities_follow_the_gate_grad_mode(gate_grad):
    model = _llama()
    cfg = SparseConfig(pattern="learned_gate", density=0.4, block_size=8, gate_grad=gate_grad)
    gates = _gates(model, cfg)
    ids = torch.randint(0, V, (1, 40), generator=torch.Generator().manual_seed(5))
    checked = []

    def check(call, rows, p_sparse, out):
        checked.append(float((p_sparse @ call.value.detach().double() - out[:, :, rows].double()).abs().max()))

    with torch.no_grad(), sparse_attention(model, cfg, gates=gates, keep_masks=True) as handle:
        tap = ProbErrorTap(handle)
        tap.check = check
        with attach(model, AttentionSession(taps=[tap])):
            model(input_ids=ids)
    assert checked and max(checked) < 1e-5
