"""The single-pass C++ statistics kernel (``metrics.qk_stats``): every ``RowStats`` field against
an independent float64 softmax of q.k, over the masks that are intervals of keys (causal,
padding on either side, sliding windows, bidirectional, rows that see one key or none),
grouped-query heads, float32/bf16/fp16 inputs, NaN and inf scores, lengths that are not a
multiple of its tiles; and through the seam on real tiny models, equal to the eager path.

The kernel is built once per machine (cached by torch's extension loader); without a C++
compiler or ninja the module is skipped."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from attnkit.metrics import fused, qk_stats

if shutil.which("ninja") is None or shutil.which("c++") is None and shutil.which("g++") is None:
    pytest.skip("no C++ compiler or ninja: the C++ statistics kernel cannot be built here", allow_module_level=True)
if qk_stats.load() is None:
    pytest.skip(f"the C++ statistics kernel does not build here ({qk_stats.failure()})", allow_module_level=True)


# ---------------------------------------------------------------------------- float64 reference
def _reference(q, k, scale, lo, hi, pos):
    """Every RowStats field of each row from a float64 softmax over its visible keys, (B, H, R) each."""
    B, H, R, _ = q.shape
    K = k.shape[2]
    raw = q.double() @ k.double().repeat_interleave(H // k.shape[1], 1).transpose(-1, -2)  # (B, H, R, K)
    j = torch.arange(K, dtype=torch.float64)
    lo, hi, pos = (torch.as_tensor(t).double().expand(B, H, R) for t in (lo, hi, pos))
    vis = (j >= lo[..., None]) & (j < hi[..., None])
    s = raw * scale
    m = torch.where(vis, s, -math.inf).amax(-1, keepdim=True)
    e = torch.where(vis, torch.exp(s - m), 0.0)
    p = e / e.sum(-1, keepdim=True)
    at = lambda col: torch.where((col >= lo) & (col < hi),  # noqa: E731
                                 p.gather(-1, col.clamp(0, K - 1).long()[..., None]).squeeze(-1), 0.0)
    return dict(
        n_visible=vis.sum(-1),
        logit_max=torch.where(vis, s, -math.inf).amax(-1), logit_min=torch.where(vis, s, math.inf).amin(-1),
        qk_absmax=torch.where(vis, raw.abs(), 0.0).amax(-1),
        entropy=-torch.where(p > 0, p * p.log(), 0.0).sum(-1),
        max_prob=p.amax(-1), sum_sq=(p * p).sum(-1),
        sink_mass=at(lo), diagonal_mass=at(pos),
        mean_distance=(p * (pos[..., None] - j).abs()).sum(-1),
    )


EXTREMES = ("logit_max", "logit_min", "qk_absmax")
# one unit in the last place of each input dtype: the extremes are rounded to it, as the model's matmul rounds q.k
ULP = {torch.float32: 2e-5, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


def _assert_matches(got: fused.RowStats, ref: dict, rows: torch.Tensor, dtype=torch.float32) -> None:
    """Fields equal the reference on ``rows`` (bool, (B, H, R): rows that see at least one key)."""
    assert torch.equal(got.n_visible, ref["n_visible"])
    for name, want in ref.items():
        if name == "n_visible":
            continue
        have = getattr(got, name).double()
        assert have.shape == want.shape, name
        # float32 sums over up to a few hundred keys of float32 dot products; the extremes are
        # numbers of the model's dtype (within one of its units of the exact value)
        rtol = ULP[dtype] if name in EXTREMES else 2e-5
        torch.testing.assert_close(have[rows], want[rows], rtol=rtol, atol=2e-6, msg=name)
    absmax = got.qk_absmax[rows]
    assert torch.equal(absmax, absmax.to(dtype).float())  # a number of the model's dtype


def _inputs(seed, dtype, B=2, H=4, Hkv=2, R=37, K=300, D=32, spread=3.0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(B, H, R, D, generator=g) * spread / D**0.25).to(dtype)
    k = (torch.randn(B, Hkv, K, D, generator=g) / D**0.25).to(dtype)
    return q, k


def _masks(kind: str, B: int, R: int, K: int):
    """lo, hi (B, 1, R) and pos (R,) of one kind of mask; query row r sits at key K - R + r."""
    pos = torch.arange(K - R, K)
    causal_hi = (pos + 1).expand(B, R).clone()
    zeros = torch.zeros(B, R, dtype=torch.long)
    if kind == "causal":
        lo, hi = zeros, causal_hi
    elif kind == "left padding":  # batch b's first 7 b keys are padding; padding rows see nothing
        lo = torch.stack([torch.full((R,), 7 * b) for b in range(B)])
        hi = torch.where(pos >= lo, causal_hi, 0)
        lo = torch.where(hi > 0, lo, 0)
    elif kind == "right padding, bidirectional":  # batch b's last 5 b keys are padding
        hi = torch.stack([torch.full((R,), K - 5 * b) for b in range(B)])
        lo = zeros
    elif kind == "bidirectional":
        lo, hi = zeros, torch.full((B, R), K)
    elif kind == "sliding window":
        lo, hi = (pos - 50).clamp_min(0).expand(B, R).clone(), causal_hi
    elif kind == "one key":  # every row sees only its own key
        lo, hi = pos.expand(B, R).clone(), causal_hi
    elif kind == "some rows see nothing":
        lo, hi = zeros.clone(), causal_hi.clone()
        hi[:, ::3] = 0
    return lo[:, None], hi[:, None], pos


MASKS = ("causal", "left padding", "right padding, bidirectional", "bidirectional", "sliding window",
         "one key", "some rows see nothing")
SHAPES = {  # (B, H, Hkv, R, K, D): grouped and not, lengths off the tiles (64/128 keys, 32 rows)
    "grouped": (2, 4, 2, 37, 300, 32),
    "per-head keys": (1, 3, 3, 70, 70, 16),
    "one key head": (1, 4, 1, 5, 129, 64),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("kind", MASKS)
def test_every_field_equals_a_float64_softmax(kind, shape, dtype):
    B, H, Hkv, R, K, D = SHAPES[shape]
    q, k = _inputs(hash((kind, shape)) % 1000, dtype, B, H, Hkv, R, K, D)
    lo, hi, pos = _masks(kind, B, R, K)
    scale = D**-0.5
    got = qk_stats.row_stats(q, k, scale, lo, hi, pos.view(1, 1, R))
    ref = _reference(q, k, scale, lo, hi, pos)
    seen = ref["n_visible"] > 0
    assert got.nonfinite_logits is None  # every row finite: nothing counted
    _assert_matches(got, ref, seen, dtype)
    if not bool(seen.all()):  # rows that see nothing: as the eager path leaves them
        assert bool((got.logit_max[~seen] == -math.inf).all()) and bool((got.qk_absmax[~seen] == 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_queries_and_keys_read_in_place(dtype):
    """A model's q and k are transposed views (B, Q, H, D) -> (B, H, Q, D): same result as contiguous."""
    q, k = _inputs(3, dtype, 2, 4, 2, 37, 90, 16)
    q_view, k_view = q.transpose(1, 2).contiguous().transpose(1, 2), k.transpose(1, 2).contiguous().transpose(1, 2)
    assert not q_view.is_contiguous() and not k_view.is_contiguous()
    lo, hi, pos = _masks("sliding window", 2, 37, 90)
    want = qk_stats.row_stats(q, k, 0.25, lo, hi, pos.view(1, 1, -1))
    got = qk_stats.row_stats(q_view, k_view, 0.25, lo, hi, pos.view(1, 1, -1))
    for name in ("entropy", "logit_max", "mean_distance", "sink_mass"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name


def test_sharp_and_broad_rows():
    """Rows from nearly one-hot to nearly uniform: entropy within 1e-5 relative of float64."""
    B, H, R, K, D = 1, 4, 40, 200, 32
    q, k = _inputs(5, torch.float32, B, H, 4, R, K, D)
    q = q * torch.tensor([0.01, 1.0, 10.0, 60.0]).view(1, H, 1, 1)
    lo, hi, pos = _masks("causal", B, R, K)
    got = qk_stats.row_stats(q, k, D**-0.5, lo, hi, pos.view(1, 1, R))
    ref = _reference(q, k, D**-0.5, lo, hi, pos)
    assert (ref["max_prob"] > 0.99).any() and (ref["entropy"] > 5.0).any()  # both kinds are there
    # A nearly one-hot row's entropy (~1e-7) is set by the float32 rounding of logits near 1000:
    # there the error is absolute (the eager path's is the same size).
    broad = ref["entropy"] > 1e-3
    torch.testing.assert_close(got.entropy.double()[broad], ref["entropy"][broad], rtol=1e-5, atol=2e-7)
    torch.testing.assert_close(got.entropy.double()[~broad], ref["entropy"][~broad], rtol=0.0, atol=2e-5)


NONFINITE = [(p, d) for p in ("nan", "inf") for d in (torch.float32, torch.float16, torch.bfloat16)]


@pytest.mark.parametrize("plant, dtype", NONFINITE + [("fp16 overflow", torch.float16)])
def test_nonfinite_scores_are_reported_as_the_eager_path_does(plant, dtype):
    """A NaN or inf in a visible score (from q), and a q.k beyond float16's range: the rows say so,
    with the same counts and extremes as ``fused.row_stats`` on the dtype's own matmul."""
    B, H, Hkv, R, K, D = 1, 4, 2, 20, 50, 16
    q, k = _inputs(7, dtype, B, H, Hkv, R, K, D)
    if plant == "nan":
        k[0, 1, 10, 3] = math.nan  # key 10 of key head 1: NaN for query heads 2, 3 on rows that see it
    elif plant == "inf":
        q[0, 0, 15, 0] = math.inf  # row 15 of head 0: +-inf or NaN against every key
    else:
        q[0, 3, 12] *= 2000.0
        k[0, 1, 40] *= 300.0
    lo, hi, pos = _masks("causal", B, R, K)
    scale = D**-0.5
    got = qk_stats.row_stats(q, k, scale, lo, hi, pos.view(1, 1, R))
    raw = torch.matmul(q, k.repeat_interleave(H // Hkv, 1).transpose(-1, -2))  # in the dtype, as the model's
    want = fused.row_stats(raw, scale, lo, hi, pos)
    assert want.nonfinite_logits is not None and int(want.nonfinite_logits.sum()) > 0  # the case is real
    assert torch.equal(got.nonfinite_logits, want.nonfinite_logits)
    assert torch.equal(got.nan_logits, want.nan_logits)
    bad = want.nonfinite_logits > 0
    for name in ("logit_max", "logit_min", "qk_absmax"):
        torch.testing.assert_close(getattr(got, name)[bad], getattr(want, name)[bad], equal_nan=True, msg=name)
    good = ~bad & (want.n_visible > 0)
    for name in ("entropy", "max_prob", "mean_distance", "qk_absmax"):
        torch.testing.assert_close(getattr(got, name)[good], getattr(want, name)[good], rtol=2e-2 if dtype != torch.float32 else 2e-5,
                                   atol=1e-3 if dtype != torch.float32 else 1e-5, msg=name)


def test_float64_and_other_devices_take_the_eager_path(monkeypatch):
    q, k = _inputs(1, torch.float64, 1, 2, 1, 4, 8, 8)
    assert fused.qk_kernel(q, k) is None  # float64: the eager path (float32 accumulation would lose it)
    q32, k32 = q.float(), k.float()
    assert fused.qk_kernel(q32, k32) is qk_stats.row_stats
    monkeypatch.setenv("ATTNKIT_STATS_KERNEL", "eager")
    assert fused.qk_kernel(q32, k32) is None
    monkeypatch.setenv("ATTNKIT_STATS_KERNEL", "bogus")
    with pytest.raises(ValueError, match="ATTNKIT_STATS_KERNEL"):
        fused.qk_kernel(q32, k32)


@pytest.mark.filterwarnings("ignore::attnkit.metrics.native.KernelBuildNotice")  # the build's own notice
def test_a_kernel_that_does_not_build_warns_once_and_leaves_the_eager_path(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    from attnkit.metrics.native import NativeKernel

    monkeypatch.setattr(qk_stats, "KERNEL", NativeKernel("qk_stats", qk_stats.SOURCE, "attnkit", "statistics kernel",
                                                           headers=qk_stats.KERNEL.headers))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # no build made before: it must build
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: (_ for _ in ()).throw(RuntimeError("no compiler")))
    q, k = _inputs(1, torch.float32, 1, 2, 1, 4, 8, 8)
    with pytest.warns(RuntimeWarning, match="no compiler"):
        assert fused.qk_kernel(q, k) is None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fused.qk_kernel(q, k) is None  # once: no second warning


def test_a_run_knows_beforehand_whether_it_will_build_the_kernel(monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    from attnkit.metrics.native import NativeKernel

    assert fused.qk_kernels_to_build("cpu") == []  # this suite's build exists (or was tried): nothing to build
    monkeypatch.setattr(qk_stats, "KERNEL", NativeKernel("qk_stats", qk_stats.SOURCE, "attnkit", "statistics kernel",
                                                           headers=qk_stats.KERNEL.headers))  # nothing tried yet
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # a machine with no build yet
    assert fused.qk_kernels_to_build("cpu") == ["cpp"]
    assert fused.qk_kernels_to_build(torch.device("meta")) == []  # a device the kernel does not serve
    monkeypatch.setenv("ATTNKIT_STATS_KERNEL", "eager")
    assert fused.qk_kernels_to_build("cpu") == []
    monkeypatch.setenv("ATTNKIT_STATS_KERNEL", "auto")
    builds = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: builds.append(kw["name"]) or (_ for _ in ()).throw(
        RuntimeError("no compiler")))
    with pytest.warns(RuntimeWarning, match="no compiler"):
        fused.build_qk_kernels(fused.qk_kernels_to_build("cpu"))
    assert builds == [qk_stats._build_name()]
    assert fused.qk_kernels_to_build("cpu") == []  # tried once: not again


def test_a_build_is_reused_only_for_the_same_source_and_machine(monkeypatch, tmp_path):
    name = qk_stats._build_name()
    assert name == qk_stats._build_name() and name.startswith("attnkit_qk_stats_")
    assert qk_stats._build_dir(name).joinpath(f"{name}.so").is_file()  # the build this suite loaded
    source = tmp_path / "qk_stats.cpp"
    source.write_text(qk_stats.SOURCE.read_text() + "\n// changed\n")
    monkeypatch.setattr(qk_stats.KERNEL, "source", source)
    assert qk_stats._build_name() != name  # another source: another build


# ---------------------------------------------------------------------------- through the seam
from conftest import _ids, gpt2  # noqa: E402
from test_observe_fused import CASES, LONG_CASES, _assert_equal_heads  # noqa: E402

from attnkit.seam import attach  # noqa: E402
from attnkit.seam.taps import StatsCollector  # noqa: E402


def _heads(model, inputs, kernel, monkeypatch, **session):
    monkeypatch.setenv("ATTNKIT_STATS_KERNEL", kernel)
    calls = []
    real = qk_stats.row_stats
    monkeypatch.setattr(qk_stats, "row_stats", lambda *a: calls.append(1) or real(*a))
    tap = StatsCollector()
    with torch.no_grad(), attach(model, taps=[tap], **session):
        model(**inputs)
    monkeypatch.setattr(qk_stats, "row_stats", real)
    return tap.heads(), len(calls)


SEAM_CASES = {**{k: v for k, v in CASES.items()}, **{k: (m, i, {}) for k, (m, i) in LONG_CASES.items()}}


@pytest.mark.parametrize("case", list(SEAM_CASES))
def test_seam_statistics_with_the_kernel_equal_the_eager_path(case, monkeypatch):
    make_model, make_inputs, session = SEAM_CASES[case]
    model, inputs = make_model(), make_inputs()
    eager, n_eager = _heads(model, inputs, "eager", monkeypatch, **session)
    cpp, n_cpp = _heads(model, inputs, "cpp", monkeypatch, **session)
    assert n_eager == 0 and n_cpp > 0  # each path ran
    _assert_equal_heads(cpp, eager)


def test_seam_fp16_overflow_is_counted_as_the_eager_path_counts_it(monkeypatch):
    """A float16 model whose q.k overflows: the kernel's rows are redone in float16 and report the
    same non-finite rows, extremes and statistics as the eager path."""
    model = gpt2("sdpa", dtype=torch.float16)
    with torch.no_grad():
        w = model.transformer.h[1].attn.c_attn.weight  # Conv1D: (in, 3 * width); q then k then v
        w[:, 2 * 8 : 3 * 8] *= 300.0  # layer 1, head 2: q.k overflows float16
        w[:, 32 + 2 * 8 : 32 + 3 * 8] *= 300.0
    inputs = {"input_ids": _ids(2, 12)}
    eager, _ = _heads(model, inputs, "eager", monkeypatch)
    cpp, n_cpp = _heads(model, inputs, "cpp", monkeypatch)
    assert n_cpp > 0 and any(h["nonfinite_rows"] > 0 for h in eager)  # the kernel ran; the case is real
    # Counts and extremes are the float16 matmul's on both paths; the softmax statistics differ by
    # float16's rounding of q.k (the eager path rounds each score to float16, the kernel keeps float32).
    assert len(cpp) == len(eager)
    for c, e in zip(cpp, eager):
        assert c.keys() == e.keys()
        for key in e:
            if isinstance(e[key], str) or e[key] is None:
                assert c[key] == e[key], key
            elif "nonfinite" in key or "nan" in key or "qk_absmax" in key or key.startswith("logit"):
                assert c[key] == pytest.approx(e[key], rel=1e-6, nan_ok=True), (c["layer"], c["head"], key)
            else:
                assert c[key] == pytest.approx(e[key], rel=2e-3, abs=2e-4, nan_ok=True), (c["layer"], c["head"], key)
