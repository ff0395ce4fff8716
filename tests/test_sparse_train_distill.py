"""``attnkit.sparse.distill``: the loss is KL(P_dense || P_sparse) (+ the pooled-map KL), only the gates
(or, asked, the attention projections of a copy) train, the model is left exactly as found, what is
written loads back, and an interrupted distillation resumed from its checkpoint ends with the same
gate weights, bit for bit, as an uninterrupted one."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from attnkit.errors import UserError
from attnkit.metrics.fidelity import next_token_kl
from attnkit.sparse import SparseConfig, sparse_attention
from attnkit.sparse.distill import Distiller, DistillSettings, distill, load_trained
from attnkit.sparse.targets import PooledMapTarget, map_loss
from attnkit.seam import attach
from attnkit.common.training import TrainConfig

V = 53


def _llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()


def _gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel._from_config(GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64),
                                        attn_implementation="sdpa").eval()


TOKENS = torch.randint(0, V, (4000,), generator=torch.Generator().manual_seed(0))
CFG = SparseConfig(pattern="learned_gate", density=0.4, block_size=8)
SETTINGS = DistillSettings(seq_len=48, batch_size=2, map_weight=0.5)


def _train_cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"steps": 6, "lr": 5e-2, "warmup_steps": 2, "checkpoint_every": 2, "progress": False, **kw})


def _state(model):
    return {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}, model.training


@pytest.mark.parametrize("make", [_llama, _gpt2])
def test_distiller_loss_is_the_kl_plus_the_weighted_map_loss(make):
    model = make()
    from attnkit.sparse.distill import _seeded_gates

    gates = _seeded_gates(model, CFG, 0)
    with torch.no_grad():
        gates.gates["0"].q_weight.normal_()  # a gate that prefers some blocks
    ids = TOKENS[:96].view(2, 48)
    loss, metrics = Distiller(model, model, CFG, gates, SETTINGS)(ids)
    pooled = PooledMapTarget(CFG.block_size)
    with torch.no_grad():
        with attach(model, taps=[pooled]):
            dense = model(input_ids=ids).logits
        with sparse_attention(model, CFG, gates=gates) as handle:
            sparse = model(input_ids=ids).logits
        want_map = map_loss(handle.gate_log_probs, pooled)
    want_kl = next_token_kl(dense, sparse)
    # the loss is float32, the reference float64; KLs this small lose ~1e-4 relative
    assert float(metrics["kl"]) == pytest.approx(float(want_kl), rel=1e-3) and float(want_kl) > 0
    assert float(loss.detach()) == pytest.approx(float(want_kl) + 0.5 * float(want_map), rel=1e-3)  # float32 loss
    assert 0 < float(metrics["density"]) < 1


def test_only_the_gates_train_and_the_model_is_left_as_found(tmp_path):
    model = _llama().train()  # found in training mode: must come back so
    before, mode = _state(model)
    result = distill(model, None, CFG, SETTINGS, _train_cfg(), tmp_path, tokens=TOKENS)
    after, mode_after = _state(model)
    assert mode_after is True and mode is True
    for n, (t, flag) in before.items():
        assert torch.equal(t, after[n][0]) and flag == after[n][1], n
    gates = load_file(str(tmp_path / "sparse_gates.safetensors"))
    trained = load_trained(_llama(), tmp_path)
    assert trained.cfg == CFG
    for k, t in trained.gates.state_dict().items():
        assert torch.equal(t, gates[k])
    assert not torch.equal(gates["gates.0.q_weight"], torch.zeros_like(gates["gates.0.q_weight"]))  # it moved
    info = json.loads((tmp_path / "train_summary.json").read_text())
    assert info["steps"] == 6 and len(info["history"]) == 6 and "kl" in info["history"][0]
    assert result.history[-1]["step"] == 6
    assert load_trained(_llama(), tmp_path, density=0.8).cfg.density == 0.8


@pytest.mark.parametrize("target", ["max", "mass"])
def test_a_run_started_from_trained_gates_continues_from_them(tmp_path, target):
    from attnkit.sparse.distill import _seeded_gates

    start = _seeded_gates(_llama(), CFG, 7)
    with torch.no_grad():
        for p in start.parameters():
            p.normal_()  # far from any init a run makes itself
    settings = DistillSettings(seq_len=48, batch_size=2, map_weight=0.5, map_target=target)
    def tiny():  # AdamW moves each weight by about lr a step
        return _train_cfg(steps=2, lr=1e-12, warmup_steps=0)

    distill(_llama(), None, CFG, settings, tiny(), tmp_path / "from", tokens=TOKENS, start_from=start)
    distill(_llama(), None, CFG, settings, tiny(), tmp_path / "fresh", tokens=TOKENS)
    cont, fresh = (load_file(str(tmp_path / d / "sparse_gates.safetensors")) for d in ("from", "fresh"))
    for k, t in start.state_dict().items():
        assert torch.allclose(cont[k], t, atol=1e-9), k
    assert not torch.allclose(fresh["gates.0.q_weight"], start.state_dict()["gates.0.q_weight"])
    info = json.loads((tmp_path / "from" / "train_summary.json").read_text())
    assert info["distill"]["map_target"] == target
    other = _seeded_gates(_llama(), SparseConfig(pattern="learned_gate", density=0.4, block_size=8, gate_dim=8), 0)
    with pytest.raises(UserError, match="do not fit"):
        distill(_llama(), None, CFG, settings, tiny(), tmp_path / "bad", tokens=TOKENS, start_from=other)


@pytest.mark.parametrize("stop_at", [2, 3])
def test_interrupted_distillation_resumed_ends_with_the_same_gates_bit_for_bit(tmp_path, stop_at):
    distill(_llama(), None, CFG, SETTINGS, _train_cfg(), tmp_path / "whole", tokens=TOKENS)
    calls = {"n": 0}

    import attnkit.sparse.distill as distill_mod

    original = distill_mod._step

    def step(module, ids):
        calls["n"] += 1
        if calls["n"] == stop_at + 1:
            raise KeyboardInterrupt  # killed during step stop_at + 1
        return original(module, ids)

    distill_mod._step = step
    try:
        with pytest.raises(KeyboardInterrupt):
            distill(_llama(), None, CFG, SETTINGS, _train_cfg(), tmp_path / "run", tokens=TOKENS)
    finally:
        distill_mod._step = original
    assert not (tmp_path / "run" / "sparse_gates.safetensors").exists()
    torch.manual_seed(999)
    distill(_llama(), None, CFG, SETTINGS, _train_cfg(resume=True), tmp_path / "run", tokens=TOKENS)
    a = load_file(str(tmp_path / "whole" / "sparse_gates.safetensors"))
    b = load_file(str(tmp_path / "run" / "sparse_gates.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ha = json.loads((tmp_path / "whole" / "train_summary.json").read_text())["history"]
    hb = json.loads((tmp_path / "run" / "train_summary.json").read_text())["history"]
    assert ha == hb


def test_train_projections_trains_a_copy_and_saves_its_attention_parameters(tmp_path):
    model = _llama()
    before, _ = _state(model)
    distill(model, None, CFG, DistillSettings(seq_len=48, batch_size=2, train_projections=True),
            _train_cfg(steps=3, checkpoint_every=0), tmp_path, tokens=TOKENS)
    for n, (t, flag) in _state(model)[0].items():
        assert torch.equal(t, before[n][0]) and flag == before[n][1], n  # the base model is untouched
    proj = load_file(str(tmp_path / "projections.safetensors"))
    assert any(k.endswith("q_proj.weight") for k in proj)
    loaded = _llama()
    load_trained(loaded, tmp_path)
    moved = [n for n, p in loaded.named_parameters() if not torch.equal(p, before[n][0])]
    assert moved and all(".self_attn." in n for n in moved)


def test_mistakes_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="nothing to train"):
        distill(_llama(), None, SparseConfig(pattern="moba"), SETTINGS, _train_cfg(), tmp_path, tokens=TOKENS)
    with pytest.raises(UserError, match="learned positions"):
        distill(_gpt2(), None, CFG, DistillSettings(seq_len=65), _train_cfg(), tmp_path, tokens=TOKENS)
    with pytest.raises(UserError, match="seq_len"):
        DistillSettings(seq_len=1)
    with pytest.raises(UserError, match="not a directory that attnkit sparse train wrote"):
        load_trained(_llama(), tmp_path)


def test_a_moba_initialised_gate_selects_what_moba_selects():
    from attnkit.sparse.distill import _seeded_gates, moba_init

    model = _llama()  # head dim 8, 2 query heads per KV head
    cfg = SparseConfig(pattern="learned_gate", density=0.4, block_size=8, gate_dim=8, sinks=False)
    gates = _seeded_gates(model, cfg, 0)
    moba_init(gates)
    ids = TOKENS[:80].view(2, 40)
    with torch.no_grad():
        with sparse_attention(model, cfg, gates=gates, keep_masks=True) as learned:
            model(input_ids=ids)
        with sparse_attention(model, SparseConfig(pattern="moba", density=0.4, block_size=8), keep_masks=True) as moba:
            model(input_ids=ids)
    for site, mask in moba.block_masks.items():
        assert torch.equal(learned.block_masks[site], mask), site
    with pytest.raises(UserError, match="--gate-dim"):
        moba_init(_seeded_gates(model, SparseConfig(pattern="learned_gate", gate_dim=16), 0))
