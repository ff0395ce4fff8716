"""Multi-path decoding and its training forward, on tiny random models of several architectures."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from attnkit.errors import UserError
from attnkit.paths import blended_logprobs, generate_paths, make_similarity

VOCAB = 13
THINK, EOS = 3, 4


def tiny(arch: str) -> nn.Module:
    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=VOCAB, n_positions=64, bos_token_id=None,
                         eos_token_id=None, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        return GPT2LMHeadModel._from_config(cfg)
    kw = dict(num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, hidden_size=16, intermediate_size=32,
              vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    if arch == "llama":
        return LlamaForCausalLM._from_config(LlamaConfig(**kw))
    return MistralForCausalLM._from_config(MistralConfig(**kw))


ARCHS = ["gpt2", "llama", "mistral"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("seed", [0, 1])
def test_lambda_zero_is_independent_sampling(arch, seed):
    """λ = 0: exactly model.generate's sampling with num_return_sequences = N, draw for draw (no EOS: HF's
    min-length processor would otherwise change the distributions it samples from)."""
    m = tiny(arch)
    ids = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    out = generate_paths(m, ids, n_paths=3, lam=0.0, similarity="jensen_shannon", max_new_tokens=10)
    torch.manual_seed(seed)
    ref = m.generate(ids, do_sample=True, num_return_sequences=3, max_new_tokens=10, top_k=None,
                     top_p=None, temperature=1.0, pad_token_id=0)
    assert torch.equal(out.completion_ids, ref[:, 5:])
    assert torch.equal(out.prompt_ids, ids.repeat_interleave(3, 0))


@pytest.mark.parametrize("arch", ARCHS)
def test_lambda_zero_with_think_end_and_left_padding(arch):
    """Markers, EOS and left-padded prompts do not change λ = 0 sampling either (greedy compares exactly)."""
    m = tiny(arch)
    ids = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    out = generate_paths(m, ids, attention_mask=mask, n_paths=2, lam=0.0, do_sample=False, think_end_id=THINK,
                         max_new_tokens=8)
    ref = m.generate(ids.repeat_interleave(2, 0), attention_mask=mask.repeat_interleave(2, 0), do_sample=False,
                     max_new_tokens=8, pad_token_id=0)
    assert torch.equal(out.completion_ids, ref[:, 5:])
    short = generate_paths(m, ids[:1, 2:], n_paths=2, lam=0.0, do_sample=False, max_new_tokens=8)
    assert torch.equal(short.completion_ids, out.completion_ids[:2])  # padding is invisible


def test_one_path_is_plain_sampling_whatever_lambda():
    m = tiny("llama")
    ids = torch.randint(1, VOCAB, (3, 4))
    a = generate_paths(m, ids, n_paths=1, lam=0.9, max_new_tokens=6, generator=torch.Generator().manual_seed(3))
    b = generate_paths(m, ids, n_paths=1, lam=0.0, max_new_tokens=6, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert a.stats == []  # a path alone never blends


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", ["cosine", "jensen_shannon", "luong", "bahdanau"])
def test_blending_changes_decoding_and_training_forward_replays_it(arch, name):
    m = tiny(arch)
    sim = make_similarity(name, embedding=m.get_input_embeddings(), seed=0) if name in ("luong", "bahdanau") \
        else make_similarity(name)
    ids = torch.randint(5, VOCAB, (2, 4), generator=torch.Generator().manual_seed(1))
    kw = dict(n_paths=4, similarity=sim, lam=0.5, temperature=0.1, think_end_id=THINK, eos_token_id=EOS, max_new_tokens=12)
    out = generate_paths(m, ids, generator=torch.Generator().manual_seed(0), **kw)
    plain = generate_paths(m, ids, generator=torch.Generator().manual_seed(0), **{**kw, "lam": 0.0})
    assert not torch.allclose(out.logprobs, plain.logprobs)  # the blend reaches the model's inputs
    assert out.stats and all(s.rows >= 2 for s in out.stats)
    m.train()
    rep = blended_logprobs(m, sim, ids, out.completion_ids, **{k: v for k, v in kw.items()
                                                               if k not in ("similarity", "max_new_tokens")})
    torch.testing.assert_close(rep.logprobs, out.logprobs, atol=2e-5, rtol=1e-5)
    assert torch.equal(rep.blended_mask, out.blended_mask)
    assert rep.logprobs.requires_grad


def test_masks_follow_the_markers():
    m = tiny("gpt2")
    ids = torch.randint(1, VOCAB, (4, 3), generator=torch.Generator().manual_seed(5))
    out = generate_paths(m, ids, n_paths=4, lam=0.2, think_end_id=THINK, eos_token_id=EOS, pad_token_id=0,
                         max_new_tokens=30, generator=torch.Generator().manual_seed(2))
    c, real, mixed = out.completion_ids, out.completion_mask, out.blended_mask
    for k in range(c.shape[0]):
        toks = c[k].tolist()
        end = toks.index(EOS) if EOS in toks else len(toks) - 1
        assert real[k, : end + 1].all() and not real[k, end + 1:].any()
        assert (c[k, end + 1:] == 0).all() and (out.logprobs[k, end + 1:] == 0).all()
        stop = min([i for i, t in enumerate(toks) if t in (THINK, EOS)] + [len(toks)])
        # tokens before the first marker enter blended; the marker and everything after do not
        assert mixed[k, :stop].all() and not mixed[k, stop:].any()


def test_finished_paths_do_not_influence_the_others():
    """A path that left the thinking phase gives no weight: the others decode as if it were not blended at all."""
    m = tiny("llama")
    ids = torch.randint(5, VOCAB, (1, 4), generator=torch.Generator().manual_seed(0))

    class Spy(nn.Module):  # records the active rows' weights through the similarity's view of the paths
        def __init__(self):
            super().__init__()
            self.inner, self.seen = make_similarity("cosine"), []

        def forward(self, p):
            self.seen.append(p)
            return self.inner(p)

    comp = torch.randint(5, VOCAB, (3, 6))
    comp[0, 1] = THINK  # path 0 ends thinking at step 1
    spy = Spy()
    full = blended_logprobs(m, spy, ids, comp, n_paths=3, lam=0.5, think_end_id=THINK)
    # drop path 0's influence by replacing its later tokens: paths 1 and 2 must not change
    comp2 = comp.clone()
    comp2[0, 2:] = (comp[0, 2:] + 1 - 5) % (VOCAB - 5) + 5
    other = blended_logprobs(m, spy, ids, comp2, n_paths=3, lam=0.5, think_end_id=THINK)
    torch.testing.assert_close(full.logprobs[1:], other.logprobs[1:])
    assert not torch.allclose(full.logprobs[0, 3:], other.logprobs[0, 3:])


@pytest.mark.parametrize("name", ["luong", "bahdanau"])
def test_detached_distributions_still_train_the_similarity(name):
    m = tiny("llama")
    sim = make_similarity(name, embedding=m.get_input_embeddings(), seed=0)
    ids = torch.randint(5, VOCAB, (1, 4), generator=torch.Generator().manual_seed(0))
    out = generate_paths(m, ids, n_paths=3, similarity=sim, lam=0.3, max_new_tokens=6, generator=torch.Generator().manual_seed(0))
    kw = dict(n_paths=3, lam=0.3)
    full = blended_logprobs(m, sim, ids, out.completion_ids, **kw)
    det = blended_logprobs(m, sim, ids, out.completion_ids, detach_distributions=True, **kw)
    torch.testing.assert_close(full.logprobs, det.logprobs)  # the same values, a shorter graph
    det.logprobs.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in sim.parameters())


@pytest.mark.parametrize("name", ["luong", "bahdanau"])
def test_learnable_similarity_gets_gradients_and_moves(name):
    m = tiny("llama")
    m.train()
    sim = make_similarity(name, embedding=m.get_input_embeddings(), seed=0)
    start = [p.detach().clone() for p in sim.parameters()]
    opt = torch.optim.Adam(sim.parameters(), lr=1e-2)
    ids = torch.randint(5, VOCAB, (2, 4), generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    for step in range(4):
        out = generate_paths(m, ids, n_paths=4, similarity=sim, lam=0.3, think_end_id=THINK, max_new_tokens=8, generator=g)
        adv = torch.randn(8, generator=g)
        lp = blended_logprobs(m, sim, ids, out.completion_ids, n_paths=4, lam=0.3, think_end_id=THINK)
        loss = -(adv[:, None] * lp.logprobs * out.completion_mask).sum() / out.completion_mask.sum()
        opt.zero_grad()
        loss.backward()
        for pname, p in sim.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, (step, pname)
        assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
        opt.step()
    assert all(not torch.equal(p.detach(), s) for p, s in zip(sim.parameters(), start))
    assert m.training  # left as found


def test_model_left_as_found_also_on_failure():
    m = tiny("gpt2")
    m.train()

    class Broken(nn.Module):
        def forward(self, p):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        generate_paths(m, torch.ones(1, 3, dtype=torch.long), similarity=Broken(), n_paths=2, max_new_tokens=4)
    assert m.training
    m.eval()
    generate_paths(m, torch.ones(1, 3, dtype=torch.long), n_paths=2, max_new_tokens=2)
    assert not m.training


@pytest.mark.parametrize("kw, match", [
    ({"lam": 1.5}, "lambda"), ({"temperature": 0.0}, "temperature"), ({"n_paths": 0}, "n_paths"),
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"similarity": "nope"}, "unknown similarity"),
    ({"sample_temperature": 0.0}, "sample_temperature"),
])
def test_bad_input_is_a_user_error(kw, match):
    with pytest.raises(UserError, match=match):
        generate_paths(tiny("gpt2"), torch.ones(1, 3, dtype=torch.long), **kw)


def test_bad_shapes_are_user_errors():
    m = tiny("gpt2")
    with pytest.raises(UserError, match="input_ids"):
        generate_paths(m, torch.ones(3, dtype=torch.long))
    with pytest.raises(UserError, match="completions"):
        blended_logprobs(m, "cosine", torch.ones(2, 3, dtype=torch.long), torch.ones(5, 4, dtype=torch.long), n_paths=2)


@pytest.mark.parametrize("name", ["luong", "bahdanau"])
def test_learnable_by_name_projects_through_the_models_embedding(name):
    m = tiny("gpt2")
    out = generate_paths(m, torch.ones(1, 3, dtype=torch.long), similarity=name, n_paths=3, max_new_tokens=4)
    assert out.stats and all(s.rows == 3 for s in out.stats)
    from attnkit.paths.decode import resolve_similarity

    sim = resolve_similarity(name, m)
    assert sim.basis.dim == 16 and sim.basis._borrowed[0] is m.get_input_embeddings().weight  # borrowed, not copied
