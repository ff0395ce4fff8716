"""Per-row statistics (``attnkit.metrics.rows``) against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from attnkit.metrics import rows as R


def t(*values, dtype=torch.float32):
    """A (1, 1, R, K) tensor from nested row lists."""
    return torch.tensor(values, dtype=dtype).view(1, 1, len(values), -1)


def b(*values):
    return torch.tensor(values, dtype=torch.bool).view(1, 1, len(values), -1)


def test_entropy_hand_values():
    got = R.entropy(t([0.5, 0.5, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], [0.7, 0.2, 0.1, 0.0]))
    want = torch.tensor([math.log(2), 0.0, math.log(4),
                         -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))])
    torch.testing.assert_close(got.flatten(), want, atol=1e-6, rtol=0)
    assert got[0, 0, 1] == 0  # exactly: 0 log 0 = 0 and 1 log 1 = 0


def test_normalized_entropy_and_effective_keys():
    probs = t([0.25] * 4 + [0.0] * 4, [1.0] + [0.0] * 7, [0.5, 0.5] + [0.0] * 6)
    n_visible = torch.tensor([4, 1, 8]).view(1, 1, 3)
    h = R.entropy(probs)
    ne = R.normalized_entropy(h, n_visible)
    assert ne[0, 0, 0].item() == pytest.approx(1.0, abs=1e-6)  # uniform over its 4 visible keys
    assert math.isnan(ne[0, 0, 1].item())  # one visible key: undefined
    assert ne[0, 0, 2].item() == pytest.approx(math.log(2) / math.log(8), abs=1e-6)
    torch.testing.assert_close(R.effective_keys(h).flatten(), torch.tensor([4.0, 1.0, 2.0]), atol=1e-5, rtol=0)


def test_visible_keys_broadcasts():
    allowed = torch.tril(torch.ones(4, 4, dtype=torch.bool)).view(1, 1, 4, 4)
    got = R.visible_keys(allowed, torch.Size([2, 3, 4, 4]))
    assert got.shape == (2, 3, 4)
    assert got[1, 2].tolist() == [1, 2, 3, 4]


def test_std_over_visible_is_population_std_of_visible_weights():
    rows = [[0.7, 0.2, 0.1, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0, 0.0], [0.2] * 5]
    allowed = b([True, True, True, False, False], [True, True, False, False, False], [True] * 5)
    probs = t(*rows)
    n = R.visible_keys(allowed, probs.shape)
    got = R.std_over_visible(probs, allowed, n).flatten()
    want = [torch.tensor(r[:k], dtype=torch.float64).std(unbiased=False).item() for r, k in zip(rows, (3, 2, 5))]
    assert got.tolist() == pytest.approx(want, abs=1e-6)
    assert want[0] > 0.2  # not a degenerate case
    assert R.max_probability(probs).flatten().tolist() == pytest.approx([0.7, 0.5, 0.2])


def test_logit_max_min_ignore_masked_keys():
    logits = t([1.0, -3.0, 50.0, -50.0], [2.0, 0.5, -math.inf, -math.inf])
    allowed = b([True, True, False, False], [True, True, False, False])
    assert R.logit_max(logits, allowed).flatten().tolist() == [1.0, 2.0]
    assert R.logit_min(logits, allowed).flatten().tolist() == [-3.0, 0.5]


def test_sink_mass_is_first_visible_key():
    probs = t([0.0, 0.0, 0.3, 0.7], [0.6, 0.4, 0.0, 0.0])
    allowed = b([False, False, True, True], [True, True, False, False])  # row 0 left-padded by 2
    assert R.first_visible_index(allowed, probs.shape).flatten().tolist() == [2, 0]
    assert R.sink_mass(probs, allowed).flatten().tolist() == pytest.approx([0.3, 0.6])


def test_diagonal_mass_uses_query_positions():
    probs = t([0.1, 0.2, 0.7, 0.0], [0.25, 0.25, 0.25, 0.25])
    # rows are queries at key positions 2 and 3 (e.g. the last 2 of 4 with a KV cache)
    got = R.diagonal_mass(probs, torch.tensor([2, 3]))
    assert got.flatten().tolist() == pytest.approx([0.7, 0.25])
    got = R.diagonal_mass(probs, torch.tensor([0, 1]))
    assert got.flatten().tolist() == pytest.approx([0.1, 0.25])


def test_mean_distance():
    probs = t([0.5, 0.5, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0])
    got = R.mean_distance(probs, torch.tensor([2, 2, 2]))
    assert got.flatten().tolist() == pytest.approx([1.5, 0.0, 2.0])


def test_log10_curvature_formula():
    qn = torch.tensor([[2.0, 0.5]])
    kn = torch.tensor([[3.0]])
    rng = torch.tensor([[1.5, 30.0]])
    scale = 0.125
    got = R.log10_curvature(qn, kn, scale, rng)
    want = [math.log10(2.0 * 3.0 * scale * math.exp(2 * 1.5)), math.log10(0.5 * 3.0 * scale) + 60.0 / math.log(10)]
    assert got.flatten().tolist() == pytest.approx(want, rel=1e-6)
    # past a logit range of ~44 exp(2*range) overflows float32; the log10 form stays finite
    assert math.isfinite(R.log10_curvature(qn, kn, scale, torch.tensor([[100.0, 100.0]]))[0, 1].item())
