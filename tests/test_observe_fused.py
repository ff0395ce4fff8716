"""The observation pass's fused statistics path (``observe_rows``: per-row statistics from one
pass over the raw scores) against its reference path (``observe``: logits, probabilities, the
accumulator fed probabilities), on real models: causal, left-padded, sliding-window, bidirectional
with padding, grouped-query, sampled rows, a subset of heads, float16 overflow, and a mask that is
not one interval per row (which must fall back)."""

from __future__ import annotations

import math

import pytest
import torch

from attnkit.metrics import fused
from attnkit.seam import attach
from attnkit.seam.taps import StatsCollector
from conftest import _ids, bert, gpt2, llama, mistral


@pytest.fixture(autouse=True)
def _eager_kernel(monkeypatch):
    """These tests are of the eager path (q.k chunk by chunk, then ``fused.row_stats``); the
    single-pass C++ kernel has its own, in test_qk_stats_kernel.py."""
    monkeypatch.setenv("ATTNKIT_STATS_KERNEL", "eager")


class ReferenceStats(StatsCollector):
    """The statistics tap without its fused path: it is shown ObservedChunks only."""

    observe_rows = None


def _both(model, inputs, **session):
    """Per-head statistics of one forward from both paths, and how many chunks each path took."""
    calls = {"fused": 0}
    real = fused.row_stats

    def counting(*a, **kw):
        calls["fused"] += 1
        return real(*a, **kw)

    out = {}
    for name, tap in (("fused", StatsCollector()), ("reference", ReferenceStats())):
        fused.row_stats = counting
        try:
            with torch.no_grad(), attach(model, taps=[tap], **session):
                model(**inputs)
        finally:
            fused.row_stats = real
        out[name] = tap.heads()
        if name == "fused":
            out["fused_calls"] = calls["fused"]
    return out


def _assert_equal_heads(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        assert g.keys() == w.keys()
        for k in w:
            if isinstance(w[k], str) or w[k] is None:  # the site's stack and kind; an interval not defined
                assert g[k] == w[k], (g["layer"], g["head"], k)
            else:
                assert g[k] == pytest.approx(w[k], rel=2e-5, abs=2e-6, nan_ok=True), (g["layer"], g["head"], k)


def _padded(batch=3, n=12, pad=(0, 3, 5), left=True):
    ids = _ids(batch, n)
    mask = torch.ones(batch, n, dtype=torch.long)
    for b, p in enumerate(pad):
        if p:
            if left:
                mask[b, :p] = 0
            else:
                mask[b, n - p:] = 0
    return {"input_ids": ids, "attention_mask": mask}


CASES = {
    "gpt2 causal sdpa": (lambda: gpt2("sdpa"), lambda: {"input_ids": _ids(2, 16)}, {}),
    "gpt2 causal eager": (lambda: gpt2("eager"), lambda: {"input_ids": _ids(2, 16)}, {}),
    "gpt2 left padding": (lambda: gpt2("sdpa"), lambda: _padded(), {}),
    "gpt2 sampled rows": (lambda: gpt2("sdpa"), lambda: {"input_ids": _ids(2, 40)}, {"sample_rows": 7, "seed": 3}),
    "gpt2 heads 1 and 3": (lambda: gpt2("sdpa"), lambda: {"input_ids": _ids(2, 16)}, {"heads": [1, 3]}),
    "llama grouped-query": (lambda: llama("sdpa"), lambda: {"input_ids": _ids(2, 16)}, {}),
    "mistral sliding window": (lambda: mistral("sdpa"), lambda: {"input_ids": _ids(2, 16)}, {}),
    "bert right padding": (lambda: bert("sdpa"), lambda: _padded(left=False), {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fused_path_equals_reference_path(case):
    make_model, make_inputs, session = CASES[case]
    model, inputs = make_model(), make_inputs()
    res = _both(model, inputs, **session)
    assert res["fused_calls"] > 0  # the fast path ran
    _assert_equal_heads(res["fused"], res["reference"])
    assert all(h["rows"] > 0 for h in res["fused"])


def test_fp16_overflow_is_counted_the_same_on_both_paths():
    model = gpt2("sdpa", dtype=torch.float16)
    with torch.no_grad():
        w = model.transformer.h[1].attn.c_attn.weight  # Conv1D: (in, 3 * width); q then k then v
        w[:, 2 * 8 : 3 * 8] *= 300.0  # layer 1, head 2: q.k overflows float16
        w[:, 32 + 2 * 8 : 32 + 3 * 8] *= 300.0
    res = _both(model, {"input_ids": _ids(2, 12)})
    assert res["fused_calls"] > 0
    assert any(h["nonfinite_rows"] > 0 for h in res["reference"])  # the case is real
    _assert_equal_heads(res["fused"], res["reference"])


def test_mask_with_holes_falls_back_to_the_reference_path():
    model = gpt2("sdpa")
    n = 10
    mask = torch.tril(torch.ones(n, n, dtype=torch.bool))
    mask[6, 2] = False  # row 6 does not see key 2: not one interval
    res = _both(model, {"input_ids": _ids(1, n), "attention_mask": mask[None, None]})
    assert res["fused_calls"] == 0
    _assert_equal_heads(res["fused"], res["reference"])


def test_chunks_on_worker_threads_equal_the_reference_and_restore_threads(monkeypatch):
    import attnkit.seam.observe as observe

    monkeypatch.setattr(observe, "FUSED_CHUNK_MIN", 64)  # many chunks: the thread pool runs
    monkeypatch.setattr(observe, "FUSED_CHUNK_MAX", 64)
    model, inputs = gpt2("sdpa"), _padded(n=20)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        res = _both(model, inputs, chunk_elements=64)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert res["fused_calls"] > 4 * 2  # several chunks a call, on both layers
    assert observe._pool is not None
    _assert_equal_heads(res["fused"], res["reference"])


LONG_CASES = {
    "gpt2 causal": (lambda: gpt2("sdpa"), lambda: {"input_ids": _ids(2, 48)}),
    "gpt2 left padding": (lambda: gpt2("sdpa"), lambda: _padded(n=48, pad=(0, 3, 9))),
    "llama grouped-query": (lambda: llama("sdpa"), lambda: {"input_ids": _ids(2, 48)}),
    "mistral sliding window": (lambda: mistral("sdpa"), lambda: {"input_ids": _ids(2, 48)}),  # chunks start at the window
    "bert right padding": (lambda: bert("sdpa"), lambda: _padded(n=48, pad=(0, 3, 9), left=False)),
}


@pytest.mark.parametrize("case", list(LONG_CASES))
def test_long_rows_split_into_shared_keys_and_band_equal_reference(case, monkeypatch):
    """Chunks of a few rows against many keys (long context): the keys every row of a chunk sees
    are summed apart from the band and merged; the statistics equal the reference path's."""
    import attnkit.seam.observe as observe

    monkeypatch.setattr(observe, "FUSED_CHUNK_MIN", 512)
    monkeypatch.setattr(observe, "FUSED_CHUNK_MAX", 512)
    split, left = [], []
    real, real_left = fused._common_sums, fused._left_sums
    monkeypatch.setattr(fused, "_common_sums", lambda *a: split.append(1) or real(*a))
    monkeypatch.setattr(fused, "_left_sums", lambda *a: left.append(1) or real_left(*a))
    make_model, make_inputs = LONG_CASES[case]
    res = _both(make_model(), make_inputs())
    assert res["fused_calls"] > 4
    # Bidirectional rows: the keys every row sees apart from the band (right padding's padded rows,
    # which see only keys before them, take the one masked pass); causal and windows: that pass only.
    assert split if case.startswith("bert") else (left and not split)
    _assert_equal_heads(res["fused"], res["reference"])
