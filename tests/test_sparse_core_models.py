"""``sparse_attention`` on Hugging Face causal LMs, by category: MHA (GPT-2), GQA (Llama, Qwen2,
Qwen3 with QK-norm), multi-query (Gemma), sliding window (Mistral), and a bidirectional encoder
(BERT). Against independent references: the model's own attention at density 1, and attnkit's
dense seam kernel restricted to the same kept blocks at lower densities. The model is left exactly
as found (also on an exception); padding, all-padding samples, repeated tokens, sequences shorter
than a block, a KV cache, gradient checkpointing, FlexAttention on CPU inference."""

from __future__ import annotations

import copy
import warnings
from contextlib import ExitStack

import pytest
import torch
import transformers

from arch_zoo import LLAMA_LIKE, VOCAB, enable_checkpointing
from attnkit.errors import UserError
from attnkit.seam import Site, attach
from attnkit.sparse import PATTERNS, SparseConfig, make_gates, sparse_attention

BS, T = 8, 37  # 5 blocks, the last partial

ARCHS = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=VOCAB, n_positions=128, n_embd=32, n_layer=2, n_head=4,
                                                   initializer_range=0.2, resid_pdrop=0.0, embd_pdrop=0.0,
                                                   attn_pdrop=0.0, pad_token_id=0)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(LLAMA_LIKE, max_position_embeddings=128)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(LLAMA_LIKE, max_position_embeddings=128)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(LLAMA_LIKE, max_position_embeddings=128, head_dim=8)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(LLAMA_LIKE, max_position_embeddings=128, num_key_value_heads=1,
                                                      head_dim=8)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(LLAMA_LIKE, max_position_embeddings=128, sliding_window=12)),
}


def build(name: str, impl: str = "sdpa"):
    config_class, model_class, kwargs = ARCHS[name]
    torch.manual_seed(0)
    cfg = getattr(transformers, config_class)(**copy.deepcopy(kwargs))
    return getattr(transformers, model_class)._from_config(cfg, attn_implementation=impl).eval()


def inputs(length: int = T, batch: int = 2, pad: int = 5, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, length, dtype=torch.long)
    if pad:
        mask[-1, length - pad:] = 0  # right padding on the last sample
    return {"input_ids": torch.randint(3, VOCAB, (batch, length), generator=g), "attention_mask": mask}


def real(logits: torch.Tensor, x: dict) -> torch.Tensor:
    return logits[x["attention_mask"].bool()]


def dense_on_kept_blocks(model, masks: dict, x: dict, groups: dict):
    """The model through attnkit's dense kernel, each site restricted to the blocks kept there."""
    with ExitStack() as stack, torch.no_grad():
        for site, blocks in masks.items():
            def keep(b, h, q_idx, kv_idx, blocks=blocks, g=groups[site]):
                return blocks[b, h // g, q_idx // BS, kv_idx // BS]
            stack.enter_context(attach(model, layers=[site], mask_mods=[keep], kernel="dense"))
        return model(**x).logits


def kv_groups(model, cfg) -> dict:
    from attnkit.sparse.gates import attention_shapes

    return {site: shape[1] for site, shape in attention_shapes(model).items()}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_density_one_is_the_model_itself(arch):
    model = build(arch)
    x = inputs()
    with torch.no_grad():
        ref = model(**x).logits
    for pattern in PATTERNS:
        cfg = SparseConfig(pattern=pattern, density=1.0, block_size=BS)
        with torch.no_grad(), sparse_attention(model, cfg, gates=make_gates(model, cfg)) as handle:
            out = model(**x).logits
        assert (real(out, x) - real(ref, x)).abs().max() < 1e-5, pattern
        assert handle.density() == 1.0 and handle.kernels["portable"] == model.config.num_hidden_layers


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("pattern", ["moba", "quest", "sinks_window"])
def test_sparse_equals_dense_kernel_on_the_kept_blocks(arch, pattern):
    model = build(arch)
    x = inputs()
    cfg = SparseConfig(pattern=pattern, density=0.3, block_size=BS)
    with torch.no_grad(), sparse_attention(model, cfg, keep_masks=True) as handle:
        out = model(**x).logits
    masks = handle.block_masks
    assert set(masks) == {Site(i) for i in range(model.config.num_hidden_layers)}
    assert 0.3 <= handle.density() < 0.8
    ref = dense_on_kept_blocks(model, masks, x, kv_groups(model, cfg))
    assert (real(out, x) - real(ref, x)).abs().max() < 1e-5
    with torch.no_grad():
        dense = model(**x).logits
    assert (real(out, x) - real(dense, x)).abs().max() > 1e-3  # it is sparse: something changed


def test_eager_models_too():
    model = build("llama", impl="eager")
    x = inputs()
    with torch.no_grad():
        ref = model(**x).logits
    cfg = SparseConfig(pattern="quest", density=1.0, block_size=BS)
    with torch.no_grad(), sparse_attention(model, cfg):
        assert (real(model(**x).logits, x) - real(ref, x)).abs().max() < 1e-5


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_learned_gate_trains_from_the_next_token_loss(arch):
    """Forward + backward: the gates get finite, non-zero gradients; the model's gradients equal
    those of the dense kernel on the same blocks (at a uniform gate its bias cancels)."""
    model = build(arch).train()
    x = inputs()
    labels = x["input_ids"].masked_fill(x["attention_mask"] == 0, -100)
    cfg = SparseConfig(pattern="learned_gate", density=0.3, block_size=BS)
    gates = make_gates(model, cfg)
    assert len(gates) == model.config.num_hidden_layers
    with sparse_attention(model, cfg, gates=gates, keep_masks=True) as handle:
        loss = model(**x, labels=labels).loss
        loss.backward()
    assert set(handle.gate_log_probs) == set(gates.sites)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in gates.parameters())
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in gates.parameters())
    masks = handle.block_masks
    model.zero_grad()
    groups = kv_groups(model, cfg)
    with ExitStack() as stack:
        for site, blocks in masks.items():
            def keep(b, h, q_idx, kv_idx, blocks=blocks, g=groups[site]):
                return blocks[b, h // g, q_idx // BS, kv_idx // BS]
            stack.enter_context(attach(model, layers=[site], mask_mods=[keep], kernel="dense"))
        ref_loss = model(**x, labels=labels).loss
        ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) < 1e-5
    for n, p in model.named_parameters():
        assert torch.allclose(grads[n], p.grad, atol=1e-5), n


def test_gate_gradient_under_gradient_checkpointing_matches():
    """HF gradient checkpointing recomputes attention in backward: the same blocks, the same
    gradients, and the recompute is not counted as a second call."""
    model = build("llama").train()
    x = inputs(pad=0)
    cfg = SparseConfig(pattern="learned_gate", density=0.3, block_size=BS)
    gates = make_gates(model, cfg)
    with torch.no_grad():
        for p in gates.parameters():
            p.normal_(0, 0.5)  # a trained-looking gate: its bias no longer cancels
    results = []
    for checkpointing in (False, True):
        if checkpointing:
            enable_checkpointing(model, use_reentrant=False)
        gates.zero_grad()
        with sparse_attention(model, cfg, gates=gates) as handle:
            model(**x, labels=x["input_ids"]).loss.backward()
        results.append(([p.grad.clone() for p in gates.parameters()], handle.density(), sum(handle.kernels.values())))
    (g0, d0, n0), (g1, d1, n1) = results
    assert d0 == d1 and n0 == n1 == model.config.num_hidden_layers
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g0, g1))
    assert any(a.abs().sum() > 0 for a in g0)


def test_leaving_the_block_before_a_checkpointed_backward_warns():
    """Under activation checkpointing the backward recomputes the layers: run after the block, it would
    recompute them with the model's own attention (torch stops with a CheckpointError). Leaving the
    block before that backward warns and says where to run it; a backward inside the block, or a forward
    without gradients, does not."""
    model = build("llama").train()
    enable_checkpointing(model, use_reentrant=False)
    x = inputs(pad=0)
    cfg = SparseConfig(pattern="moba", density=0.3, block_size=BS)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="sparse_attention")
        with sparse_attention(model, cfg):
            model(**x, labels=x["input_ids"]).loss.backward()
        with torch.no_grad(), sparse_attention(model, cfg):
            model(**x)
    with pytest.warns(UserWarning, match="Run backward inside"):
        with sparse_attention(model, cfg):
            loss = model(**x, labels=x["input_ids"]).loss
    with pytest.raises(torch.utils.checkpoint.CheckpointError):  # what the warning is about
        loss.backward()


def _state(model):
    return (
        [c._attn_implementation for c in (model.config,)],
        [(len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks), m.training) for m in model.modules()],
        {n: (p.requires_grad, p.data_ptr()) for n, p in model.named_parameters()},
        [n for n, _ in model.named_modules()],
    )


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_model_left_exactly_as_found_also_on_exception(arch):
    model = build(arch)
    x = inputs()
    with torch.no_grad():
        before = model(**x).logits
    state = _state(model)
    cfg = SparseConfig(pattern="learned_gate", density=0.3, block_size=BS)
    gates = make_gates(model, cfg)
    assert _state(model) == state  # making gates changes nothing either
    with sparse_attention(model, cfg, gates=gates):
        model(**x)
    assert _state(model) == state
    with pytest.raises(RuntimeError, match="boom"):
        with sparse_attention(model, cfg, gates=gates):
            model(**x)
            raise RuntimeError("boom")
    assert _state(model) == state
    with pytest.raises(UserError, match="made for"):  # an error inside the forward (gates of another model)
        with sparse_attention(model, cfg, gates=make_gates(build("gemma"), cfg)):
            model(**x)
    assert _state(model) == state
    with torch.no_grad():
        assert torch.equal(model(**x).logits, before)


def test_edge_cases_padding_repeats_short_sequences():
    model = build("llama")
    cfg = SparseConfig(pattern="moba", density=0.2, block_size=BS)
    # a sample that is all padding: finite everywhere, the other sample unchanged by it
    x = inputs(pad=0)
    x["attention_mask"][1] = 0
    with torch.no_grad(), sparse_attention(model, cfg):
        out = model(**x).logits
        alone = model(input_ids=x["input_ids"][:1]).logits
    assert torch.isfinite(out).all()
    assert (out[0] - alone[0]).abs().max() < 1e-5
    # left padding: padding queries see nothing
    x = inputs(pad=0)
    x["attention_mask"][1, :6] = 0
    with torch.no_grad(), sparse_attention(model, cfg):
        assert torch.isfinite(model(**x).logits).all()
    # repeated tokens: ties in every block score; density 1 still the model itself
    ids = torch.full((2, T), 7)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with sparse_attention(model, SparseConfig(pattern="quest", density=1.0, block_size=BS)):
            assert (model(input_ids=ids).logits - ref).abs().max() < 1e-5
        with sparse_attention(model, cfg):
            assert torch.isfinite(model(input_ids=ids).logits).all()
    # shorter than one block, and one token: the single block is always kept, so it is dense
    for length in (1, 5):
        ids = torch.randint(3, VOCAB, (2, length))
        with torch.no_grad():
            ref = model(input_ids=ids).logits
            for pattern in PATTERNS:
                c = SparseConfig(pattern=pattern, density=0.1, block_size=BS)
                with sparse_attention(model, c, gates=make_gates(model, c)):
                    assert (model(input_ids=ids).logits - ref).abs().max() < 1e-5


def test_generation_with_a_kv_cache():
    """Decoding one token at a time puts each query at the end of the keys: blocks by key position."""
    model = build("llama")
    ids = torch.randint(3, VOCAB, (1, 21))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        dense = model.generate(ids, **kw)
        with sparse_attention(model, SparseConfig(pattern="moba", density=1.0, block_size=BS)):
            same = model.generate(ids, **kw)
        with sparse_attention(model, SparseConfig(pattern="moba", density=0.3, block_size=BS)) as handle:
            sparse = model.generate(ids, **kw)
    assert torch.equal(dense, same)
    assert sparse.shape == dense.shape and handle.density() < 1.0


def test_bidirectional_encoder():
    """BERT: no causal mask, so every key block is a candidate (detected from the call)."""
    cfg_b = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=64, max_position_embeddings=128, initializer_range=0.2,
                                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    model = transformers.BertModel._from_config(cfg_b, attn_implementation="sdpa").eval()
    x = inputs()
    with torch.no_grad():
        ref = model(**x).last_hidden_state
        with sparse_attention(model, SparseConfig(pattern="moba", density=1.0, block_size=BS)):
            full = model(**x).last_hidden_state
        with sparse_attention(model, SparseConfig(pattern="moba", density=0.4, block_size=BS),
                              keep_masks=True) as handle:
            model(**x)
    assert (real(full, x) - real(ref, x)).abs().max() < 1e-5
    blocks = handle.block_masks[Site(0)]
    assert blocks[:, :, 0, 1:].any()  # the first query block keeps later key blocks: not causal


def test_taps_see_the_sparse_probabilities():
    from attnkit.seam.taps import MapCapture

    model = build("llama")
    x = inputs(pad=0)
    capture = MapCapture()
    with torch.no_grad(), sparse_attention(model, SparseConfig(pattern="moba", density=0.3, block_size=BS),
                                           keep_masks=True) as handle:
        with attach(model, taps=[capture]):
            model(**x)
    probs = capture.maps[Site(1)]  # (B, H, T, T)
    blocks = handle.block_masks[Site(1)].repeat_interleave(2, dim=1)  # per query head
    token_blocks = blocks[..., torch.arange(T) // BS, :][..., torch.arange(T) // BS]
    assert torch.allclose(probs.sum(-1), torch.ones(()), atol=1e-5)
    assert (probs[~token_blocks] == 0).all()


def test_taps_see_the_trained_gates_reweighting():
    """With a trained gate the kept blocks are reweighted by p_gate(block): the captured maps
    are exactly the probabilities the output was computed from (maps @ V == output)."""
    from attnkit.seam.taps import MapCapture, Tap

    class Calls(Tap):  # keeps each call's value and output
        wants_call, wants_output, wants_chunks = True, True, False

        def __init__(self):
            self.values, self.outputs = {}, {}

        def on_call(self, call):
            self.values[call.site] = call.value

        def on_output(self, call, out):
            self.outputs[call.site] = out

    model = build("llama")
    x = inputs(pad=0)
    cfg = SparseConfig(pattern="learned_gate", density=0.4, block_size=BS)
    gates = make_gates(model, cfg)
    with torch.no_grad():
        for p in gates.parameters():
            p.normal_(0, 0.5)
    capture, calls = MapCapture(), Calls()
    with torch.no_grad(), sparse_attention(model, cfg, gates=gates):
        with attach(model, taps=[capture, calls]):
            model(**x)
    assert set(capture.maps) == {Site(0), Site(1)}
    for site, probs in capture.maps.items():
        assert torch.allclose(probs @ calls.values[site].float(), calls.outputs[site].float(), atol=1e-5)


def test_another_kernel_forced_on_the_call_is_refused():
    """A session stacked inside with kernel="dense" would run the call without the sparse kernel:
    the selection of the previous call must not be used for it."""
    model = build("llama")
    with sparse_attention(model, SparseConfig(pattern="moba", density=0.3, block_size=BS)):
        with pytest.raises(RuntimeError, match="another kernel"):
            with attach(model, kernel="dense", score_mods=[lambda s, b, h, q, kv: s]):
                model(**inputs())
    with torch.no_grad():
        model(**inputs())  # and the model is itself again


def test_learned_pattern_without_gates_is_a_user_error():
    model = build("llama")
    with pytest.raises(UserError, match="gates"):
        with sparse_attention(model, SparseConfig(pattern="learned_gate")):
            pass
    assert make_gates(model, SparseConfig(pattern="moba")) is None


def test_gates_save_and_load(tmp_path):
    from attnkit.sparse.io import load_gates, save_gates

    model = build("qwen2")
    cfg = SparseConfig(pattern="learned_gate", density=0.3, block_size=BS)
    gates = make_gates(model, cfg)
    with torch.no_grad():
        for p in gates.parameters():
            p.normal_()
    save_gates(gates, cfg, tmp_path / "g")
    loaded, cfg2 = load_gates(model, tmp_path / "g")
    assert cfg2 == cfg
    x = inputs()
    with torch.no_grad():
        with sparse_attention(model, cfg, gates=gates):
            a = model(**x).logits
        with sparse_attention(model, cfg2, gates=loaded):
            b = model(**x).logits
    assert torch.equal(a, b)
    with pytest.raises(UserError, match="does not fit"):
        load_gates(build("gemma"), tmp_path / "g")  # one KV head instead of two
    (tmp_path / "g" / "sparse_gates.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="corrupted"):
        load_gates(model, tmp_path / "g")


def test_flex_attention_on_cpu_inference_equals_portable():
    """FlexAttention (compiled, CPU, no gradients) over the same selection: GQA, a trained gate's
    bias, a padded batch, a partial last block."""
    from attnkit.seam.kernels.flex_block import flex_available

    if not flex_available():
        pytest.skip("this torch has no FlexAttention")
    model = build("llama")
    x = inputs(length=40)
    cfg = SparseConfig(pattern="learned_gate", density=0.4, block_size=16)
    gates = make_gates(model, cfg)
    with torch.no_grad():
        for p in gates.parameters():
            p.normal_(0, 0.5)
        with sparse_attention(model, cfg, gates=gates) as portable:
            a = model(**x).logits
        flex_cfg = SparseConfig(pattern="learned_gate", density=0.4, block_size=16, kernel="flex")
        with sparse_attention(model, flex_cfg, gates=gates) as flex:
            b = model(**x).logits
    assert flex.kernels["flex"] == 2 and portable.kernels["portable"] == 2
    assert (real(a, x) - real(b, x)).abs().max() < 1e-4
    with pytest.raises(UserError, match="FlexAttention"):  # no CPU backward
        with sparse_attention(model, flex_cfg, gates=gates):
            model(**x, labels=x["input_ids"]).loss.backward()


def test_stacks_with_another_sessions_modifiers():
    """A temperature from another session applies inside the sparse kernel too."""
    from attnkit.seam.mods import temperature

    model = build("qwen2")
    x = inputs()
    cfg = SparseConfig(pattern="moba", density=0.4, block_size=BS)
    with (torch.no_grad(), attach(model, score_mods=[temperature(0.5)]),
          sparse_attention(model, cfg, keep_masks=True) as handle):
        out = model(**x).logits
    groups = kv_groups(model, cfg)
    with attach(model, score_mods=[temperature(0.5)], kernel="dense"):
        ref = dense_on_kept_blocks(model, handle.block_masks, x, groups)
    assert (real(out, x) - real(ref, x)).abs().max() < 1e-5


def test_only_the_chosen_layers():
    model = build("llama")
    x = inputs()
    cfg = SparseConfig(pattern="moba", density=0.3, block_size=BS)
    with torch.no_grad(), sparse_attention(model, cfg, layers=[1], keep_masks=True) as handle:
        out = model(**x).logits
    assert set(handle.block_masks) == {Site(1)}
    ref = dense_on_kept_blocks(model, handle.block_masks, x, kv_groups(model, cfg))
    assert (real(out, x) - real(ref, x)).abs().max() < 1e-5


def test_training_step_saves_nothing_t_by_t_per_head():
    """A whole training step of a model at T = 1024 (padded batch, learned gate): no tensor autograd
    keeps has T×T elements per head. The same check on the eager model finds its T×T maps."""
    T_long, bs = 1024, 64
    for impl, sparse in (("eager", False), ("sdpa", True)):
        model = build("llama", impl).train()
        model.config.max_position_embeddings = T_long
        x = inputs(length=T_long, batch=1, pad=7)
        heads = model.config.num_attention_heads
        saved = []

        def pack(t):
            saved.append(t.numel())
            return t

        cfg = SparseConfig(pattern="learned_gate", density=0.25, block_size=bs, checkpoint=False)
        with ExitStack() as stack:
            if sparse:
                stack.enter_context(sparse_attention(model, cfg, gates=make_gates(model, cfg)))
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
            loss = model(**x, labels=x["input_ids"]).loss
        loss.backward()
        largest_per_head = max(saved) / heads
        if sparse:
            assert largest_per_head < T_long * T_long / 2
        else:
            assert largest_per_head >= T_long * T_long  # eager keeps its (B, H, T, T) probabilities


def test_trained_gate_at_density_one():
    """At density 1 a trained gate under "prior" reweights the blocks (not dense); under
    "straight_through" the output is dense whatever the gate, and the gate still gets a gradient."""
    model = build("llama").train()
    x = inputs()
    with torch.no_grad():
        ref = model(**x).logits
    for mode in ("prior", "straight_through"):
        cfg = SparseConfig(pattern="learned_gate", density=1.0, block_size=BS, gate_grad=mode)
        gates = make_gates(model, cfg)
        with torch.no_grad():
            for p in gates.parameters():
                p.normal_(0, 0.5)
        with sparse_attention(model, cfg, gates=gates, keep_masks=True) as handle:
            out = model(**x).logits
            ((out - ref) ** 2).mean().backward()  # any loss: the gate gets its gradient through the term
            bias = handle.block_bias
        diff = (real(out, x) - real(ref, x)).abs().max()
        assert (not bias) if mode == "straight_through" else (set(bias) == {Site(0), Site(1)})
        assert (diff < 1e-5) if mode == "straight_through" else (diff > 1e-3)
        grads = [p.grad for p in gates.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        if mode == "prior":
            assert any(g.abs().sum() > 0 for g in grads)
