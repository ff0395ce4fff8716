"""The C++ decoding step (``attnkit.seam.kernels.paged_cpu``) against independent references.

By category: grouped-query and multi-head, batch 1 and > 1, a page size that does not divide the
cache (a partial last page), a cache shorter than a page, a preallocated cache's written part (a
strided view), float64 / float32 / bfloat16.

- ``paged_attention`` equals dense attention restricted to the kept pages (float64 softmax over
  the kept keys; to 1e-12 in float64, to the dtype's tolerance otherwise);
- ``step_pages`` equals ``select_step_pages`` on float64 Quest bounds computed from scratch,
  ties (equal bounds) to the later page, NaN bounds last;
- ``pool_pages`` equals ``pooled_keys`` (max and min exactly, the mean to rounding);
- ``paged_attention`` leaves out the keys a padding mask hides (a row that sees none is zero);
- a plain decoding step under ``sparse_attention`` runs on it, and where it cannot be built the
  eager step takes over with the same result;
- a decoding step of a model with ``sparse_attention`` alone on it goes straight to the pattern's
  page choice and this kernel (``SparseSelector.paged_step``) with the general path's tokens, logits,
  kept pages and record bit for bit (Llama GQA, GPT-2 MHA, Mistral's sliding-window cache, every
  training-free pattern, layer shares, sinks, an eager model's additive mask, DynamicCache and
  StaticCache, batch 2, a left-padded batch); where the general path would run otherwise (another
  kernel asked for, a non-causal session, BART's cross-attention, a mask per head) it runs.
"""

from __future__ import annotations

import math

import pytest
import torch

from attnkit.seam import AttentionSession, Tap, attach
from attnkit.seam.kernels import paged_cpu
from attnkit.seam.kernels.block_kernels import BlockCall, choose_block_kernel
from attnkit.seam.kernels.blocks import BlockGeometry, pooled_keys
from attnkit.seam.kernels.paged_decode import select_step_pages, step_budget
from attnkit.sparse import PATTERNS, SparseConfig, sparse_attention
from attnkit.sparse.attention import SparseSelector
from conftest import VOCAB, gpt2, llama, mistral
from sparse_helpers import written_part_of_buffers

if paged_cpu.load() is None:
    pytest.skip(f"the C++ paged decoding kernel does not build here ({paged_cpu.KERNEL.failure()})",
                allow_module_level=True)

# (B, H, Hkv, K, bs): GQA batch 1 with a partial last page, MHA batch 2 page-aligned, GQA one KV
# head batch 2 partial, a cache shorter than a page, many pages
SHAPES = [(1, 4, 2, 37, 4), (2, 3, 3, 40, 8), (2, 4, 1, 29, 4), (1, 2, 1, 3, 4), (1, 4, 2, 1000, 64)]
DTYPES = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-2}
ID = lambda s: "x".join(map(str, s))  # noqa: E731


def _reference(q, k, v, pages, bs, scale, allowed=None):
    """Float64 softmax attention of q (B, H, 1, D) over the keys of pages (B, Hkv, S) only (and of
    them the keys ``allowed`` (B|1, 1, 1, K' >= K) shows; a row that sees none is zero)."""
    q, k, v = q.double(), k.double(), v.double()
    B, H, _, D = q.shape
    Hk, K = k.shape[1], k.shape[2]
    G = H // Hk
    kept = torch.zeros(B, Hk, math.ceil(K / bs) * bs, dtype=torch.bool)
    kept.view(B, Hk, -1, bs)[torch.arange(B)[:, None, None], torch.arange(Hk)[None, :, None], pages] = True
    kept = kept[..., :K]
    if allowed is not None:
        kept = kept & allowed[:, 0, :, :K]
    kept = kept.repeat_interleave(G, 1)[:, :, None]  # (B, H, 1, K)
    scores = (q @ k.repeat_interleave(G, 1).transpose(-1, -2) * scale).masked_fill(~kept, -math.inf)
    return (torch.softmax(scores, -1) @ v.repeat_interleave(G, 1)).nan_to_num(0.0)


def _bounds(q, hi, lo):
    """(B, Hkv, 1, P) float64 Quest bounds: Σ_d max(q_d·max_d, q_d·min_d), summed over a group's heads."""
    B, H, _, D = q.shape
    Hk = hi.shape[1]
    qg = q.double()[:, :, 0].view(B, Hk, H // Hk, 1, D)
    return torch.maximum(qg * hi.double()[:, :, None], qg * lo.double()[:, :, None]).sum(-1).sum(2)[:, :, None]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=ID)
def test_attention_equals_dense_attention_over_the_kept_pages(shape, dtype):
    B, H, Hk, K, bs = shape
    D = 16
    g = torch.Generator().manual_seed(K)
    q = torch.randn(B, H, 1, D, generator=g).to(dtype)
    k, v = (torch.randn(B, Hk, K, D, generator=g).to(dtype) for _ in range(2))
    n = math.ceil(K / bs)
    pages = torch.stack([torch.randperm(n, generator=g)[: max(1, n // 3)] for _ in range(B * Hk)]).view(B, Hk, -1)
    out = paged_cpu.paged_attention(q, k, v, pages, bs, 0.3)
    assert out.dtype == dtype and out.shape == (B, H, 1, D)
    assert (out.double() - _reference(q, k, v, pages, bs, 0.3)).abs().max() < DTYPES[dtype]


@pytest.mark.parametrize("shape", SHAPES[:3], ids=ID)
def test_attention_reads_a_preallocated_caches_written_part_in_place(shape):
    """A StaticCache's keys are the first K slots of a longer buffer; keys may also be non-contiguous in D."""
    B, H, Hk, K, bs = shape
    D = 8
    g = torch.Generator().manual_seed(K + 1)
    q, k, v = written_part_of_buffers(g, B, H, Hk, K, D, room=9)
    pages = torch.arange(math.ceil(K / bs)).flip(0)[:3].expand(B, Hk, -1)
    want = _reference(q, k, v, pages, bs, 0.5)
    assert (paged_cpu.paged_attention(q, k, v, pages, bs, 0.5) - want).abs().max() < 1e-12
    k_t = k.transpose(-1, -2).contiguous().transpose(-1, -2)  # D strided
    assert (paged_cpu.paged_attention(q, k_t, v, pages, bs, 0.5) - want).abs().max() < 1e-12


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[:4], ids=ID)
def test_attention_leaves_out_the_keys_a_padding_mask_hides(shape, dtype):
    """Left padding on one row (its first page hidden whole), a row that sees no key (zero), and one
    mask row for the whole batch."""
    B, H, Hk, K, bs = shape
    g = torch.Generator().manual_seed(K + 1)
    q = torch.randn(B, H, 1, 16, generator=g).to(dtype)
    k, v = (torch.randn(B, Hk, K, 16, generator=g).to(dtype) for _ in range(2))
    n = math.ceil(K / bs)
    pages = torch.stack([torch.randperm(n, generator=g)[: max(1, (n + 1) // 2)] for _ in range(B * Hk)]).view(B, Hk, -1)
    allowed = torch.ones(B, 1, 1, K + 2, dtype=torch.bool)
    allowed[0, ..., : min(K - 1, bs + 1)] = False  # left padding: the first page and a key of the next
    if B > 1:
        allowed[1] = False  # sees nothing
    for mask in (allowed, allowed[:1]):
        got = paged_cpu.paged_attention(q, k, v, pages, bs, 0.3, allowed=mask)
        want = _reference(q, k, v, pages, bs, 0.3, mask.expand(B, 1, 1, K + 2))
        assert (got.double() - want).abs().max() < DTYPES[dtype]
        assert torch.equal(got.isnan(), want.isnan())
    if B > 1:
        assert torch.equal(paged_cpu.paged_attention(q, k, v, pages, bs, 0.3, allowed=allowed)[1],
                           torch.zeros(H, 1, 16, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=ID)
@pytest.mark.parametrize("sinks", [False, True])
def test_step_pages_equal_the_eager_selection_on_float64_bounds(shape, sinks, dtype):
    B, H, Hk, K, bs = shape
    g = torch.Generator().manual_seed(K + 2)
    q = torch.randn(B, H, 1, 8, generator=g).to(dtype)
    k = torch.randn(B, Hk, K, 8, generator=g).to(dtype)
    geo = BlockGeometry(bs, 1, K, causal=True)
    _, hi, lo = pooled_keys(k, geo)
    for density in (0.1, 0.3, 1.0):
        kept, local, first = step_budget(geo.n_key_blocks, density, 1, 1, sinks)
        got = paged_cpu.step_pages(q, hi, lo, kept, local, first)
        want = select_step_pages(_bounds(q, hi, lo), geo, density, 1, 1, sinks)
        assert torch.equal(got, want.indices[:, :, 0]), density


@pytest.mark.parametrize("shape", SHAPES, ids=ID)
def test_step_pages_rank_the_pages_a_padding_mask_hides_last_as_the_eager_selection(shape):
    """The eager selection's rule (``choose_blocks`` with the call's mask): a page the mask hides
    whole scores below every page it does not (``visible_blocks``), ties to the later page."""
    from attnkit.sparse.attention import visible_blocks

    B, H, Hk, K, bs = shape
    g = torch.Generator().manual_seed(K + 3)
    q = torch.randn(B, H, 1, 8, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hk, K, 8, generator=g, dtype=torch.float64)
    geo = BlockGeometry(bs, 1, K, causal=True)
    _, hi, lo = pooled_keys(k, geo)
    allowed = torch.ones(B, 1, 1, K + 3, dtype=torch.bool)[..., :K]  # a cut of a longer mask (a view)
    allowed[0, ..., : (K * 2) // 3] = False  # left padding over most pages of the first row
    masks = [allowed, allowed[:1]]  # one row per batch row; one row for the batch
    if B > 1:
        allowed[1, ..., 1: K // 2] = False  # a hole after the first key
        blind = allowed.clone()
        blind[-1] = False  # a row that sees nothing
        masks.append(blind)
    for mask in masks:
        scores = _bounds(q, hi, lo).masked_fill(~visible_blocks(mask, geo), torch.finfo(torch.float32).min)
        for density in (0.3, 0.6, 1.0):
            kept, local, first = step_budget(geo.n_key_blocks, density, 1, 1, True)
            got = paged_cpu.step_pages(q, hi, lo, kept, local, first, mask, bs)
            want = select_step_pages(scores, geo, density, 1, 1, True)
            assert torch.equal(got, want.indices[:, :, 0]), density


def test_a_nan_key_gives_nan_as_the_eager_step_and_a_row_that_sees_nothing_zero():
    from attnkit.seam.kernels.paged_decode import paged_decode_attention

    B, H, Hk, K, bs = 2, 4, 2, 13, 4
    g = torch.Generator().manual_seed(12)
    q = torch.randn(B, H, 1, 8, generator=g)
    k, v = (torch.randn(B, Hk, K, 8, generator=g) for _ in range(2))
    k[0, 0, 5] = float("nan")  # in a kept page of row 0, KV head 0
    v[1, 1, 9, 2] = float("nan")
    pages = torch.tensor([[[1, 3], [1, 3]], [[2, 0], [2, 0]]])
    geo = BlockGeometry(bs, 1, K, causal=True)
    valid = torch.ones(1, 1, 1, 2, dtype=torch.bool)
    allowed = torch.ones(B, 1, 1, K, dtype=torch.bool)
    allowed[1, ..., :12] = False  # row 1 sees key 12 only, which neither of its pages holds
    for mask in (None, allowed):
        got = paged_cpu.paged_attention(q, k, v, pages, bs, 0.3, allowed=mask)
        eager = paged_decode_attention(q, k, v, pages[:, :, None], valid, geo, scale=0.3, allowed=mask)
        assert torch.equal(got.isnan(), eager.isnan()), mask is None
        assert got[0, :2].isnan().all() and not got[0, 2:].isnan().any()  # the NaN key's group only
        assert torch.allclose(got.nan_to_num(7.0), eager.nan_to_num(7.0), atol=1e-6)
    assert torch.equal(got[1], torch.zeros(H, 1, 8))  # sees nothing: zero, though a value is NaN


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_attention_with_a_padding_mask_on_several_threads_equals_one(dtype):
    B, H, Hk, K, bs = 2, 4, 2, 20000, 64
    g = torch.Generator().manual_seed(13)
    q = torch.randn(B, H, 1, 16, generator=g).to(dtype)
    k, v = (torch.randn(B, Hk, K, 16, generator=g).to(dtype) for _ in range(2))
    n = math.ceil(K / bs)
    pages = torch.stack([torch.randperm(n, generator=g)[: n // 2] for _ in range(B * Hk)]).view(B, Hk, -1)
    allowed = torch.ones(1, 1, 1, K + 5, dtype=torch.bool).repeat(B, 1, 1, 1)[..., :K]  # a cut of a longer mask
    allowed[1, ..., :3000] = False
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = paged_cpu.paged_attention(q, k, v, pages, bs, 0.25, allowed=allowed)
        torch.set_num_threads(2)
        two = paged_cpu.paged_attention(q, k, v, pages, bs, 0.25, allowed=allowed)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    tolerance = 2e-6 if dtype == torch.float32 else 2e-3
    assert (two.double() - _reference(q, k, v, pages, bs, 0.25, allowed)).abs().max() < tolerance


def test_step_pages_break_ties_to_the_later_page_and_put_nan_last():
    q = torch.ones(1, 2, 1, 4)  # bounds: the sum of each page's max
    hi = torch.tensor([3.0, 1.0, 3.0, 2.0, float("nan"), 3.0, 0.0, 5.0]).view(1, 1, 8, 1).expand(1, 1, 8, 4)
    lo = torch.zeros_like(hi)
    got = paged_cpu.step_pages(q, hi.contiguous(), lo, 6, 1, 0)[0, 0].tolist()
    assert got == [7, 5, 2, 0, 3, 1]  # the local page, then 3.0 x3 (later first), 2.0, 1.0; NaN and 0.0 out
    want = select_step_pages(_bounds(q, hi, lo), BlockGeometry(1, 1, 8, causal=True), 6 / 8, 0, 1, False)
    assert want.indices[0, 0, 0].tolist() == got


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=ID)
def test_pool_pages_equal_pooled_keys(shape, dtype):
    B, _, Hk, K, bs = shape
    k = torch.randn(B, Hk, K, 8, generator=torch.Generator().manual_seed(K)).to(dtype)
    k[0, 0, K // 2, 1] = float("nan")  # a NaN key: its page's max and min are NaN, as amax / amin
    n = math.ceil(K / bs)
    stats, marks = k.new_full((3, B, Hk, n + 2, 8), 7.0), k.new_full((B, Hk, n + 2, 8), 7.0)
    assert paged_cpu.pool_pages(k, stats, marks, bs, 0) == 0
    mean, hi, lo = pooled_keys(k, BlockGeometry(bs, K, K, causal=False))
    torch.testing.assert_close(stats[0, :, :, :n], mean, equal_nan=True)
    assert torch.allclose(stats[1, :, :, :n], hi, equal_nan=True, rtol=0, atol=0)  # exactly, NaN where NaN
    assert torch.allclose(stats[2, :, :, :n], lo, equal_nan=True, rtol=0, atol=0)
    full = K // bs
    assert torch.equal(marks[:, :, :full], k[:, :, bs - 1: full * bs: bs])
    assert (stats[:, :, :, n:] == 7).all() and (marks[:, :, full:] == 7).all()  # nothing written past the pages
    if full:  # the same keys: pooled from the page asked for; another key where a page ended: from page 0
        assert paged_cpu.pool_pages(k, stats, marks, bs, full) == full
        other = k.clone()
        other[-1, -1, full * bs - 1, -1] += 1
        assert paged_cpu.pool_pages(other, stats, marks, bs, full) == 0
        assert paged_cpu.pool_pages(k, stats, marks, bs, 0) == 0
    if n > 1:  # from a page on: the pages before it are left as they were
        stats.fill_(7.0)
        paged_cpu.pool_pages(k, stats, marks, bs, n - 1)
        assert (stats[:, :, :, : n - 1] == 7).all()
        assert torch.allclose(stats[1, :, :, n - 1], hi[:, :, n - 1], equal_nan=True, rtol=0, atol=0)


def _decode_call(dtype=torch.float32, grad=False):
    B, H, Hk, K, bs = 2, 4, 2, 37, 4
    g = torch.Generator().manual_seed(5)
    q = torch.randn(B, H, 1, 8, generator=g, dtype=dtype, requires_grad=grad)
    k, v = (torch.randn(B, Hk, K, 8, generator=g, dtype=dtype) for _ in range(2))
    geo = BlockGeometry(bs, 1, K, causal=True)
    _, hi, lo = pooled_keys(k, geo)
    sel = select_step_pages(_bounds(q, hi, lo), geo, 0.3, 1, 1, False)
    return BlockCall(q, k, v, sel, 0.35)


def test_auto_runs_a_plain_decoding_step_in_cpp_and_the_eager_step_where_it_cannot(monkeypatch):
    call = _decode_call()
    assert choose_block_kernel(call).name == "paged_cpu"
    got = choose_block_kernel(call).run(call)
    want = choose_block_kernel(call, "paged_decode").run(call)
    assert (got - want).abs().max() < 1e-6
    with torch.enable_grad():  # a gradient: the eager step (ordinary autograd)
        assert choose_block_kernel(_decode_call(grad=True)).name == "paged_decode"
    padded = BlockCall(call.query, call.key, call.value, call.selection, 0.35,
                       allowed=torch.ones(2, 1, 1, 37, dtype=torch.bool))
    assert choose_block_kernel(padded).name == "paged_cpu"  # a padding mask: left out in C++
    per_head = BlockCall(call.query, call.key, call.value, call.selection, 0.35,
                         allowed=torch.ones(2, 4, 1, 37, dtype=torch.bool))
    assert choose_block_kernel(per_head).name not in ("paged_cpu", "paged_decode")  # a mask per head
    monkeypatch.setattr(paged_cpu.KERNEL, "load", lambda: None)  # no compiler: the eager step
    assert choose_block_kernel(call).name == "paged_decode"
    with pytest.raises(ValueError, match="paged_cpu"):
        choose_block_kernel(call, "paged_cpu")


def test_attention_on_several_threads_equals_one_and_rejects_a_page_outside_the_cache():
    """Enough kept keys run one (batch row, KV head) per thread: the same result as one thread."""
    B, H, Hk, K, bs = 2, 4, 2, 20000, 64
    g = torch.Generator().manual_seed(9)
    q = torch.randn(B, H, 1, 16, generator=g)
    k, v = (torch.randn(B, Hk, K, 16, generator=g) for _ in range(2))
    n = math.ceil(K / bs)
    pages = torch.stack([torch.randperm(n, generator=g)[: n // 2] for _ in range(B * Hk)]).view(B, Hk, -1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = paged_cpu.paged_attention(q, k, v, pages, bs, 0.25)
        torch.set_num_threads(2)
        two = paged_cpu.paged_attention(q, k, v, pages, bs, 0.25)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    assert (two.double() - _reference(q, k, v, pages, bs, 0.25)).abs().max() < 2e-6
    bad = pages.clone()
    bad[1, 1, 3] = n  # past the last page
    with pytest.raises(RuntimeError, match="outside the cache"):
        paged_cpu.paged_attention(q, k, v, bad, bs, 0.25)


class _Alongside(Tap):
    """A tap that wants nothing: attached beside ``sparse_attention`` it makes every call take the general path."""

    wants_call = wants_chunks = False


def _decode(model, ids, mask, cache, alongside: bool, monkeypatch, **options):
    """(tokens, logits, handle, query lengths ``SparseSelector.run`` saw, last step's kept pages)."""
    cfg = SparseConfig(**{"pattern": "quest", "density": 0.3, "block_size": 4, **options})
    seen: list[int] = []
    run = SparseSelector.run
    monkeypatch.setattr(SparseSelector, "run", lambda self, call, *a: seen.append(call.query_length) or run(self, call, *a))
    with torch.no_grad(), sparse_attention(model, cfg, keep_masks=True) as handle:
        with attach(model, AttentionSession(taps=[_Alongside()])) if alongside else torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                                 pad_token_id=2, output_logits=True, return_dict_in_generate=True,
                                 cache_implementation="static" if cache == "static" else None)
        kept = {site: m.clone() for site, m in handle.block_masks.items()}
    monkeypatch.setattr(SparseSelector, "run", run)
    return out.sequences, torch.stack(out.logits, 1), handle, seen, kept


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("case", ["llama-gqa", "gpt2-mha", "mistral-window", "left-padded"])
def test_a_decoding_step_alone_on_the_model_goes_straight_to_the_kernel(case, cache, monkeypatch):
    model = {"gpt2-mha": gpt2, "mistral-window": mistral}.get(case, llama)("sdpa")
    ids = torch.randint(3, VOCAB, (2, 21), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    if case == "left-padded":
        ids[1, :5], mask[1, :5] = 2, 0
    # Mistral's cache holds its window of 4 keys: pages of 1 key, so that there is a choice
    options = {"block_size": 1} if case == "mistral-window" else {}
    general = _decode(model, ids, mask, cache, True, monkeypatch, **options)
    straight = _decode(model, ids, mask, cache, False, monkeypatch, **options)
    assert torch.equal(general[0], straight[0]) and torch.equal(general[1], straight[1])
    assert general[2].kernels == straight[2].kernels and general[2].densities() == straight[2].densities()
    assert general[4].keys() == straight[4].keys()
    assert all(torch.equal(general[4][s], straight[4][s]) for s in general[4])
    layers = model.config.num_hidden_layers
    assert general[3].count(1) == 7 * layers  # the general path sees every step after the first token
    assert straight[3].count(1) == 0  # every step straight, the padded batch's too


def _same(general, straight) -> None:
    assert torch.equal(general[0], straight[0]) and torch.equal(general[1], straight[1])
    assert general[2].kernels == straight[2].kernels and general[2].densities() == straight[2].densities()
    assert general[4].keys() == straight[4].keys()
    assert all(torch.equal(general[4][s], straight[4][s]) for s in general[4])


@pytest.mark.parametrize("pattern", sorted(p for p in PATTERNS if not PATTERNS[p].learned))
def test_every_training_free_pattern_decodes_straight_to_the_kernel_as_on_the_general_path(pattern, monkeypatch):
    model = llama("sdpa")
    ids = torch.randint(3, VOCAB, (2, 21), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    general = _decode(model, ids, mask, "static", True, monkeypatch, pattern=pattern)
    straight = _decode(model, ids, mask, "static", False, monkeypatch, pattern=pattern)
    _same(general, straight)
    assert straight[2].kernels["paged_cpu"] == 7 * model.config.num_hidden_layers  # every step after the first token
    assert straight[3].count(1) == 0


# options of the session, and an eager model (its additive mask): whether a step goes straight
OPTIONS = {
    "layer shares": ({"layer_shares": (0.3, 3.0)}, "sdpa", True),
    "sinks": ({"sinks": True, "sink_blocks": 2, "local_blocks": 2}, "sdpa", True),
    "causal=True": ({"causal": True}, "sdpa", True),
    "eager model": ({}, "eager", True),
    "portable kernel": ({"kernel": "portable"}, "sdpa", False),
    "causal=False": ({"causal": False}, "sdpa", False),
}


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("option", OPTIONS)
def test_a_step_goes_straight_only_where_the_general_path_would_run_the_same(option, cache, monkeypatch):
    options, attn, goes_straight = OPTIONS[option]
    model = llama(attn)
    ids = torch.randint(3, VOCAB, (2, 21), generator=torch.Generator().manual_seed(7))
    mask = torch.ones_like(ids)
    general = _decode(model, ids, mask, cache, True, monkeypatch, **options)
    straight = _decode(model, ids, mask, cache, False, monkeypatch, **options)
    _same(general, straight)
    assert straight[3].count(1) == (0 if goes_straight else 7 * model.config.num_hidden_layers)


def test_cross_attention_of_an_encoder_decoder_takes_the_general_path(monkeypatch):
    """BART: the decoder's self-attention steps go straight, its cross-attention (not causal, no mask) does not."""
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    cfg = BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                     init_std=0.2, pad_token_id=2, bos_token_id=0, eos_token_id=1, decoder_start_token_id=0,
                     dropout=0.0, attention_dropout=0.0, forced_eos_token_id=None)
    model = BartForConditionalGeneration._from_config(cfg, attn_implementation="sdpa").eval()
    ids = torch.randint(3, VOCAB, (2, 21), generator=torch.Generator().manual_seed(8))
    mask = torch.ones_like(ids)
    general = _decode(model, ids, mask, None, True, monkeypatch)
    straight = _decode(model, ids, mask, None, False, monkeypatch)
    _same(general, straight)
    # 8 decoder steps a layer: cross-attention's 8 and self-attention's first (a single key) on the general path
    assert general[3].count(1) == 2 * 8 * 2
    assert straight[3].count(1) == 2 * (8 + 1)


def test_a_mask_per_head_takes_the_general_path(monkeypatch):
    from attnkit.seam.adapters.hf import attnkit_attention

    model = llama("sdpa")
    module = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(3)
    q, k, v = torch.randn(1, 4, 1, 8, generator=g), torch.randn(1, 2, 9, 8, generator=g), torch.randn(1, 2, 9, 8, generator=g)
    per_head = torch.ones(1, 4, 1, 9, dtype=torch.bool)
    per_head[0, 1, 0, :3] = False
    seen: list[int] = []
    run = SparseSelector.run
    monkeypatch.setattr(SparseSelector, "run", lambda self, call, *a: seen.append(call.query_length) or run(self, call, *a))
    with torch.no_grad(), sparse_attention(model, SparseConfig(pattern="quest", density=0.5, block_size=2)):
        attnkit_attention(module, q, k, v, per_head, scaling=0.35)
        assert seen == [1]
        attnkit_attention(module, q, k, v, per_head[:, 1:2], scaling=0.35)  # one row for every head: straight
        assert seen == [1]
