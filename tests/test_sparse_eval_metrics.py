"""The fidelity metrics of ``attnkit sparse eval`` (attnkit.metrics.fidelity) against hand references,
including the edge cases: all-padding rows, repeated tokens, rows with nothing kept."""

from __future__ import annotations

import math

import pytest
import torch

from attnkit.metrics.fidelity import (ProbError, cosine, distill_kl, mean_pool, next_token_kl, next_token_nll,
                                      perplexity, restricted_softmax, row_cosines, smallest_density, top1_accuracy,
                                      top1_agreement)


def _kl_by_hand(p_logits, q_logits):
    p = [math.exp(x) for x in p_logits]
    q = [math.exp(x) for x in q_logits]
    p = [x / sum(p) for x in p]
    q = [x / sum(q) for x in q]
    return sum(a * math.log(a / b) for a, b in zip(p, q))


def test_next_token_kl_matches_the_sum_by_hand_and_skips_padding():
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    valid = torch.tensor([[True, True, False], [True, False, False]])
    want = [_kl_by_hand(t[b, i].tolist(), s[b, i].tolist()) for b, i in ((0, 0), (0, 1), (1, 0))]
    assert float(next_token_kl(t, s, valid)) == pytest.approx(sum(want) / 3, rel=1e-12)
    assert float(next_token_kl(t, t)) == 0.0
    assert float(next_token_kl(t, s, torch.zeros(2, 3, dtype=torch.bool))) == 0.0  # all padding: 0, not NaN


def test_distillation_loss_equals_the_kl_and_its_gradient_is_q_minus_p():
    g = torch.Generator().manual_seed(1)
    t, s = torch.randn(1, 4, 6, generator=g), torch.randn(1, 4, 6, generator=g, requires_grad=True)
    loss = distill_kl(t, s)
    assert float(loss.detach()) == pytest.approx(float(next_token_kl(t, s.detach())), rel=1e-5)
    loss.backward()
    want = (torch.softmax(s.detach(), -1) - torch.softmax(t, -1)) / 4
    assert torch.allclose(s.grad, want, atol=1e-6)


def test_perplexity_accuracy_agreement_by_hand():
    V = 7
    uniform = torch.zeros(1, 5, V)
    ids = torch.tensor([[1, 2, 3, 3, 3]])  # repeated tokens are ordinary tokens
    assert perplexity(uniform, ids) == pytest.approx(V)
    logits = torch.full((1, 5, V), -5.0)
    for pos, tok in enumerate([2, 3, 0, 3]):  # predicts ids[1:] except position 2
        logits[0, pos, tok] = 5.0
    assert top1_accuracy(logits, ids) == pytest.approx(3 / 4)
    nll = -torch.log_softmax(logits[0, :4].double(), -1)[torch.arange(4), ids[0, 1:]].mean()
    assert float(next_token_nll(logits, ids)) == pytest.approx(float(nll), rel=1e-12)
    valid = torch.tensor([[True, True, True, False, False]])  # only pairs (0,1) and (1,2) count
    assert top1_accuracy(logits, ids, valid) == 1.0
    other = logits.clone()
    other[0, 0] = other[0, 0].flip(-1)
    assert top1_agreement(logits, other) == pytest.approx(4 / 5)
    assert top1_agreement(logits, other, torch.zeros(1, 5, dtype=torch.bool)) == 0.0


def test_cosines():
    a, b = torch.tensor([1.0, 2.0, 2.0]), torch.tensor([2.0, 0.0, 1.0])
    assert cosine(a, b) == pytest.approx(4 / (3 * math.sqrt(5)))
    assert cosine(torch.zeros(3), torch.zeros(3)) == 1.0 and cosine(torch.zeros(3), a) == 0.0
    rows = row_cosines(torch.stack([a, a]), torch.stack([b, -a]))
    assert rows.tolist() == pytest.approx([4 / (3 * math.sqrt(5)), -1.0])


def test_mean_pool_skips_padding_and_an_all_padding_sequence_is_zero():
    h = torch.arange(12.0).view(2, 3, 2)
    valid = torch.tensor([[True, True, False], [False, False, False]])
    out = mean_pool(h, valid)
    assert out[0].tolist() == [1.0, 2.0] and out[1].tolist() == [0.0, 0.0]


def test_probability_error_by_hand():
    p = torch.tensor([0.5, 0.3, 0.2, 0.0]).view(1, 1, 1, 4)
    allowed = torch.tensor([True, True, True, False]).view(1, 1, 1, 4)  # key 3 is in the future
    kept = torch.tensor([True, True, False, False]).view(1, 1, 1, 4)
    q = torch.tensor([0.625, 0.375, 0.0, 0.0]).view(1, 1, 1, 4)
    err = ProbError()
    err.add(p, q, kept, allowed)
    assert err.entries == 3 and err.rows == 1
    assert err.sq_kept == pytest.approx(0.125**2 + 0.075**2)
    assert err.sq_dropped == pytest.approx(0.04)
    assert err.mse == pytest.approx((0.125**2 + 0.075**2 + 0.04) / 3)
    assert err.mean_dropped_mass == pytest.approx(0.2)
    pad = ProbError()
    pad.add(p, q, kept, allowed, row_valid=torch.tensor([[False]]))  # an all-padding row counts for nothing
    assert pad.entries == 0 and pad.mse == 0.0
    err += pad
    assert err.entries == 3


def test_restricted_softmax_is_the_softmax_of_the_kept_keys():
    logits = torch.tensor([[1.0, 2.0, 0.5, -1.0], [0.0, 0.0, 0.0, 0.0]])
    keep = torch.tensor([[True, False, True, True], [False, False, False, False]])
    out = restricted_softmax(logits, keep)
    want = torch.softmax(torch.tensor([1.0, 0.5, -1.0], dtype=torch.float64), -1)
    assert torch.allclose(out[0, [0, 2, 3]], want) and out[0, 1] == 0
    assert out[1].abs().sum() == 0  # nothing kept: zeros, not NaN


def test_smallest_density_needs_the_target_at_every_larger_density():
    pts = [(0.125, 0.01), (0.25, 0.0009), (0.5, 0.0001), (1.0, 0.0)]
    assert smallest_density(pts, lambda v: v <= 0.001) == 0.25
    assert smallest_density([(0.125, 0.0), (0.25, 0.5), (0.5, 0.0)], lambda v: v <= 0.001) == 0.5  # not 0.125
    assert smallest_density([(0.5, 0.1)], lambda v: v <= 0.001) is None
