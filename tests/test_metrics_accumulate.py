"""``HeadStatsAccumulator`` on planted chunks, its merge, and the per-head statistics the seam
streams into it from real models: against eager maps, under row sampling, in float16."""

from __future__ import annotations

import math

import pytest
import torch

from attnkit.metrics import SPIKE_THRESHOLD, HeadStatsAccumulator, RowChunk
from attnkit.seam import MapCapture, Site, StatsCollector, attach
from conftest import _ids, gpt2

FP16_MAX = 65504.0


def _planted(extra_padding_row: bool = False) -> RowChunk:
    """B=1, H=2, two query rows at key positions 2 and 3 over K=4 visible keys.

    head 0: exactly uniform (logits all 0); head 1: one-hot on key 0 (logits [10, 0, 0, 0]).
    With ``extra_padding_row`` a third, garbage row is added and marked row_valid=False.
    """
    R = 3 if extra_padding_row else 2
    probs = torch.zeros(1, 2, R, 4)
    logits = torch.zeros(1, 2, R, 4)
    probs[0, 0] = 0.25
    probs[0, 1, :, 0] = 1.0
    logits[0, 1, :, 0] = 10.0
    positions = torch.tensor([2, 3] + ([1] if extra_padding_row else []))
    row_valid = torch.ones(1, R, dtype=torch.bool)
    if extra_padding_row:
        probs[0, :, 2] = torch.tensor([0.0, 0.0, 1.0, 0.0])
        logits[0, :, 2] = torch.tensor([-1e4, math.inf, 1e4, math.nan])
        row_valid[0, 2] = False
    qk = logits.abs().amax(-1) / 0.5
    if extra_padding_row:
        qk[0, :, 2] = 1e9
    return RowChunk(
        logits=logits, probs=probs, allowed=torch.ones(1, 1, 1, 4, dtype=torch.bool),
        query_positions=positions, row_valid=row_valid,
        query_norm=torch.full((1, 2, R), 2.0), key_norm_max=torch.full((1, 2), 3.0), scale=0.5, qk_absmax=qk,
    )


def _summary(*chunks: RowChunk) -> list[dict]:
    acc = HeadStatsAccumulator(chunks[0].probs.shape[1])
    for c in chunks:
        acc.update(c)
    return acc.summary()


def test_planted_uniform_and_one_hot_heads():
    uni, hot = _summary(_planted())
    assert uni["rows"] == hot["rows"] == 2
    assert uni["normalized_entropy"] == pytest.approx(1.0, abs=1e-6)
    assert uni["entropy"] == pytest.approx(math.log(4), abs=1e-6)
    assert uni["entropy_std"] == pytest.approx(0.0, abs=1e-6)
    assert uni["effective_keys"] == pytest.approx(4.0, abs=1e-5)
    assert uni["max_attention"] == pytest.approx(0.25)
    assert uni["spike_fraction"] == 0.0
    assert uni["row_std"] == pytest.approx(0.0, abs=1e-6)
    assert uni["max_over_uniform"] == pytest.approx(1.0)
    assert uni["sink_mass"] == pytest.approx(0.25)
    assert uni["sink_ratio"] == pytest.approx(1.0)
    assert uni["diagonal_mass"] == pytest.approx(0.25)
    assert uni["mean_distance"] == pytest.approx((1.0 + 1.5) / 2)  # (2+1+0+1)/4 and (3+2+1+0)/4
    assert uni["logit_range"] == 0.0
    assert uni["log10_curvature"] == pytest.approx(math.log10(2 * 3 * 0.5), abs=1e-6)

    assert hot["normalized_entropy"] == pytest.approx(0.0, abs=1e-7)
    assert hot["entropy"] == pytest.approx(0.0, abs=1e-7)
    assert hot["effective_keys"] == pytest.approx(1.0)
    assert hot["sink_mass"] == 1.0
    assert hot["sink_ratio"] == pytest.approx(4.0)
    assert hot["spike_fraction"] == 1.0
    assert hot["max_attention"] == 1.0
    assert hot["max_over_uniform"] == pytest.approx(4.0)
    assert hot["row_std"] == pytest.approx(math.sqrt(3) / 4, abs=1e-6)
    assert hot["diagonal_mass"] == 0.0
    assert hot["mean_distance"] == pytest.approx(2.5)
    assert hot["logit_max"] == 10.0 and hot["logit_min"] == 0.0 and hot["logit_range"] == pytest.approx(10.0)
    assert hot["qk_absmax"] == pytest.approx(20.0)
    assert hot["log10_curvature"] == pytest.approx(math.log10(3.0) + 20 / math.log(10), rel=1e-6)
    assert hot["log10_curvature_max"] == pytest.approx(hot["log10_curvature"], rel=1e-6)
    for head in (uni, hot):
        assert head["nonfinite_rows"] == 0 and head["nonfinite_logits"] == 0
        assert "entropy_stderr" not in head  # rows were not sampled
    assert SPIKE_THRESHOLD < 1.0


def test_padding_rows_do_not_count():
    with_pad = _summary(_planted(extra_padding_row=True))
    without = _summary(_planted())
    assert with_pad == without  # garbage in the padding row (inf, NaN, huge qk) leaves no trace


def test_rows_with_one_visible_key_are_extremes_only():
    c = _planted()
    c.allowed = torch.tensor([True, False, False, False]).view(1, 1, 1, 4)
    c.probs = torch.zeros(1, 2, 2, 4)
    c.probs[..., 0] = 1.0
    c.logits = torch.full((1, 2, 2, 4), -math.inf)
    c.logits[..., 0] = 7.0
    s = HeadStatsAccumulator(2)
    s.update(c)
    head = s.summary()[0]
    assert head["rows"] == 0 and float(s.total_rows[0]) == 2
    assert math.isnan(head["entropy"]) and math.isnan(head["normalized_entropy"])
    assert head["logit_max"] == 7.0 == head["logit_min"]
    assert head["nonfinite_rows"] == 0  # -inf on masked keys is not an overflow


def test_inf_logits_are_counted_as_nonfinite_rows():
    c = _planted()
    c.logits = c.logits.clone()
    c.logits[0, 1, 0, 2] = math.inf  # head 1, row 0: an overflowed visible logit
    c.probs = c.probs.clone()
    c.probs[0, 1, 0] = math.nan
    c.qk_absmax = c.qk_absmax.clone()
    c.qk_absmax[0, 1, 0] = math.inf
    uni, hot = _summary(c)
    assert uni["nonfinite_rows"] == 0 and uni["rows"] == 2
    assert hot["nonfinite_rows"] == 1
    assert hot["nonfinite_logits"] == 1
    assert hot["rows"] == 1  # the broken row is left out of the means ...
    assert hot["entropy"] == pytest.approx(0.0, abs=1e-7)  # ... which stay finite
    assert hot["logit_max"] == math.inf  # ... but shows in the extremes
    assert hot["qk_absmax"] == math.inf


def _random_chunk(seed: int, B=2, H=3, Q=5, K=7) -> RowChunk:
    g = torch.Generator().manual_seed(seed)
    allowed = (torch.arange(K)[None, :] <= torch.arange(Q)[:, None] + (K - Q)).view(1, 1, Q, K)
    logits = (torch.randn(B, H, Q, K, generator=g) * 3).masked_fill(~allowed, -math.inf)
    row_valid = torch.rand(B, Q, generator=g) > 0.2
    q_norm = torch.rand(B, H, Q, generator=g) + 0.5
    return RowChunk(
        logits=logits, probs=torch.softmax(logits, -1), allowed=allowed,
        query_positions=torch.arange(Q) + (K - Q), row_valid=row_valid, query_norm=q_norm,
        key_norm_max=torch.rand(B, H, generator=g) + 1, scale=0.3,
        qk_absmax=logits.masked_fill(~allowed, 0).abs().amax(-1) / 0.3,
    )


def test_merge_equals_one_accumulator_fed_both():
    c1, c2, c3 = _random_chunk(1), _random_chunk(2), _random_chunk(3, B=1)
    a, b, both = HeadStatsAccumulator(3), HeadStatsAccumulator(3), HeadStatsAccumulator(3)
    a.update(c1)
    b.update(c2)
    b.update(c3)
    for c in (c1, c2, c3):
        both.update(c)
        both.close_sequences()  # each chunk is a forward of its own, as in a and b
    a.merge(b)
    for got, want in zip(a.summary(), both.summary()):
        assert got.keys() == want.keys()
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-12, abs=1e-12, nan_ok=True), k
    # and the merge is not a no-op
    assert a.summary()[0]["rows"] > HeadStatsAccumulator(3).summary()[0]["rows"]


def test_merge_keeps_the_sampling_flag():
    a, b = HeadStatsAccumulator(3), HeadStatsAccumulator(3)
    b.sampled_rows_of = 5
    a.update(_random_chunk(1))
    b.update(_random_chunk(2))
    a.merge(b)
    assert all("entropy_stderr" in head for head in a.summary())


# --------------------------------------------------------------------------- through the seam
def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -torch.special.xlogy(p.double(), p.double()).sum(-1)


def test_stats_collector_matches_eager_maps_and_skips_padding_queries():
    model = gpt2()
    ids = _ids(2, 10)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0
    with torch.no_grad():
        ref = model(ids, attention_mask=mask, output_attentions=True)
    stats = StatsCollector()
    with torch.no_grad(), attach(model, taps=[stats]) as session:
        session.query_mask = mask.bool()
        model(ids, attention_mask=mask)
    # rows that count: real queries that see >= 2 keys: 9 in sequence 0, 6 in sequence 1
    use = torch.zeros(2, 10, dtype=torch.bool)
    use[0, 1:] = True
    use[1, 4:] = True
    for head in stats.heads():
        p = ref.attentions[head["layer"]][:, head["head"]]  # (B, Q, K)
        assert head["rows"] == 15
        assert head["entropy"] == pytest.approx(_entropy(p)[use].mean().item(), abs=1e-5)
        first = torch.tensor([0, 3])[:, None].expand(2, 10)
        sink = p.gather(-1, first[..., None]).squeeze(-1)  # mass on the first real key
        assert head["sink_mass"] == pytest.approx(sink[use].mean().item(), abs=1e-5)
        diag = p.diagonal(dim1=-2, dim2=-1)
        assert head["diagonal_mass"] == pytest.approx(diag[use].mean().item(), abs=1e-5)


def test_row_sampling_is_within_standard_errors_of_all_rows():
    model = gpt2(layers=2)
    ids = _ids(4, 64, seed=3)
    full, sampled = StatsCollector(), StatsCollector()
    with torch.no_grad():
        with attach(model, taps=[full]):
            model(ids)
        with attach(model, taps=[sampled], sample_rows=8, seed=1234):
            model(ids)
    assert sampled.sampled and not full.sampled
    z = []
    for f, s in zip(full.heads(), sampled.heads()):
        assert (f["layer"], f["head"]) == (s["layer"], s["head"])
        assert f["rows"] == 4 * 63
        assert 4 * 7 <= s["rows"] <= 4 * 8  # 8 rows per sequence; row 0 sees one key and drops out
        assert "entropy_stderr" not in f
        se = s["entropy_stderr"]
        assert 0 < se < f["entropy_std"]
        z.append((s["entropy"] - f["entropy"]) / se)
    assert max(abs(v) for v in z) < 4.0, z
    # a sample of 8 rows is not the whole: the estimates differ from the full means
    assert any(abs(v) > 1e-3 for v in z)


def test_entropy_stderr_is_calibrated_over_seeds():
    """Across many samples the z-scores have spread ~1 (<= 1 is conservative). Counting rows instead
    of sampled positions (4 sequences share each position) gave a spread of ~1.9 here."""
    model = gpt2(layers=2)
    ids = _ids(4, 64, seed=3)
    full = StatsCollector()
    with torch.no_grad():
        with attach(model, taps=[full]):
            model(ids)
        z = []
        for seed in range(30):
            s = StatsCollector()
            with attach(model, taps=[s], sample_rows=8, seed=seed):
                model(ids)
            z += [(x["entropy"] - f["entropy"]) / x["entropy_stderr"] for f, x in zip(full.heads(), s.heads())]
    z = torch.tensor(z)
    assert 0.5 < z.std().item() < 1.4, z.std()
    assert (z.abs() > 3).float().mean().item() < 0.03


def test_sampling_is_reproducible_with_a_seed():
    model, ids = gpt2(), _ids(2, 32)
    runs = []
    for _ in range(2):
        st = StatsCollector()
        with torch.no_grad(), attach(model, taps=[st], sample_rows=4, seed=7):
            model(ids)
        runs.append([h["entropy"] for h in st.heads()])
    assert runs[0] == runs[1]


def test_fp16_overflow_is_seen_at_exactly_that_layer_and_head():
    model = gpt2("sdpa", dtype=torch.float16)
    with torch.no_grad():
        w = model.transformer.h[1].attn.c_attn.weight  # Conv1D: (in, 3 * width); q then k then v
        w[:, 2 * 8 : 3 * 8] *= 300.0  # layer 1, head 2, query
        w[:, 32 + 2 * 8 : 32 + 3 * 8] *= 300.0  # layer 1, head 2, key
    stats = StatsCollector()
    cap = MapCapture(keep_logits=True)
    with torch.no_grad(), attach(model, taps=[stats, cap]):
        model(_ids(2, 12))
    assert stats.dtypes == {Site(0): torch.float16, Site(1): torch.float16}
    for head in stats.heads():
        broken = (head["layer"], head["head"]) == (1, 2)
        if broken:
            assert head["qk_absmax"] > FP16_MAX
            assert head["nonfinite_rows"] > 0
            assert not torch.isfinite(cap.logits[1][:, 2][..., torch.tril(torch.ones(12, 12)) > 0]).all()
        else:
            assert head["qk_absmax"] < FP16_MAX, (head["layer"], head["head"])
            assert head["nonfinite_rows"] == 0, (head["layer"], head["head"])
    assert torch.isfinite(cap.maps[0]).all()
