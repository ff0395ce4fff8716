"""The fused statistics kernel (``attnkit.metrics.fused``) against the plain per-row functions of
``metrics/rows.py`` on a float64 softmax, and the accumulator fed by it against the accumulator
fed probabilities: random chunks with causal, padded and sliding-window masks, NaN / inf logits,
padding rows and rows that see one key or none; eager and compiled."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from attnkit.metrics import HeadStatsAccumulator, RowChunk
from attnkit.metrics import fused
from attnkit.metrics import rows as R

STAT_FIELDS = ("entropy", "max_prob", "sum_sq", "sink_mass", "diagonal_mass", "mean_distance")


def _chunk(seed: int, B=2, H=3, Rn=7, K=11, dtype=torch.float32, plant=True):
    """Raw scores (B, H, R, K), scale, per-row intervals (B, 1, R), query positions (R,).

    Batch 0 is causal (rows at the last R key positions), batch 1 left-padded by 2 keys with a
    sliding window of 4, one of its rows blind (sees nothing) and one seeing a single key.
    ``plant`` puts NaN / +inf / -inf at visible keys of three rows and NaN / inf at masked keys.
    """
    g = torch.Generator().manual_seed(seed)
    raw = (torch.randn(B, H, Rn, K, generator=g) * 4).to(dtype)
    pos = torch.arange(K - Rn, K)
    hi = (pos + 1).expand(B, Rn).clone()
    lo = torch.zeros(B, Rn, dtype=torch.long)
    lo[1] = torch.clamp(pos - 3, min=2)
    lo[1, 0], hi[1, 0] = 0, 0  # blind row
    lo[1, 1], hi[1, 1] = pos[1], pos[1] + 1  # one key: its own
    if plant:
        raw[0, 0, 2, 1] = math.nan
        raw[0, 1, 3, 0] = math.inf
        raw[1, 2, 5, pos[5]] = -math.inf
        raw[0, 2, 1, K - 1] = math.nan  # masked for row 1 (causal): must not count
        raw[1, 0, 4, 0] = math.inf  # masked (padding)
    return raw, 0.37, lo[:, None], hi[:, None], pos


def _allowed(lo, hi, K):
    j = torch.arange(K)
    return (j >= lo[..., None]) & (j < hi[..., None])  # (B, 1, R, K)


def _reference(raw, scale, lo, hi, pos):
    """rows.py on a float64 softmax of the float32 logits: per-row values and which rows are finite."""
    K = raw.shape[-1]
    allowed = _allowed(lo, hi, K)
    logits = raw.float() * scale
    masked = torch.where(allowed, logits.double(), -math.inf)
    probs = torch.softmax(masked, -1)
    probs = torch.where(allowed.any(-1, keepdim=True), probs, 0.0)
    visible = torch.where(allowed, logits, 0.0)
    ref = {
        "entropy": R.entropy(probs), "max_prob": R.max_probability(probs), "sum_sq": R.sum_sq(probs),
        "sink_mass": R.sink_mass(probs, allowed), "diagonal_mass": R.diagonal_mass(probs, pos),
        "mean_distance": R.mean_distance(probs, pos),
        "n_visible": R.visible_keys(allowed, raw.shape),
        "nonfinite_logits": (~torch.isfinite(visible)).sum(-1), "nan_logits": torch.isnan(visible).sum(-1),
    }
    ref["logit_max"], ref["logit_min"] = R.logit_extremes(logits, allowed)
    raw_max, raw_min = R.logit_extremes(raw.float(), allowed)
    ref["qk_absmax"] = torch.maximum(raw_max, -raw_min).clamp_min(0.0)  # NaN where a visible one is; 0 if blind
    finite = (ref["nonfinite_logits"] == 0) & (ref["n_visible"] >= 1)
    return ref, finite, allowed, logits


def _check(got: fused.RowStats, ref: dict, finite, atol=2e-6):
    assert torch.equal(got.n_visible, ref["n_visible"])
    # Counts are taken only when some row may be non-finite; None means none is.
    zero = torch.zeros_like(ref["nonfinite_logits"])
    nonfinite = zero if got.nonfinite_logits is None else got.nonfinite_logits
    nans = zero if got.nan_logits is None else got.nan_logits
    assert torch.equal(nonfinite.long(), ref["nonfinite_logits"])
    assert torch.equal(nans.long(), ref["nan_logits"])
    # Extremes over visible keys, NaN / +-inf included, on every row (blind rows: -inf / +inf).
    torch.testing.assert_close(got.logit_max, ref["logit_max"], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(got.logit_min, ref["logit_min"], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(got.qk_absmax, ref["qk_absmax"], rtol=0, atol=0, equal_nan=True)
    for name in STAT_FIELDS:
        g, r = getattr(got, name)[finite].double(), ref[name][finite]
        torch.testing.assert_close(g, r, rtol=1e-5, atol=atol, msg=name)


def test_planted_chunk_covers_every_kind_of_row():
    raw, scale, lo, hi, pos = _chunk(0)
    ref, finite, _, _ = _reference(raw, scale, lo, hi, pos)
    assert (ref["nonfinite_logits"] > 0).sum() == 3 and ref["nan_logits"].sum() == 1
    assert (ref["n_visible"] == 0).any() and (ref["n_visible"] == 1).any()
    assert finite.sum() > 30  # most rows are ordinary
    assert (ref["entropy"][finite] > 0.3).any() and (ref["max_prob"][finite] > 0.9).any()  # broad and sharp rows


@pytest.mark.parametrize("plant", [True, False])
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_row_stats_equal_rows_py_on_float64_softmax(seed, dtype, plant, monkeypatch):
    monkeypatch.setenv("ATTNKIT_COMPILE", "0")
    raw, scale, lo, hi, pos = _chunk(seed, dtype=dtype, plant=plant)
    ref, finite, _, _ = _reference(raw, scale, lo, hi, pos)
    _check(fused.row_stats(raw, scale, lo, hi, pos), ref, finite)


def _long_chunk(kind: str, seed: int, dtype, B=2, H=2, Rn=6, K=40):
    """A chunk whose rows share most of their keys (what long-context chunks look like), so that
    ``split_row_sums`` takes the keys every row sees apart from the band around the diagonal."""
    g = torch.Generator().manual_seed(seed)
    raw = (torch.randn(B, H, Rn, K, generator=g) * 4).to(dtype)
    if kind == "causal":  # rows at the last positions
        pos = torch.arange(K - Rn, K)
        lo, hi = torch.zeros(B, Rn, dtype=torch.long), (pos + 1).expand(B, Rn).clone()
    elif kind == "causal, keys beyond":  # rows early in a longer key range (cached keys after them unseen)
        pos = torch.arange(20, 20 + Rn)
        lo, hi = torch.zeros(B, Rn, dtype=torch.long), (pos + 1).expand(B, Rn).clone()
    elif kind == "bidirectional":  # keys on both sides of every row
        pos = torch.arange(17, 17 + Rn)
        lo, hi = torch.zeros(B, Rn, dtype=torch.long), torch.full((B, Rn), K)
    elif kind == "left padding, a blind row":
        pos = torch.arange(K - Rn, K)
        lo, hi = torch.full((B, Rn), 3), (pos + 1).expand(B, Rn).clone()
        lo[1, 0], hi[1, 0] = 0, 0
    elif kind == "causal, one key far above the rest":  # s - m below -87 (exp's slow, denormal range)
        pos = torch.arange(K - Rn, K)
        lo, hi = torch.zeros(B, Rn, dtype=torch.long), (pos + 1).expand(B, Rn).clone()
        raw[..., 2] = 400.0
    elif kind == "window wider than the chunk":
        pos = torch.arange(K - Rn, K)
        lo, hi = (pos - 30).expand(B, Rn).clone(), (pos + 1).expand(B, Rn).clone()
    return raw, 0.37, lo[:, None], hi[:, None], pos


LONG_KINDS = ("causal", "causal, keys beyond", "bidirectional", "left padding, a blind row", "window wider than the chunk",
              "causal, one key far above the rest")


@pytest.mark.parametrize("kind", LONG_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("scratch", [False, True])
def test_keys_every_row_sees_are_summed_apart_and_merged_exactly(kind, dtype, scratch, monkeypatch):
    """Rows that see keys on both sides of their own: the shared keys apart from the band, then
    merged. Rows that see none after their own (causal, padding, windows): one masked pass."""
    monkeypatch.setenv("ATTNKIT_COMPILE", "0")
    seen, left = [], []
    real, real_left = fused._common_sums, fused._left_sums
    monkeypatch.setattr(fused, "_common_sums", lambda *a: seen.append(a[5:7]) or real(*a))
    monkeypatch.setattr(fused, "_left_sums", lambda *a: left.append(1) or real_left(*a))
    raw, scale, lo, hi, pos = _long_chunk(kind, 0, dtype)
    original = raw.clone()
    ref, finite, _, _ = _reference(raw, scale, lo, hi, pos)
    _check(fused.row_stats(raw, scale, lo, hi, pos, scratch=scratch), ref, finite)
    if kind == "bidirectional":
        assert len(seen) == 2 and not left  # the split ran: keys on both sides of the rows taken apart
    else:
        assert left and not seen  # one pass, hidden keys set to -inf
    if not scratch:
        assert torch.equal(raw, original)  # left as it was found


@pytest.mark.parametrize("where", ["keys every row sees", "the band"])
def test_nonfinite_scores_in_a_long_chunk_are_counted(where, monkeypatch):
    monkeypatch.setenv("ATTNKIT_COMPILE", "0")
    raw, scale, lo, hi, pos = _long_chunk("causal", 1, torch.float32)
    col = 5 if where == "keys every row sees" else int(pos[-1])
    raw[0, 1, -1, col] = math.nan
    raw[1, 0, -1, col] = math.inf
    ref, finite, _, _ = _reference(raw, scale, lo, hi, pos)
    assert (~finite).sum() == 2
    _check(fused.row_stats(raw, scale, lo, hi, pos, scratch=True), ref, finite)


def test_scaling_overflow_counts_as_nonfinite():
    # Finite scores whose logits overflow float32 once scaled: the logits are what counts.
    raw, _, lo, hi, pos = _chunk(0, plant=False)
    raw[0, 0, 3, 2] = 3e38
    ref, finite, _, _ = _reference(raw, 4.0, lo, hi, pos)
    got = fused.row_stats(raw, 4.0, lo, hi, pos)
    assert ref["nonfinite_logits"][0, 0, 3] == 1
    _check(got, ref, finite)


def test_sharp_rows_keep_small_entropies_exact():
    # Logits 30..60 below the max at an offset of 1000: logsumexp - sum p s would cancel to
    # 0 or to noise of ~1e-4 (float32 at 1e3); log Z + sum p (m - s) has two non-negative terms
    # and keeps H ~ 3e-12 to within the log Z term itself (1e-13, below float32's resolution of
    # Z ~ 1), as the float32 softmax-then-xlogy path does.
    raw = torch.full((1, 1, 2, 5), 1000.0)
    raw[0, 0, :, 1:] -= torch.tensor([[30.0, 40.0, 50.0, 60.0], [5.0, 6.0, 7.0, 8.0]])
    pos = torch.tensor([3, 4])
    lo, hi = torch.zeros(1, 1, 2), torch.tensor([[[4, 5]]])
    ref, finite, _, _ = _reference(raw, 1.0, lo, hi, pos)
    got = fused.row_stats(raw, 1.0, lo, hi, pos)
    assert 1e-12 < ref["entropy"][0, 0, 0] < 1e-11
    torch.testing.assert_close(got.entropy.double(), ref["entropy"], rtol=0.05, atol=0)
    float32_path = R.entropy(torch.softmax(raw[0, 0, 0, :4], -1))
    assert float32_path.item() == pytest.approx(got.entropy[0, 0, 0].item(), rel=1e-3)


def _row_chunk(raw, scale, lo, hi, pos, row_valid):
    """The chunk the seam builds today: float32 logits, -inf where masked, softmax, blind rows zeroed."""
    allowed = _allowed(lo, hi, raw.shape[-1])
    logits = torch.where(allowed, raw.float() * scale, -math.inf)
    probs = torch.softmax(logits, -1)
    probs = torch.where(allowed.any(-1, keepdim=True), probs, 0.0)
    raw_vis = torch.where(allowed, raw.float(), 0.0)
    qk = torch.maximum(raw_vis.amax(-1), -raw_vis.amin(-1)).abs()
    B, H = raw.shape[:2]
    g = torch.Generator().manual_seed(1)
    return RowChunk(
        logits=logits, probs=probs, allowed=allowed, query_positions=pos, row_valid=row_valid,
        query_norm=torch.rand(B, H, raw.shape[2], generator=g) + 0.5, key_norm_max=torch.rand(B, H, generator=g) + 1,
        scale=scale, qk_absmax=qk,
    )


@pytest.mark.parametrize("seed", range(3))
def test_accumulator_from_fused_rows_equals_accumulator_from_probs(seed, monkeypatch):
    monkeypatch.setenv("ATTNKIT_COMPILE", "0")
    raw, scale, lo, hi, pos = _chunk(seed)
    row_valid = torch.ones(raw.shape[0], raw.shape[2], dtype=torch.bool)
    row_valid[0, 4] = False  # a padding query
    c = _row_chunk(raw, scale, lo, hi, pos, row_valid)
    want = HeadStatsAccumulator(raw.shape[1])
    want.update(c)
    got = HeadStatsAccumulator(raw.shape[1])
    got.update_rows(fused.row_stats(raw, scale, lo, hi, pos), row_valid, c.query_norm, c.key_norm_max, scale)
    w, g = want.summary(), got.summary()
    assert [h["nonfinite_rows"] for h in w] != [0, 0, 0]  # the planted rows reach the counts
    for hw, hg in zip(w, g):
        assert hw.keys() == hg.keys()
        for k in hw:
            assert hg[k] == pytest.approx(hw[k], rel=2e-6, abs=1e-6, nan_ok=True), k


def test_mask_intervals_of_causal_padded_and_window_masks():
    Q = K = 6
    causal = torch.tril(torch.ones(Q, K, dtype=torch.bool))
    padded = causal.clone()[None].repeat(2, 1, 1)
    padded[1, :, :2] = False  # left padding: rows 0 and 1 of sequence 1 see nothing
    window = causal & ~torch.tril(torch.ones(Q, K, dtype=torch.bool), diagonal=-3)
    for mask in (causal, padded, window, torch.ones(Q, K, dtype=torch.bool)):
        lo, hi = fused.mask_intervals(mask)
        assert torch.equal(_allowed(lo, hi, K), mask)
    lo, hi = fused.mask_intervals(padded)
    assert lo[1, :2].tolist() == [0, 0] and hi[1, :2].tolist() == [0, 0]
    holes = causal.clone()
    holes[4, 2] = False  # a row whose keys are not one interval
    assert fused.mask_intervals(holes) is None


def test_compile_mode_switch(monkeypatch):
    big = torch.zeros(4, 4)
    monkeypatch.setenv("ATTNKIT_COMPILE", "0")
    assert fused._kernel(big, 1 << 30) is fused._row_sums
    monkeypatch.setenv("ATTNKIT_COMPILE", "auto")
    monkeypatch.setattr(fused, "_compiled_dtypes", set())
    assert fused._kernel(big, 16) is fused._row_sums  # small calls stay eager until compiled
    monkeypatch.setenv("ATTNKIT_COMPILE", "1")
    assert fused._kernel(torch.zeros(1, 4), 1 << 30) is fused._row_sums  # one row would specialise


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("gcc") is None, reason="no C++ compiler for inductor")
def test_compiled_kernel_equals_eager_and_reference(monkeypatch):
    # Compiles once (seconds; faster with a warm inductor cache), then two shapes with no recompile.
    monkeypatch.setenv("ATTNKIT_COMPILE", "1")
    for seed, (Rn, K) in enumerate(((7, 11), (16, 40))):
        raw, scale, lo, hi, pos = _chunk(seed, Rn=Rn, K=K)
        ref, finite, _, _ = _reference(raw, scale, lo, hi, pos)
        got = fused.row_stats(raw, scale, lo, hi, pos)
        assert fused._compile_failed is None, fused._compile_failed
        assert fused._kernel(raw.reshape(-1, K), 1 << 30) is not fused._row_sums
        _check(got, ref, finite)
