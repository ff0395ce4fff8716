"""Every modifier FlexAttention accepts gives FlexAttention's result on every attnkit kernel.

The table holds score and mask modifiers written from the math of PyTorch's FlexAttention tests
and attention-gym: relative biases, ALiBi, soft-caps, head offsets, trig and squared scores,
captured-tensor lookups (single, chained and data-dependent indexing), document masks, prefix-LM,
sliding windows, rows every key of which is masked, rows a score modifier sends to -inf.

Two oracles: PyTorch's own ``flex_attention`` (forward; it has no CPU backward) and a float64
reference written here that calls each modifier once per element with 0-d index tensors, as
FlexAttention defines it, and takes a softmax in which a row with no finite score is zero
(forward and backward); the reference is checked against PyTorch on every case.

At the kernel level, on a call without a cache (queries = keys, bidirectional) and with one
(3 queries at the end of 8 keys, causal): the dense kernel and the portable block-sparse kernel
(density 1: every block) forward and backward against the reference, attnkit's flex kernel and
PyTorch's flex_attention forward (on the call with a cache: each eager flex call traces the
modifiers, ~0.3 s). Through the seam on a float64 GPT-2, with and without a KV cache: the same
kernels against the reference run as a kernel of the registry. ``native`` and ``sdpa`` run no
modifiers (a temperature folds into their scale): asked for, they name the kernels that can.
"""

from __future__ import annotations

import contextlib
import math
import warnings

import pytest
import torch
from torch import nn

from attnkit.seam import kernels
from attnkit.seam.kernels import KERNELS, Kernel
from attnkit.seam.kernels.modifiers import ModifierError
from attnkit.seam.mods.mask import local_window, sink_window
from attnkit.seam.mods import soft_cap, temperature
from attnkit.seam import Mods, Site, attach, build_call
from attnkit.sparse.attention import SparseHandle, SparseSelector, sparse_attention
from attnkit.sparse.config import SparseConfig
from attnkit.paths.decode import _cache_keyword
from attnkit.seam.taps import MapCapture, StatsCollector
from conftest import _ids, gpt2

flex_api = pytest.importorskip("torch.nn.attention.flex_attention")

B, H, D = 2, 4, 8  # the model's batch and heads too (conftest's GPT-2: 4 heads)
MAX_POS = 16  # captured tables cover every position of every test call
NEG_INF = -math.inf
_g = torch.Generator().manual_seed(20)


def _table(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=_g, dtype=torch.float64)


# --- captured tensors, as modifiers in the wild close over them -----------------------------
BIAS_BHQK = _table(B, H, MAX_POS, MAX_POS)  # a full learned bias
BIAS_BHQ = _table(B, H, MAX_POS)  # a per-query bias
TABLE_BQ = _table(B, MAX_POS)
X_1BHQ = _table(1, B, H, MAX_POS)
HEAD_SCALE = torch.rand(H, generator=_g, dtype=torch.float64) + 0.5
REL_TABLE = _table(H, 2 * MAX_POS)  # T5-style relative-position buckets per head
ALIBI_SLOPES = torch.tensor([2.0 ** (-8.0 * (i + 1) / H) for i in range(H)], dtype=torch.float64)
BUCKET_OF = torch.tensor([min(d, 7) for d in range(MAX_POS)])  # relative distance -> bucket
BUCKET_BIAS = _table(8)
DOCS = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 3, 3],
                     [0, 0, 1, 1, 1, 1, 1, 1, 2, 2, 3, 3, 3, 3, 3, 3]])  # (B, MAX_POS) document ids
LENGTHS = torch.tensor([6, 8])  # real keys per sequence (right padding)
KEY_VALID = torch.arange(MAX_POS)[None, :] < LENGTHS[:, None]  # (B, MAX_POS)
PREFIX = 3


# --- score modifiers ----------------------------------------------------------------------------
def identity(score, b, h, q_idx, kv_idx):
    return score


def times_two(score, b, h, q_idx, kv_idx):
    return score * 2


def squared(score, b, h, q_idx, kv_idx):
    return score * score


def relative_bias(score, b, h, q_idx, kv_idx):
    return score + (q_idx - kv_idx)


def relative_bias_scaled(score, b, h, q_idx, kv_idx):
    return score + 0.25 * (kv_idx - q_idx).to(score.dtype)


def alibi(score, b, h, q_idx, kv_idx):
    return score + ALIBI_SLOPES[h] * (kv_idx - q_idx)


def tanh_soft_cap(score, b, h, q_idx, kv_idx):
    return 2.0 * torch.tanh(score / 2.0)


def head_offset(score, b, h, q_idx, kv_idx):
    return score * HEAD_SCALE[h]


def head_plus(score, b, h, q_idx, kv_idx):
    return score + h


def batch_scale(score, b, h, q_idx, kv_idx):
    return score * (b + 1)


def trig(score, b, h, q_idx, kv_idx):
    return torch.sin(torch.cos(score)) + torch.tan(b)


def trig2(score, b, h, q_idx, kv_idx):
    return torch.cos(score) * torch.sin(score) + torch.tan(b)


def leaky(score, b, h, q_idx, kv_idx):
    return torch.where(score > 0, score * 2, score / 2)


def minus_own_max(score, b, h, q_idx, kv_idx):  # per element the max of a 0-d score is itself: 0
    return score - score.amax()


def causal_score(score, b, h, q_idx, kv_idx):
    return torch.where(q_idx >= kv_idx, score, NEG_INF)


def relative_causal(score, b, h, q_idx, kv_idx):
    return torch.where(q_idx >= kv_idx, score + (q_idx - kv_idx), NEG_INF)


def window_score(score, b, h, q_idx, kv_idx):  # a sliding window written as a score modifier
    return torch.where((q_idx - kv_idx).abs() <= 1, score, NEG_INF)


def bias_indexed(score, b, h, q_idx, kv_idx):
    return score + BIAS_BHQK[b, h, q_idx, kv_idx]


def bias_chained(score, b, h, q_idx, kv_idx):
    return score + BIAS_BHQK[b][h][q_idx][kv_idx]


def bias_bhq_chained(score, b, h, q_idx, kv_idx):
    return score + BIAS_BHQ[b][h][q_idx]


def table_chained(score, b, h, q_idx, kv_idx):
    return score + TABLE_BQ[b][q_idx]


def x0_chained(score, b, h, q_idx, kv_idx):
    return score + X_1BHQ[0][b, h][q_idx]


def rel_position_table(score, b, h, q_idx, kv_idx):
    return score + REL_TABLE[h, q_idx - kv_idx + MAX_POS]


def bucket_lookup(score, b, h, q_idx, kv_idx):  # data-dependent: a tensor indexes another
    return score + BUCKET_BIAS[BUCKET_OF[(q_idx - kv_idx).abs()]]


def rows_to_neg_inf(score, b, h, q_idx, kv_idx):  # every key of some rows: flex gives 0 there
    return torch.where(q_idx % 3 == 1, NEG_INF, score)


def head_to_neg_inf(score, b, h, q_idx, kv_idx):
    return torch.where(h == 2, NEG_INF, score)


def batch_rows_to_neg_inf(score, b, h, q_idx, kv_idx):
    return torch.where((b == 1) & (q_idx >= 5), NEG_INF, score)


# --- mask modifiers -----------------------------------------------------------------------------
def causal_mask(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def sliding_window(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx <= 2)


def prefix_lm(b, h, q_idx, kv_idx):
    return (kv_idx < PREFIX) | (q_idx >= kv_idx)


def document_mask(b, h, q_idx, kv_idx):
    return DOCS[b, q_idx] == DOCS[b, kv_idx]


def document_chained(b, h, q_idx, kv_idx):
    return (DOCS[b][q_idx] == DOCS[b][kv_idx]) & (q_idx >= kv_idx)


def padding_chained(b, h, q_idx, kv_idx):
    return KEY_VALID[b][kv_idx]


def dilated(b, h, q_idx, kv_idx):
    return (q_idx - kv_idx) % 2 == 0


def neighborhood(b, h, q_idx, kv_idx):  # 1-D NATTEN-style: neighbouring pairs of positions
    return (q_idx // 2 - kv_idx // 2).abs() <= 1


def head_mask(b, h, q_idx, kv_idx):
    return (h % 2 == 0) | (kv_idx == 0)


def rows_all_masked(b, h, q_idx, kv_idx):  # some rows see no key at all
    return q_idx % 4 != 2


def batch_all_masked(b, h, q_idx, kv_idx):  # a whole sequence sees nothing
    return b == 0


CASES: dict[str, tuple[tuple, tuple]] = {
    # score modifiers
    "identity": ((identity,), ()),
    "times_two": ((times_two,), ()),
    "squared": ((squared,), ()),
    "relative_bias": ((relative_bias,), ()),
    "relative_bias_scaled": ((relative_bias_scaled,), ()),
    "alibi": ((alibi,), ()),
    "tanh_soft_cap": ((tanh_soft_cap,), ()),
    "head_offset": ((head_offset,), ()),
    "head_plus": ((head_plus,), ()),
    "batch_scale": ((batch_scale,), ()),
    "trig": ((trig,), ()),
    "trig2": ((trig2,), ()),
    "leaky": ((leaky,), ()),
    "minus_own_max": ((minus_own_max,), ()),  # a broadcast call runs but means something else
    "causal_score": ((causal_score,), ()),
    "relative_causal": ((relative_causal,), ()),
    "window_score": ((window_score,), ()),
    "bias_indexed": ((bias_indexed,), ()),
    "bias_chained": ((bias_chained,), ()),
    "bias_bhq_chained": ((bias_bhq_chained,), ()),
    "table_chained": ((table_chained,), ()),
    "x0_chained": ((x0_chained,), ()),
    "rel_position_table": ((rel_position_table,), ()),
    "bucket_lookup": ((bucket_lookup,), ()),
    "rows_to_neg_inf": ((rows_to_neg_inf,), ()),
    "head_to_neg_inf": ((head_to_neg_inf,), ()),
    "batch_rows_to_neg_inf": ((batch_rows_to_neg_inf,), ()),
    "attnkit_soft_cap": ((soft_cap(0.7),), ()),
    "attnkit_temperature": ((temperature(0.5),), ()),
    # mask modifiers
    "causal_mask": ((), (causal_mask,)),
    "sliding_window": ((), (sliding_window,)),
    "prefix_lm": ((), (prefix_lm,)),
    "document_mask": ((), (document_mask,)),
    "document_chained": ((), (document_chained,)),
    "padding_chained": ((), (padding_chained,)),
    "dilated": ((), (dilated,)),
    "neighborhood": ((), (neighborhood,)),
    "head_mask": ((), (head_mask,)),
    "rows_all_masked": ((), (rows_all_masked,)),
    "batch_all_masked": ((), (batch_all_masked,)),
    "attnkit_windows": ((), (local_window(2), sink_window(1, 1))),
    # both, composed
    "alibi+document": ((alibi,), (document_mask,)),
    "chained+rows_to_neg_inf+window": ((bias_chained, rows_to_neg_inf), (sliding_window,)),
    "soft_cap+prefix_lm": ((tanh_soft_cap, relative_bias), (prefix_lm,)),
}
# The two classes a broadcast-only evaluation gets wrong: chained / data-dependent indexing of
# captured tensors (raises), and rows a score modifier sends entirely to -inf (NaN instead of 0).
CHAINED = ["bias_chained", "bias_bhq_chained", "table_chained", "x0_chained", "document_chained",
           "padding_chained", "chained+rows_to_neg_inf+window"]
EMPTIED_BY_SCORE = ["rows_to_neg_inf", "head_to_neg_inf", "batch_rows_to_neg_inf"]
# A few, also through attnkit's flex kernel on the whole model (each eager flex call traces the
# modifiers, ~0.3 s; the kernel level runs the flex kernel on every case).
MODEL_FLEX = ["x0_chained", "rows_all_masked", "chained+rows_to_neg_inf+window"]

# kernel-level calls: (queries, keys, causal)
SHAPES = {"no_cache": (8, 8, False), "kv_cache": (3, 8, True)}


# --- the float64 reference ------------------------------------------------------------------
def reference_attention(q, k, v, score_mods, mask_mods, *, scale, allowed=None, bias=None):
    """(B, H, Q, Dv): each modifier called once per element with 0-d index tensors; queries sit at
    the last Q of the K key positions; a row with no finite score is zero. allowed / bias: the
    call's own mask and additive bias, broadcastable to (B, H, Q, K)."""
    Bq, Hq, Q, _ = q.shape
    K = k.shape[2]
    raw = torch.matmul(q, k.transpose(-1, -2)) * scale
    if bias is not None:
        raw = raw + bias[..., :K]
    allowed = torch.ones(1, 1, Q, K, dtype=torch.bool) if allowed is None else allowed[..., :K].expand(Bq, Hq, Q, K)
    neg_inf = torch.tensor(NEG_INF, dtype=raw.dtype)
    rows = []
    for b in range(Bq):
        for h in range(Hq):
            for i in range(Q):
                for j in range(K):
                    idx = (torch.tensor(b), torch.tensor(h), torch.tensor(K - Q + i), torch.tensor(j))
                    s = raw[b, h, i, j]
                    for mod in score_mods:
                        s = mod(s, *idx)
                    keep = bool(allowed[min(b, allowed.shape[0] - 1), min(h, allowed.shape[1] - 1), i, j])
                    for mod in mask_mods:
                        keep = keep and bool(mod(*idx))
                    rows.append(s if keep else neg_inf)
    scores = torch.stack(rows).view(Bq, Hq, Q, K)
    top = scores.amax(-1, keepdim=True)
    empty = top == NEG_INF
    e = torch.exp(scores - torch.where(empty, 0.0, top))
    total = e.sum(-1, keepdim=True)
    probs = torch.where(empty, 0.0, e / torch.where(empty, 1.0, total))
    return torch.matmul(probs, v)


def _qkv(shape_name: str, requires_grad: bool):
    Q, K, _ = SHAPES[shape_name]
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(B, H, n, D, generator=g, dtype=torch.float64) for n in (Q, K, K))
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def _flex_oracle(q, k, v, score_mods, mask_mods, causal):
    """PyTorch's flex_attention, eager, with attnkit's numbering: q_idx is the query's position among the keys."""
    Q, K = q.shape[2], k.shape[2]
    offset = K - Q

    def score_mod(score, b, h, q_idx, kv_idx):
        for mod in score_mods:
            score = mod(score, b, h, q_idx + offset, kv_idx)
        return score

    def mask_mod(b, h, q_idx, kv_idx):
        keep = kv_idx <= q_idx + offset if causal else kv_idx >= 0
        for mod in mask_mods:
            keep = keep & mod(b, h, q_idx + offset, kv_idx)
        return keep

    block_mask = flex_api.create_block_mask(mask_mod, B, H, Q, K, device=q.device)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex on CPU warns about speed
        return flex_api.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=D**-0.5)


def _sparse_mods(score_mods, mask_mods) -> Mods:
    """The block_sparse kernel's mods: a density-1 selection (every block: dense attention) plus the case's."""
    cfg = SparseConfig(pattern="sinks_window", density=1.0, block_size=4, kernel="portable")
    selector = SparseSelector(cfg, None, SparseHandle(cfg, None))
    return Mods((selector.gate_bias, *score_mods), (selector, *mask_mods))


def _run_kernel(name, q, k, v, score_mods, mask_mods, causal):
    call = build_call(nn.Identity(), Site(0), q, k, v, is_causal=causal, scale=D**-0.5)
    mods = _sparse_mods(score_mods, mask_mods) if name == "block_sparse" else Mods(tuple(score_mods), tuple(mask_mods))
    kernel = kernels.choose(call, mods, name)
    assert kernel.name == name
    # a small chunk budget: several chunks of rows, each evaluating the modifiers on its own grids
    return kernel.run(call, mods, 2 * B * H * k.shape[2])


def _causal(Q, K):
    return (torch.arange(K)[None, :] <= torch.arange(Q)[:, None] + (K - Q))[None, None]


# --- kernel level -----------------------------------------------------------------------------
@pytest.mark.parametrize("shape_name", sorted(SHAPES))
@pytest.mark.parametrize("case", list(CASES))
def test_every_kernel_gives_flex_result_on_a_call(case, shape_name):
    score_mods, mask_mods = CASES[case]
    Q, K, causal = SHAPES[shape_name]
    q, k, v = _qkv(shape_name, requires_grad=True)
    allowed = _causal(Q, K) if causal else None
    ref = reference_attention(q, k, v, score_mods, mask_mods, scale=D**-0.5, allowed=allowed)
    ref_grads = torch.autograd.grad((ref * v[:, :, :Q].detach().cos()).sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in ref_grads)

    for name in ("dense", "block_sparse"):
        out = _run_kernel(name, q, k, v, score_mods, mask_mods, causal)
        # logits are float32 inside attnkit's kernels: agreement to float32's precision
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5, msg=f"{name} forward")
        grads = torch.autograd.grad((out * v[:, :, :Q].detach().cos()).sum(), (q, k, v))
        for which, got, want in zip("qkv", grads, ref_grads):
            torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-4, msg=f"{name} d{which}")

    if shape_name == "kv_cache":
        # PyTorch's flex_attention, and attnkit's flex kernel (the offset of q_idx is its own job),
        # on the call with a cache: each eager flex call traces the modifiers (~0.3 s), so once per
        # case keeps the file quick; the reference without a cache is the same code.
        q, k, v = (t.detach() for t in (q, k, v))
        oracle = _flex_oracle(q, k, v, score_mods, mask_mods, causal)
        torch.testing.assert_close(ref.detach(), oracle, atol=1e-10, rtol=1e-10, msg="reference vs PyTorch flex")
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = _run_kernel("flex", q, k, v, score_mods, mask_mods, causal)
        torch.testing.assert_close(out, oracle, atol=1e-10, rtol=1e-10, msg="flex kernel")


@pytest.mark.parametrize("case", EMPTIED_BY_SCORE + ["rows_all_masked", "batch_all_masked"])
def test_empty_rows_are_zero_with_zero_gradient(case):
    score_mods, mask_mods = CASES[case]
    q, k, v = _qkv("no_cache", requires_grad=True)
    for name in ("dense", "block_sparse"):
        out = _run_kernel(name, q, k, v, score_mods, mask_mods, False)
        empty = (out.detach() == 0).all(-1)
        assert empty.any(), "the case empties some rows"
        q.grad = None
        (out * 3.0).sum().backward()
        assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all() and torch.isfinite(v.grad).all()
        assert (q.grad[empty] == 0).all(), "an empty row's query gets no gradient"
        k.grad = v.grad = None


@pytest.mark.parametrize("kind", ["broadcast", "chained"])
def test_the_call_that_decides_how_a_modifier_runs_has_its_gradient(kind):
    """A modifier met for the first time is tried on the grids before its evaluation is chosen;
    that call's output, gradient and checkpoint recompute are those of every later call."""
    offsets = _table(H)  # a fresh closure each run: no decision cached for it yet
    if kind == "broadcast":
        def fresh(score, b, h, q_idx, kv_idx):
            return torch.where(q_idx % 3 == 1, NEG_INF, score * offsets[h])
    else:
        def fresh(score, b, h, q_idx, kv_idx):
            return torch.where(q_idx % 3 == 1, NEG_INF, score + BIAS_BHQ[b][h][q_idx] * offsets[h])
    q, k, v = _qkv("no_cache", requires_grad=True)
    ref = reference_attention(q, k, v, (fresh,), (), scale=D**-0.5)
    want = torch.autograd.grad(ref.sum(), (q, k, v))
    for _ in range(2):  # the first call decides, the second finds the decision
        out = _run_kernel("dense", q, k, v, (fresh,), (), False)  # checkpointed chunks: grads are on
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)
        for got, w in zip(torch.autograd.grad(out.sum(), (q, k, v)), want):
            torch.testing.assert_close(got, w, atol=5e-5, rtol=1e-4)


def test_per_element_evaluation_in_slices_equals_one_piece(monkeypatch):
    from attnkit.seam.kernels import modifiers

    score = _table(B, H, 5, 8)
    grids = (torch.arange(B).view(-1, 1, 1, 1), torch.arange(H).view(1, -1, 1, 1),
             torch.arange(3, 8).view(1, 1, -1, 1), torch.arange(8).view(1, 1, 1, -1))
    whole = modifiers.elementwise(bias_chained, (score, *grids), score.shape)
    mask = modifiers.elementwise(document_chained, grids, score.shape)
    torch.testing.assert_close(whole, score + BIAS_BHQK[:B, :H, 3:8, :8])
    monkeypatch.setattr(modifiers, "ELEMENT_CHUNK", 16)  # slices of 16 elements at most
    torch.testing.assert_close(modifiers.elementwise(bias_chained, (score, *grids), score.shape), whole)
    assert torch.equal(modifiers.elementwise(document_chained, grids, score.shape), mask)


# --- through the seam, on a float64 GPT-2 -----------------------------------------------------
def _reference_kernel(call, mods, chunk_elements):
    return reference_attention(call.query, call.key, call.value, mods.score, mods.mask, scale=call.scale,
                               allowed=call.allowed_or_causal(), bias=call.bias)


@pytest.fixture(scope="module")
def model():
    return gpt2(layers=2).double()


@pytest.fixture()
def with_reference_kernel(monkeypatch):
    monkeypatch.setitem(KERNELS, "reference", Kernel("reference", lambda call, mods, explicit: explicit, _reference_kernel))


def _forward(model, ids, kernel, score_mods, mask_mods, cache: bool):
    """Logits of the last positions (all of them without a cache; the 3 after a 5-token prefix with one)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")  # eager flex on CPU warns about speed
        if kernel == "block_sparse":  # every block kept: the portable kernel, stacked under the case's session
            cfg = SparseConfig(pattern="sinks_window", density=1.0, block_size=4, kernel="portable")
            stack.enter_context(sparse_attention(model, cfg))
            kernel = "auto"
        stack.enter_context(attach(model, score_mods=score_mods, mask_mods=mask_mods, kernel=kernel))
        if not cache:
            return model(ids).logits
        past = model(ids[:, :5], use_cache=True).past_key_values
        return model(ids[:, 5:], **{_cache_keyword(model): past}).logits


@pytest.mark.parametrize("cache", [False, True], ids=["no_cache", "kv_cache"])
@pytest.mark.parametrize("case", list(CASES))
def test_every_kernel_gives_flex_result_through_the_seam(model, with_reference_kernel, case, cache):
    score_mods, mask_mods = CASES[case]
    ids = _ids(B, 8)
    params = [p for p in model.parameters()]
    model.zero_grad()
    ref = _forward(model, ids, "reference", score_mods, mask_mods, cache)
    ref_grads = torch.autograd.grad(ref.logsumexp(-1).sum(), params, allow_unused=True)
    for name in ("dense", "block_sparse"):
        out = _forward(model, ids, name, score_mods, mask_mods, cache)
        torch.testing.assert_close(out, ref, atol=5e-5, rtol=1e-5, msg=f"{name} logits")
        grads = torch.autograd.grad(out.logsumexp(-1).sum(), params, allow_unused=True)
        for got, want in zip(grads, ref_grads):
            if want is not None:
                assert torch.isfinite(got).all()
                torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3, msg=f"{name} gradient")
    if case in MODEL_FLEX and not cache:
        with torch.no_grad():
            out = _forward(model, ids, "flex", score_mods, mask_mods, cache)
        torch.testing.assert_close(out, ref.detach(), atol=1e-8, rtol=1e-8, msg="flex logits")


# --- observation and statistics ---------------------------------------------------------------
def test_statistics_count_empty_rows_apart_from_nonfinite_ones(model):
    ids = _ids(B, 8)
    stats = StatsCollector()
    with torch.no_grad(), attach(model, taps=[stats], score_mods=[rows_to_neg_inf], kernel="dense"):
        out = model(ids).logits
    assert torch.isfinite(out).all()
    heads = stats.heads()
    # rows at positions 1, 4, 7 of each sequence: 3 rows x B per head, in every layer
    assert all(h["empty_rows"] == 3 * B for h in heads)
    assert all(h["nonfinite_rows"] == 0 and h["nonfinite_logits"] == 0 for h in heads)
    assert all(h["rows"] == (8 - 3 - 1) * B for h in heads)  # row 0 sees one key: no means

    def nan_row(score, b, h, q_idx, kv_idx):  # a NaN the model makes is a finding, not an empty row
        return torch.where(q_idx == 5, math.nan, score)

    stats = StatsCollector()  # layer 0 only: its NaN output reaches every later row of layer 1
    with torch.no_grad(), attach(model, taps=[stats], score_mods=[nan_row], kernel="dense", layers=[0]):
        model(ids)
    heads = stats.heads()
    assert all(h["nonfinite_rows"] == B and h["nan_logits"] == 6 * B and h["empty_rows"] == 0 for h in heads)


def test_observed_maps_of_empty_rows_are_zero(model):
    ids = _ids(B, 8)
    maps = MapCapture()
    with torch.no_grad(), attach(model, taps=[maps], score_mods=[bias_chained, rows_to_neg_inf], kernel="dense"):
        model(ids)
    for probs in maps.maps.values():
        assert torch.isfinite(probs).all()
        assert (probs[:, :, [1, 4, 7]] == 0).all()
        torch.testing.assert_close(probs[:, :, [0, 2, 3, 5, 6]].sum(-1), torch.ones(B, H, 5))


# --- what cannot run, and where --------------------------------------------------------------
def test_a_kernel_that_cannot_run_the_modifiers_names_the_ones_that_can():
    q, k, v = _qkv("kv_cache", requires_grad=True)
    call = build_call(nn.Identity(), Site(0), q, k, v, is_causal=True, native=lambda scale: q)
    mods = Mods((bias_chained,), (document_mask,))
    for name in ("native", "sdpa", "flex"):  # flex: PyTorch has no CPU backward for FlexAttention
        with pytest.raises(ValueError, match=f"the {name} kernel cannot run .*kernels that can: .*dense"):
            kernels.choose(call, mods, name)


def test_a_modifier_no_evaluation_can_run_gets_a_one_line_error():
    from attnkit.seam.kernels.modifiers import ModifierError

    def python_branch(score, b, h, q_idx, kv_idx):  # data-dependent control flow: FlexAttention refuses it too
        return score * 2 if q_idx > 3 else score

    q, k, v = _qkv("no_cache", requires_grad=False)
    with pytest.raises(ModifierError, match="python_branch.*cannot be evaluated.*element by element") as info:
        _run_kernel("dense", q, k, v, (python_branch,), (), False)
    assert "\n" not in str(info.value)
