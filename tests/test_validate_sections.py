"""validate on tiny models through the Python API: uniform-replaced models, parameters found, the model left as found."""

import math

import pytest
import torch

from attnkit.validate import CRITICAL, Options, validate
from attnkit.validate.stats import one_sided_t_test, t_sf
from validate_helpers import TEXT, tiny_gpt2, tokenizer

OPTS = Options(seq_len=32, sequences=2, ablation_blocks=4)


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


def test_t_distribution_tail():
    assert t_sf(2.0, 10) == pytest.approx(0.036694, abs=1e-5)  # tables: two-sided 0.0734
    assert t_sf(0.0, 5) == pytest.approx(0.5)
    assert t_sf(-1.5, 7) == pytest.approx(1 - t_sf(1.5, 7))
    scipy_stats = pytest.importorskip("scipy.stats")
    for t, df in [(0.3, 3), (2.5, 40.5), (-4.0, 12), (8.0, 200)]:
        assert t_sf(t, df) == pytest.approx(float(scipy_stats.t.sf(t, df)), rel=1e-6, abs=1e-12)


def test_t_test_uses_effective_sample_size():
    torch.manual_seed(0)
    flat = torch.rand(4, 100) * 0.1  # iid rows: rho ~ 0
    smooth = torch.linspace(0, 0.1, 100).repeat(4, 1)  # correlated neighbours: fewer effective rows
    assert one_sided_t_test(flat, 0.0)["n_eff"] > 200
    assert one_sided_t_test(smooth, 0.0)["n_eff"] < 20


def test_uniform_replaced_model_is_reported_uniform(tok):
    model = tiny_gpt2(tok, zero_qk=True)  # eager attention, uniform by construction: no seam involved
    # 9 ablation blocks of 32 (279 predicted tokens): enough for the ablation to give a verdict
    # (Options.min_ablation_tokens); the same text and size with 4 blocks is inconclusive, see below.
    opts = Options(seq_len=32, sequences=2, ablation_blocks=9)
    report = validate(model, tok, [TEXT] * 3, name="uniform-gpt2", options=opts)
    assert report.section("ablation").figures["evidence"]["ablation_tokens"] == 9 * 31
    heads = report.section("heads").figures
    assert heads["counts"]["uniform"] == heads["total"] == 8
    stats = {c.name: c for c in report.section("statistics").checks}
    assert stats["vs_uniform"].status == CRITICAL and stats["entropy"].status == CRITICAL
    assert report.section("query_variation").figures["mean"] < 1e-6
    abl = report.to_json()["ablation"]
    assert abs(abl["uniform"]["loss"] - abl["learned"]["loss"]) < 1e-4  # ablation makes no difference
    ablation_checks = {c.name: c for c in report.section("ablation").checks}
    assert ablation_checks["vs_uniform"].status == CRITICAL
    assert "no better than uniform" in ablation_checks["vs_uniform"].message
    assert report.conclusion.id == "scenario_2"
    assert "uniform" in report.conclusion.title
    assert report.exit_status == 1
    # The HTML keeps to glyphs every text font has: the console's ❌ needs an emoji font that a
    # headless browser (or a plain server) may lack and would show as an empty box.
    from attnkit.validate.html import render_html

    page = render_html(report)
    assert "UNIFORM]" in page and "❌" not in page


def test_gradient_section_finds_query_key_columns_and_leaves_model_as_found(tok):
    model = tiny_gpt2(tok)
    model.train()
    frozen = model.transformer.h[1].attn.c_attn.weight
    frozen.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    report = validate(model, tok, [TEXT], name="tiny", options=OPTS)
    groups = report.section("gradients").figures["groups"]
    # GPT-2 fuses q, k, v in c_attn: exactly the query and key columns (and biases) of each layer
    assert sorted((g["name"], g["elements"]) for g in groups) == sorted(
        [(f"transformer.h.{i}.attn.c_attn.weight", 2 * 32 * 32) for i in range(2)]
        + [(f"transformer.h.{i}.attn.c_attn.bias", 2 * 32) for i in range(2)])
    assert all(g["grad_norm"] > 0 and g["grad_norm_uniform"] == 0 for g in groups)
    assert report.section("gradients").figures["frozen_groups"] == 1
    # left exactly as found
    assert model.training
    assert model.config._attn_implementation == "eager"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


def test_zeroed_query_key_gets_no_gradient(tok):
    report = validate(tiny_gpt2(tok, zero_qk=True), tok, [TEXT], options=OPTS)
    checks = {c.name: c for c in report.section("gradients").checks}
    assert checks["found"].figures["groups"] == 4
    assert checks["gradient"].status == CRITICAL


def test_llama_gqa_rope_model(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      initializer_range=0.2, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()
    report = validate(model, tok, [TEXT], options=Options(seq_len=32, sequences=1, ablation_blocks=2))
    names = {g["name"].rsplit(".", 2)[-2] for g in report.section("gradients").figures["groups"]}
    assert names == {"q_proj", "k_proj"}
    abl = report.to_json()["ablation"]
    assert set(abl) == {"learned", "uniform", "local", "first_token"}
    assert all(math.isfinite(v["loss"]) and v["perplexity"] == pytest.approx(math.exp(v["loss"])) for v in abl.values())
    assert report.section("sanity").figures["causal"] is True
    assert model.config._attn_implementation == "sdpa"


def test_sections_are_the_nine_of_the_seed(tok):
    report = validate(tiny_gpt2(tok), tok, [TEXT], options=OPTS)
    assert [s.key for s in report.sections] == ["sanity", "positional", "tokens", "statistics", "heads",
                                                "query_variation", "diversity", "gradients", "ablation"]
    doc = report.to_json()
    s = doc["summary"]
    assert s["tests"] == sum(c["status"] != "info" for sec in doc["sections"] for c in sec["checks"])
    assert s["critical"] == len(s["critical_findings"])
    assert doc["exit_status"] == (1 if s["critical"] else 0)
