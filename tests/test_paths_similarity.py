"""attnkit.paths similarities and weights, by category: every registered variant on every kind of distribution,
each against a float64 reference written out pair by pair (not the vectorised code under test)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from attnkit.errors import UserError
from attnkit.paths import SIMILARITIES, make_similarity, path_weights, register_similarity, weight_stats
from attnkit.paths.similarity.bahdanau import Bahdanau
from attnkit.paths.similarity.luong import Luong

V, N = 11, 4
LEARNABLE = {"luong", "bahdanau"}


def build(name: str, vocab: int = V, embedding: torch.Tensor | None = None) -> nn.Module:
    if name == "luong":
        return make_similarity(name, vocab_size=vocab, embedding=embedding, rank=5, seed=0)
    if name == "bahdanau":
        return make_similarity(name, vocab_size=vocab, embedding=embedding, dim=6, seed=0)
    return make_similarity(name)


def distributions(kind: str, vocab: int = V, n: int = N, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(hash(kind) % 1000)
    if kind == "random":
        return torch.softmax(torch.randn(batch, n, vocab, generator=g) * 2, -1)
    if kind == "peaked":  # exact zeros (one-hot) and softmax of huge logits
        p = torch.softmax(torch.randn(batch, n, vocab, generator=g) * 80, -1)
        p[:, 0] = 0.0
        p[:, 0, 3] = 1.0
        return p
    if kind == "near_uniform":
        return torch.softmax(torch.randn(batch, n, vocab, generator=g) * 1e-6, -1)
    if kind == "identical":
        return torch.softmax(torch.randn(1, 1, vocab, generator=g), -1).expand(batch, n, vocab).clone()
    raise ValueError(kind)


KINDS = ["random", "peaked", "near_uniform", "identical"]


# ------------------------------------------------------------------ independent references (float64, per pair)

def ref_pair(name: str, sim: nn.Module, pi: np.ndarray, pj: np.ndarray) -> float:
    if name == "cosine":
        return float(pi @ pj / (np.linalg.norm(pi) * np.linalg.norm(pj)))
    if name == "raw_dot":
        return float(pi @ pj)
    if name == "scaled_dot":
        return float(pi @ pj / math.sqrt(len(pi)))
    if name == "bhattacharyya":
        return float(sum(math.sqrt(a * b) for a, b in zip(pi, pj)))
    if name == "jensen_shannon":
        m = (pi + pj) / 2
        kl = lambda p, q: sum(a * math.log2(a / b) for a, b in zip(p, q) if a > 0)  # noqa: E731
        return 1.0 - math.sqrt(max(0.0, 0.5 * kl(pi, m) + 0.5 * kl(pj, m)))
    q_i, q_j = pi, pj  # vocabulary basis in these references
    if name == "luong":
        u, v = sim.u.detach().double().numpy(), sim.v.detach().double().numpy()
        return float((q_i @ u) @ (q_j @ v))
    if name == "bahdanau":
        w1, b1 = sim.w1.weight.detach().double().numpy(), sim.w1.bias.detach().double().numpy()
        w2, vv = sim.w2.weight.detach().double().numpy(), sim.v.detach().double().numpy()
        return float(vv @ np.tanh(w1 @ q_i + b1 + w2 @ q_j))
    raise KeyError(name)


@pytest.mark.parametrize("name", sorted(SIMILARITIES))
@pytest.mark.parametrize("kind", KINDS)
def test_similarity_matches_reference_and_is_finite(name, kind):
    sim = build(name)
    p = distributions(kind)
    s = sim(p)
    assert s.shape == (2, N, N) and s.dtype == torch.float32
    assert torch.isfinite(s).all()
    pd = p.double().numpy()
    ref = np.array([[[ref_pair(name, sim, pd[b, i], pd[b, j]) for j in range(N)] for i in range(N)] for b in range(2)])
    # JSD near 0 is sqrt of a rounding error: 1 - sqrt(1e-7) vs 1 - sqrt(0) differ by 3e-4 in float32
    atol = 2e-3 if name == "jensen_shannon" else 1e-5
    np.testing.assert_allclose(s.detach().double().numpy(), ref, atol=atol, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(SIMILARITIES))
def test_unbatched_and_half_precision(name):
    sim = build(name)
    p = distributions("random")[0]  # (N, V)
    s = sim(p)
    assert s.shape == (N, N)
    s16 = sim(p.to(torch.bfloat16))
    assert s16.dtype == torch.float32 and torch.isfinite(s16).all()


@pytest.mark.parametrize("name", ["cosine", "jensen_shannon", "bhattacharyya"])
def test_identical_distributions_score_one(name):
    s = build(name)(distributions("identical"))
    torch.testing.assert_close(s, torch.ones_like(s), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["cosine", "raw_dot", "jensen_shannon", "bhattacharyya"])
def test_bounded_in_unit_interval(name):
    for kind in KINDS:
        s = build(name)(distributions(kind))
        assert (s >= -1e-6).all() and (s <= 1 + 1e-6).all(), kind


@pytest.mark.parametrize("name", ["cosine", "raw_dot", "scaled_dot", "jensen_shannon", "bhattacharyya"])
def test_large_vocabulary_near_uniform(name):
    """150k tokens, near-uniform: squares of 1/V are 4e-11 -- nothing may underflow to 0/0."""
    p = distributions("near_uniform", vocab=150_000, n=4, batch=1)
    s = build(name)(p)
    assert torch.isfinite(s).all()
    a = path_weights(s, temperature=0.1)
    assert torch.isfinite(a).all()


# ------------------------------------------------------------------ hand-computed examples, one per variant

HAND = {  # p1 = (0.5, 0.5, 0), p2 = (0, 1, 0)
    "cosine": 0.5 / math.sqrt(0.5),  # 0.7071
    "raw_dot": 0.5,
    "scaled_dot": 0.5 / math.sqrt(3),
    "bhattacharyya": math.sqrt(0.5),
    # m = (0.25, 0.75, 0): KL(p1||m) = 0.5 log2 2 + 0.5 log2(2/3); KL(p2||m) = log2(4/3)
    "jensen_shannon": 1 - math.sqrt(0.5 * (0.5 + 0.5 * math.log2(2 / 3)) + 0.5 * math.log2(4 / 3)),
}


@pytest.mark.parametrize("name", sorted(HAND))
def test_hand_computed_parameter_free(name):
    p = torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0]])
    assert build(name, vocab=3)(p)[0, 1].item() == pytest.approx(HAND[name], abs=1e-6)


def test_hand_computed_luong():
    sim = Luong(vocab_size=3, rank=2)
    with torch.no_grad():
        sim.u.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]))
        sim.v.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0], [3.0, 0.0]]))
    p = torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0]])
    # p1 U = (0.5, 1.0); p2 V = (1, 0): S_12 = 0.5.  p2 U = (0, 2); p1 V = (0.5, 0.5): S_21 = 1.0
    s = sim(p)
    assert s[0, 1].item() == pytest.approx(0.5) and s[1, 0].item() == pytest.approx(1.0)


def test_hand_computed_bahdanau():
    sim = Bahdanau(vocab_size=2, dim=2)
    with torch.no_grad():
        sim.w1.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        sim.w1.bias.copy_(torch.tensor([0.5, 0.0]))
        sim.w2.weight.copy_(torch.tensor([[0.0, 2.0], [1.0, 0.0]]))
        sim.v.copy_(torch.tensor([1.0, -1.0]))
    p = torch.tensor([[1.0, 0.0], [0.25, 0.75]])
    # W1 p1 + b = (1.5, 0); W2 p2 = (1.5, 0.25): S_12 = tanh(3) - tanh(0.25)
    assert sim(p)[0, 1].item() == pytest.approx(math.tanh(3.0) - math.tanh(0.25), abs=1e-6)


def test_learnable_through_the_embedding_matches_reference():
    """Embedding basis: the same as the vocabulary basis on q = p E / mean row norm."""
    emb = torch.randn(V, 6)
    p = distributions("random")
    q = p.double() @ (emb.double() / emb.double().pow(2).sum(-1).mean().sqrt())
    sim = Luong(embedding=nn.Embedding.from_pretrained(emb), rank=3, seed=1)
    ref = (q @ sim.u.double()) @ (q @ sim.v.double()).transpose(-1, -2)
    torch.testing.assert_close(sim(p).double(), ref.detach(), atol=1e-5, rtol=1e-5)
    assert [n for n, _ in sim.named_parameters()] == ["u", "v"]  # the borrowed embedding is not a parameter
    assert set(sim.state_dict()) == {"u", "v"}


def test_parameter_counts_at_150k():
    assert Luong.parameter_count(150_000, 128) == 38_400_000
    assert Luong.parameter_count(2048, 128) == 524_288
    assert Bahdanau.parameter_count(150_000, 256) == 76_800_512
    assert Bahdanau.parameter_count(2048, 256) == 1_049_088
    for cls, kw, count in [(Luong, {"rank": 7}, Luong.parameter_count(13, 7)),
                           (Bahdanau, {"dim": 5}, Bahdanau.parameter_count(13, 5))]:
        assert sum(p.numel() for p in cls(vocab_size=13, **kw).parameters()) == count
        assert sum(p.numel() for p in cls(embedding=torch.randn(1000, 13), **kw).parameters()) == count


# ------------------------------------------------------------------ gradients

@pytest.mark.parametrize("name", sorted(LEARNABLE))
@pytest.mark.parametrize("basis", ["vocab", "embedding"])
def test_learnable_gradients_finite_nonzero(name, basis):
    emb = torch.randn(V, 8) if basis == "embedding" else None
    sim = build(name, embedding=emb)
    for kind in KINDS:
        sim.zero_grad()
        p = distributions(kind)
        a = path_weights(sim(p), temperature=0.1)
        target = torch.softmax(torch.randn(2, N, N), -1)
        loss = (a * target).sum() + sim(p).pow(2).mean()
        loss.backward()
        for pname, prm in sim.named_parameters():
            assert prm.grad is not None and torch.isfinite(prm.grad).all(), (kind, pname)
            assert prm.grad.abs().sum() > 0, (kind, pname)


@pytest.mark.parametrize("name", sorted(SIMILARITIES))
def test_gradients_wrt_distributions_are_finite(name):
    """The training forward differentiates through p (the model's logits) for every variant."""
    sim = build(name)
    for kind in KINDS:
        logits = (torch.log(distributions(kind).clamp_min(1e-30))).requires_grad_(True)
        a = path_weights(sim(torch.softmax(logits, -1)), temperature=0.1)
        (a * torch.arange(N * N, dtype=torch.float32).view(N, N)).sum().backward()
        assert torch.isfinite(logits.grad).all(), kind


@pytest.mark.parametrize("name", sorted(SIMILARITIES))
def test_gradcheck_float64(name):
    sim = build(name).double()
    logits = torch.randn(1, 3, 5, dtype=torch.float64, requires_grad=True)
    if name in LEARNABLE:
        sim = build(name, vocab=5).double()
    assert torch.autograd.gradcheck(lambda x: sim(torch.softmax(x, -1)), (logits,), eps=1e-6, atol=1e-5)


# ------------------------------------------------------------------ weights: the shared softmax and masking

@pytest.mark.parametrize("name", sorted(SIMILARITIES))
@pytest.mark.parametrize("kind", KINDS)
def test_weights_rows_diagonal_and_inactive(name, kind):
    s = build(name)(distributions(kind))
    active = torch.tensor([[True, False, True, True], [True, False, False, False]])
    a = path_weights(s, active, temperature=0.1)
    assert a.shape == (2, N, N) and torch.isfinite(a).all()
    assert (torch.diagonal(a, dim1=-2, dim2=-1) == 0).all()
    assert (a[0, 1] == 0).all() and (a[0, :, 1] == 0).all()  # inactive path 1: gives and gets nothing
    torch.testing.assert_close(a[0, [0, 2, 3]].sum(-1), torch.ones(3))
    assert (a[1] == 0).all()  # path 0 is alone in group 1: zero blend; the others are inactive


def test_weights_hand_computed():
    s = torch.tensor([[0.0, 0.3, 0.1], [0.3, 0.0, 0.2], [0.1, 0.2, 0.0]])
    a = path_weights(s, temperature=0.1)
    e = lambda x: math.exp(x / 0.1)  # noqa: E731
    assert a[0, 1].item() == pytest.approx(e(0.3) / (e(0.3) + e(0.1)))
    assert a[2, 1].item() == pytest.approx(e(0.2) / (e(0.1) + e(0.2)))
    st = weight_stats(a, s)
    rows = [[e(0.3) / (e(0.3) + e(0.1)), e(0.1) / (e(0.3) + e(0.1))], [e(0.3) / (e(0.3) + e(0.2)), e(0.2) / (e(0.3) + e(0.2))],
            [e(0.1) / (e(0.1) + e(0.2)), e(0.2) / (e(0.1) + e(0.2))]]
    assert st.rows == 3
    assert st.entropy == pytest.approx(np.mean([-sum(w * math.log(w) for w in r) for r in rows]), rel=1e-5)
    assert st.max_weight == pytest.approx(np.mean([max(r) for r in rows]), rel=1e-5)
    assert st.weight_var == pytest.approx(np.mean([np.var(r) for r in rows]), rel=1e-4)
    assert (st.sim_min, st.sim_max) == (pytest.approx(0.1), pytest.approx(0.3))


def test_weights_temperature_and_errors():
    s = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert path_weights(s, temperature=1e-3)[0, 1] == pytest.approx(1.0)
    torch.testing.assert_close(path_weights(s, temperature=1e6)[0], torch.tensor([0.0, 0.5, 0.5]))
    with pytest.raises(UserError, match="temperature"):
        path_weights(s, temperature=0.0)
    with pytest.raises(UserError, match="do not match"):
        path_weights(s, torch.ones(4, dtype=torch.bool))
    assert weight_stats(torch.zeros(3, 3), s, torch.tensor([True, False, False])).rows == 0


# ------------------------------------------------------------------ registry

def test_registry_new_variant_and_errors():
    @register_similarity("test_negative_l1")
    class NegL1(nn.Module):
        def forward(self, p):
            return -(p.unsqueeze(-2) - p.unsqueeze(-3)).abs().sum(-1)

    try:
        assert isinstance(make_similarity("test_negative_l1"), NegL1)
        from attnkit.paths import generate_paths  # a registered name is usable by the decoder at once
        from transformers import GPT2Config, GPT2LMHeadModel

        m = GPT2LMHeadModel._from_config(GPT2Config(n_layer=1, n_head=1, n_embd=8, vocab_size=9, n_positions=16,
                                                   bos_token_id=0, eos_token_id=0))
        out = generate_paths(m, torch.ones(1, 2, dtype=torch.long), similarity="test_negative_l1", max_new_tokens=3)
        assert out.completion_ids.shape == (4, 3)
        with pytest.raises(ValueError, match="already registered"):
            register_similarity("test_negative_l1")(type("Other", (nn.Module,), {}))
    finally:
        SIMILARITIES.pop("test_negative_l1")
    with pytest.raises(UserError, match="unknown similarity"):
        make_similarity("nope")
    with pytest.raises(UserError, match="vocab_size"):
        make_similarity("luong")
    with pytest.raises(UserError, match="tokens"):
        Luong(vocab_size=5, rank=2)(torch.full((3, 4), 0.25))
