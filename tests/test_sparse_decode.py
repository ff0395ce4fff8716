"""Decoding with a KV cache under ``sparse_attention``: page statistics kept across steps, the step's
page selection, and the ``paged_decode`` kernel.

By category: grouped-query (Llama) and multi-head (GPT-2) models with Hugging Face's DynamicCache,
a sliding-window model (Mistral: the model's own mask reaches the kernel), a left-padded batch.
Density 1 equals dense decoding token for token (logits to 1e-5); below 1 the pages kept at every
step equal a float64 selection recomputed from scratch over the whole cache; the incremental page
statistics equal ``pooled_keys`` of the whole cache (also across a new prompt, a cropped cache and
reordered rows) while pooling only the pages the new keys touch; the kernel equals float64 dense
attention restricted to the kept pages, values and gradients.
"""

from __future__ import annotations

import math

import pytest
import torch
from transformers import StaticCache

from attnkit.paths.decode import _cache_keyword, _cache_of
from attnkit.seam import AttentionSession, attach
from attnkit.seam.kernels import paged_cpu
from attnkit.seam.kernels.blocks import BlockGeometry, pooled_keys, select_blocks
from attnkit.seam.kernels.paged_decode import GATHERS, paged_decode_attention, select_step_pages
from attnkit.seam.sites import Site
from attnkit.seam.taps import Tap
from attnkit.sparse import PATTERNS, SparseConfig, make_gates, sparse_attention
from attnkit.sparse.page_stats import PageStats
from conftest import VOCAB, gpt2, llama, mistral
from sparse_helpers import written_part_of_buffers

MODELS = {"llama-gqa": llama, "gpt2-mha": gpt2, "mistral-window": mistral}
# a plain decoding step's kernel: the C++ one where it builds, else the eager one
PLAIN_KERNEL = "paged_cpu" if paged_cpu.load() is not None else "paged_decode"
BS = 4


CACHES = {"dynamic": None, "static": "static"}  # Hugging Face's cache_implementation; static: preallocated


def _generate(model, ids, attention_mask=None, steps=10, cache=None):
    out = model.generate(ids, attention_mask=attention_mask, max_new_tokens=steps, min_new_tokens=steps,
                         do_sample=False, pad_token_id=2, output_logits=True, return_dict_in_generate=True,
                         cache_implementation=CACHES[cache] if cache else None)
    return out.sequences, torch.stack(out.logits, 1)


@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("name", MODELS)
def test_density_one_decodes_as_dense(name, cache):
    """Dense and sparse with the same cache; a StaticCache's unwritten slots never reach the pages."""
    model = MODELS[name]("sdpa")
    ids = torch.randint(3, VOCAB, (1, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        tokens, logits = _generate(model, ids, cache=cache)
        with sparse_attention(model, SparseConfig(pattern="quest", density=1.0, block_size=BS)) as handle:
            sparse_tokens, sparse_logits = _generate(model, ids, cache=cache)
    assert torch.equal(tokens, sparse_tokens)
    assert (logits - sparse_logits).abs().max() < 1e-5
    assert handle.kernels[PLAIN_KERNEL] == 9 * model.config.num_hidden_layers  # every step after the prefill


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_every_pattern_at_density_one_decodes_as_dense(pattern):
    """The learned gate too: its prior term reaches the kernel's mask and, untrained, cancels."""
    model = llama("sdpa")
    ids = torch.randint(3, VOCAB, (1, 14), generator=torch.Generator().manual_seed(4))
    cfg = SparseConfig(pattern=pattern, density=1.0, block_size=BS)
    with torch.no_grad():
        tokens, logits = _generate(model, ids, steps=5)
        with sparse_attention(model, cfg, gates=make_gates(model, cfg)) as handle:
            sparse_tokens, sparse_logits = _generate(model, ids, steps=5)
    assert torch.equal(tokens, sparse_tokens)
    assert (logits - sparse_logits).abs().max() < 1e-5
    assert handle.kernels["paged_cpu"] + handle.kernels["paged_decode"] == 4 * model.config.num_hidden_layers


def test_left_padded_batch_at_density_one():
    """The padding mask reaches the kernel: its hidden keys stay hidden."""
    model = llama("sdpa")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, 19), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :6], mask[1, :6] = 2, 0
    with torch.no_grad():
        tokens, logits = _generate(model, ids, mask, steps=6)
        with sparse_attention(model, SparseConfig(pattern="moba", density=1.0, block_size=BS)) as handle:
            sparse_tokens, sparse_logits = _generate(model, ids, mask, steps=6)
    assert torch.equal(tokens, sparse_tokens)
    assert (logits - sparse_logits).abs().max() < 1e-5
    assert handle.kernels[PLAIN_KERNEL] > 0  # the padding mask: left out by the plain step's kernel


class _Calls(Tap):
    """Each call's query and the model's own keys."""

    wants_call, wants_chunks = True, False

    def __init__(self) -> None:
        self.calls: list[tuple[Site, torch.Tensor, torch.Tensor]] = []

    def on_call(self, call) -> None:
        self.calls.append((call.site, call.query.detach().clone(), call.key_heads.detach().clone()))


def quest_reference(q: torch.Tensor, k: torch.Tensor, bs: int, density: float) -> torch.Tensor:
    """(B, Hkv, nKb) bool: Quest's pages for one query per head at the end of k, from scratch in
    float64: per page the element-wise max and min of its keys, the bound Σ_d max(q_d·max_d,
    q_d·min_d) summed over a KV group's query heads, the current page always, then the highest
    bounds up to ⌈density · pages⌉ (at least 2: a sink's and the local page's worth)."""
    q, k = q.double(), k.double()
    B, H, _, D = q.shape
    Hk, K = k.shape[1], k.shape[2]
    n = math.ceil(K / bs)
    hi = torch.stack([k[:, :, p * bs:(p + 1) * bs].amax(2) for p in range(n)], 2)  # (B, Hkv, n, D)
    lo = torch.stack([k[:, :, p * bs:(p + 1) * bs].amin(2) for p in range(n)], 2)
    qg = q[:, :, 0].view(B, Hk, H // Hk, 1, D)
    bound = torch.maximum(qg * hi[:, :, None], qg * lo[:, :, None]).sum(-1).sum(2)  # (B, Hkv, n)
    bound[..., n - 1] = math.inf
    budget = min(n, max(math.ceil(density * n - 1e-9), 2))
    kept = torch.zeros(B, Hk, n, dtype=torch.bool)
    return kept.scatter_(-1, bound.topk(budget, -1).indices, True)


@pytest.mark.parametrize("cache", CACHES)
@pytest.mark.parametrize("name", ["llama-gqa", "gpt2-mha"])
def test_kept_pages_equal_quest_from_scratch_every_step(name, cache):
    """A StaticCache hands attention all of its slots: the reference sees only the written keys."""
    model = MODELS[name]("sdpa")
    ids = torch.randint(3, VOCAB, (1, 30), generator=torch.Generator().manual_seed(2))
    calls = _Calls()
    cfg = SparseConfig(pattern="quest", density=0.3, block_size=BS)
    kept, written = [], 0
    past = StaticCache(config=model.config, max_cache_len=47) if cache == "static" else None
    with (torch.no_grad(), sparse_attention(model, cfg, keep_masks=True) as handle,
          attach(model, AttentionSession(taps=[calls]))):
        tok = ids
        for _ in range(9):  # steps across page boundaries (keys 30 .. 38)
            positions = torch.arange(written, written + tok.shape[1])
            out = model(input_ids=tok, **{_cache_keyword(model): past}, use_cache=True, cache_position=positions)
            past, tok, written = _cache_of(out), out.logits[:, -1:].argmax(-1), written + tok.shape[1]
            kept.append(dict(handle.block_masks))
    steps = [c for c in calls.calls if c[1].shape[2] == 1]
    assert len(steps) == 8 * model.config.num_hidden_layers
    for i, (site, q, k) in enumerate(steps):
        mask = kept[1 + i // model.config.num_hidden_layers][site][:, :, 0]  # (B, Hkv, nKb)
        k = k[:, :, : 31 + i // model.config.num_hidden_layers]  # the keys written so far, the step's own last
        assert torch.equal(mask, quest_reference(q, k, BS, cfg.density)), (i, site)
        assert mask.sum(-1).max() < mask.shape[-1]  # something was left out


def _pooled(k, bs):
    return pooled_keys(k, BlockGeometry(bs, k.shape[2], k.shape[2], causal=False))


def _assert_same_stats(got, want, what=""):
    """Max and min exactly; the mean to its rounding (the C++ pooling sums in double)."""
    torch.testing.assert_close(got[0], want[0], msg=what)  # the dtype's own tolerance
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2]), what


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("native", [True, False], ids=["cpp", "eager"])
def test_incremental_page_stats_equal_stats_from_scratch(native, dtype, monkeypatch):
    if not native:
        monkeypatch.setattr(paged_cpu, "supports", lambda *t: False)
    elif paged_cpu.load() is None:
        pytest.skip(f"the C++ paged decoding kernel does not build here ({paged_cpu.KERNEL.failure()})")
    g = torch.Generator().manual_seed(3)
    B, Hk, D, bs = 2, 3, 8, 4
    cache = torch.randn(B, Hk, 13, D, generator=g).to(dtype)
    pages, site = PageStats(), Site(0)
    pages.update(site, cache, bs, past=0)  # the prefill
    for new in (1, 1, 1, 2, 5, 1):  # decoding steps and a chunk, across page boundaries
        pooled_before = pages.pages_pooled
        past = cache.shape[2]
        cache = torch.cat([cache, torch.randn(B, Hk, new, D, generator=g).to(dtype)], 2)
        got = pages.update(site, cache, bs, past=past)
        _assert_same_stats(got, _pooled(cache, bs))
        assert torch.equal(got[1], torch.stack([p.amax(2) for p in cache.split(bs, 2)], 2))
        # only the pages from the one holding the first new key on
        assert pages.pages_pooled - pooled_before == math.ceil(cache.shape[2] / bs) - past // bs
    # a cropped cache grown again with other keys, reordered rows, a new prompt: the same as from scratch
    edited = {
        "cropped": torch.cat([cache[:, :, :-6], torch.randn(B, Hk, 7, D, generator=g).to(dtype)], 2),
        "reordered": cache.flip(0),
        "new prompt": torch.randn(B, Hk, cache.shape[2] + 1, D, generator=g).to(dtype),
    }
    for what, k in edited.items():
        pages.update(site, cache, bs, past=cache.shape[2] - 1)
        got = pages.update(site, k, bs, past=k.shape[2] - 1)
        _assert_same_stats(got, _pooled(k, bs), what)


@pytest.mark.parametrize("n_pages", [1, 2, 3, 9])
@pytest.mark.parametrize("sinks", [False, True])
@pytest.mark.parametrize("local", [1, 2])
def test_step_selection_equals_select_blocks(n_pages, sinks, local):
    g = torch.Generator().manual_seed(n_pages)
    for K in (n_pages * BS, n_pages * BS - 1):
        if K < 1:
            continue
        geo = BlockGeometry(BS, 1, K, causal=True)
        for scores in (torch.randn(2, 3, 1, geo.n_key_blocks, generator=g), torch.zeros(2, 3, 1, geo.n_key_blocks)):
            for density in (0.1, 0.3, 0.5, 1.0):
                want = select_blocks(scores, geo, geo.forced(1, local, sinks), density,
                                     floor=geo.forced(1, local, True).sum(-1))
                got = select_step_pages(scores, geo, density, 1, local, sinks)
                assert torch.equal(got.block_mask(), want.block_mask())
                assert torch.equal(got.indices, want.indices[..., : got.slots])


# (B, H, Hkv, K, bs): GQA and MHA, a partial last page, a cache shorter than a page, a page-aligned cache
KERNEL_SHAPES = [(1, 4, 2, 37, 4), (2, 3, 3, 40, 8), (1, 2, 1, 3, 4), (2, 4, 1, 32, 4)]


def _masked_reference(q, k, v, kept_tokens, scale, bias=None):
    """Float64 attention of q over the keys kept_tokens (B, Hkv, K) marks, bias (B, Hkv, K) added."""
    G = q.shape[1] // k.shape[1]
    scores = torch.matmul(q, k.repeat_interleave(G, 1).transpose(-1, -2)) * scale
    if bias is not None:
        scores = scores + bias.repeat_interleave(G, 1)[:, :, None]
    scores = scores.masked_fill(~kept_tokens.repeat_interleave(G, 1)[:, :, None], -math.inf)
    return torch.matmul(torch.softmax(scores, -1).nan_to_num(0.0), v.repeat_interleave(G, 1))


@pytest.mark.parametrize("gather", list(GATHERS))
@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_equals_dense_attention_over_the_kept_pages(shape, gather):
    B, H, Hk, K, bs = shape
    D = 5
    g = torch.Generator().manual_seed(K)
    q = torch.randn(B, H, 1, D, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(B, Hk, K, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    geo = BlockGeometry(bs, 1, K, causal=True)
    sel = select_step_pages(torch.randn(B, Hk, 1, geo.n_key_blocks, generator=g), geo, 0.4, 1, 1, True)
    kept = sel.block_mask()[:, :, 0].repeat_interleave(bs, -1)[..., :K]  # (B, Hkv, K)
    bias = torch.randn(B, Hk, 1, sel.slots, generator=g, dtype=torch.float64, requires_grad=True)
    bias_tokens = torch.zeros(B, Hk, geo.padded_keys, dtype=torch.float64).index_put(
        (torch.arange(B)[:, None, None, None], torch.arange(Hk)[None, :, None, None],
         sel.indices[:, :, 0, :, None] * bs + torch.arange(bs)), bias[:, :, 0, :, None].expand(B, Hk, -1, bs))[..., :K]
    allowed = torch.ones(B, 1, 1, K, dtype=torch.bool)
    allowed[0, ..., : K // 3] = False  # a left-padded row
    holes = allowed.clone()
    holes[-1, ..., K - 2] = False  # a key of the last page hidden (partial: its window starts earlier)
    for extras, kept_tokens, token_bias in (
        ({}, kept, None),
        ({"block_bias": bias}, kept, bias_tokens),
        ({"allowed": allowed}, kept & allowed[:, 0, 0, None], None),
        ({"allowed": holes}, kept & holes[:, 0, 0, None], None),
    ):
        out = paged_decode_attention(q, k, v, sel.indices, sel.valid, geo, scale=0.4, gather=gather, **extras)
        ref = _masked_reference(q, k, v, kept_tokens, 0.4, token_bias)
        assert (out - ref).abs().max() < 1e-12
        w = torch.randn(out.shape, generator=g, dtype=torch.float64)
        inputs = [q, k, v] + ([bias] if "block_bias" in extras else [])
        grads = torch.autograd.grad((out * w).sum(), inputs)
        want = torch.autograd.grad((ref * w).sum(), inputs)
        for a, b in zip(grads, want):
            assert (a - b).abs().max() < 1e-12


@pytest.mark.parametrize("shape", KERNEL_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_reads_the_written_part_of_a_preallocated_cache(shape):
    """A StaticCache's keys reach the kernel as the first K slots of a longer buffer (a view whose
    heads are further apart than K): each way of gathering equals float64 attention over the kept pages."""
    B, H, Hk, K, bs = shape
    D = 5
    g = torch.Generator().manual_seed(K + 1)
    q, k, v = written_part_of_buffers(g, B, H, Hk, K, D, room=7)
    geo = BlockGeometry(bs, 1, K, causal=True)
    sel = select_step_pages(torch.randn(B, Hk, 1, geo.n_key_blocks, generator=g), geo, 0.4, 1, 1, True)
    kept = sel.block_mask()[:, :, 0].repeat_interleave(bs, -1)[..., :K]
    ref = _masked_reference(q, k, v, kept, 0.4)
    for gather in GATHERS:
        out = paged_decode_attention(q, k, v, sel.indices, sel.valid, geo, scale=0.4, gather=gather)
        assert (out - ref).abs().max() < 1e-12, gather


def test_a_pattern_whose_step_pages_takes_no_mask_scores_a_masked_step():
    """A pattern registered with a ``step_pages`` of four arguments (no ``masked_steps``): a padded
    step's pages come from its ``score``, as the same pattern without ``step_pages`` chooses them."""
    from dataclasses import replace

    from attnkit.sparse.attention import choose_blocks
    from attnkit.sparse.patterns import register_pattern

    quest = PATTERNS["quest"]
    calls = []

    def four(x, kept, local, first):
        calls.append(kept)
        return quest.step_pages(x, kept, local, first)

    try:
        register_pattern(replace(quest, name="quest_four_args", step_pages=four, masked_steps=False))
        register_pattern(replace(quest, name="quest_scored", step_pages=None, masked_steps=False))
        g = torch.Generator().manual_seed(11)
        q = torch.randint(-3, 4, (2, 4, 1, 8), generator=g).float()  # integers: float32 and double bounds agree
        k = torch.randint(-3, 4, (2, 2, 41, 8), generator=g).float()
        allowed = torch.ones(2, 1, 1, 41, dtype=torch.bool)
        allowed[1, ..., :17] = False
        with torch.no_grad():
            got = choose_blocks(q, k, SparseConfig(pattern="quest_four_args", density=0.4, block_size=4), allowed=allowed)
            want = choose_blocks(q, k, SparseConfig(pattern="quest_scored", density=0.4, block_size=4), allowed=allowed)
            shipped = choose_blocks(q, k, SparseConfig(pattern="quest", density=0.4, block_size=4), allowed=allowed)
            assert calls == []  # not asked with a mask it cannot take
            choose_blocks(q, k, SparseConfig(pattern="quest_four_args", density=0.4, block_size=4))
            assert len(calls) == 1  # asked without one
    finally:
        PATTERNS.pop("quest_four_args", None)
        PATTERNS.pop("quest_scored", None)
    assert torch.equal(got.indices, want.indices)
    # Quest as shipped: the C++ page choice with the mask, the same pages as the scored selection
    assert torch.equal(shipped.indices, want.indices)


@pytest.mark.parametrize("masked", [False, True], ids=["no mask", "padding"])
@pytest.mark.parametrize("pattern", sorted(p for p in PATTERNS if PATTERNS[p].step_pages is not None))
def test_a_patterns_step_pages_choose_what_its_score_chooses(pattern, masked):
    """Each pattern's C++ page choice against the same pattern scored in tensor ops (``select_step_pages``
    over ``score``), on integer inputs where float32 and double scores agree exactly."""
    from dataclasses import replace

    from attnkit.sparse.attention import choose_blocks
    from attnkit.sparse.patterns import register_pattern

    scored = f"{pattern}_scored"
    register_pattern(replace(PATTERNS[pattern], name=scored, step_pages=None, masked_steps=False))
    try:
        g = torch.Generator().manual_seed(12)
        q = torch.randint(-3, 4, (2, 4, 1, 8), generator=g).float()
        k = torch.randint(-3, 4, (2, 2, 53, 8), generator=g).float()
        allowed = None
        if masked:
            allowed = torch.ones(2, 1, 1, 53, dtype=torch.bool)
            allowed[0, ..., :21] = False
        for density in (0.2, 0.5):
            with torch.no_grad():
                got = choose_blocks(q, k, SparseConfig(pattern=pattern, density=density, block_size=4), allowed=allowed)
                want = choose_blocks(q, k, SparseConfig(pattern=scored, density=density, block_size=4), allowed=allowed)
            assert torch.equal(got.indices, want.indices), density
    finally:
        PATTERNS.pop(scored, None)
