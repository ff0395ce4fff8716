"""Planted pathologies are diagnosed at exactly their layer and head; healthy heads are not flagged."""

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from attnkit.analyze import analyze

N_EMBD, N_HEAD = 64, 4
HEAD_DIM = N_EMBD // N_HEAD


def healthy_gpt2(dtype=torch.float32) -> GPT2LMHeadModel:
    # initializer_range 0.15 gives heads that are neither uniform nor one-hot (normalised
    # entropy 0.74-0.86 on random tokens), so any flag on them would be a false alarm.
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=3, n_head=N_HEAD, n_embd=N_EMBD, vocab_size=200, n_positions=128,
                     initializer_range=0.15, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel._from_config(cfg, attn_implementation="sdpa", dtype=dtype).eval()


def inputs():
    return {"input_ids": torch.randint(0, 200, (2, 64), generator=torch.Generator().manual_seed(1))}


def q_columns(head: int) -> slice:
    return slice(head * HEAD_DIM, (head + 1) * HEAD_DIM)  # GPT-2's c_attn packs [q | k | v]


def k_columns(head: int) -> slice:
    return slice(N_EMBD + head * HEAD_DIM, N_EMBD + (head + 1) * HEAD_DIM)


def flagged(analysis, kind):
    return {(i.layer, i.head) for i in analysis.issues if i.type == kind}


def test_healthy_model_has_no_issues():
    a = analyze(healthy_gpt2(), inputs())
    assert a.issues == []
    assert len(a.heads) == 3 * N_HEAD


def test_zeroed_queries_are_uniform_at_that_head_only():
    model = healthy_gpt2()
    with torch.no_grad():
        attn = model.transformer.h[1].attn.c_attn
        attn.weight[:, q_columns(2)] = 0
        attn.bias[q_columns(2)] = 0
    a = analyze(model, inputs())
    assert flagged(a, "uniform_attention") == {(1, 2)}
    head = next(h for h in a.heads if (h["layer"], h["head"]) == (1, 2))
    assert head["max_over_uniform"] == pytest.approx(1.0, abs=1e-5)
    assert head["normalized_entropy"] == pytest.approx(1.0, abs=1e-5)
    assert {(i.layer, i.head) for i in a.issues} == {(1, 2)}


def test_scaled_query_key_collapses_at_that_head_only():
    model = healthy_gpt2()
    with torch.no_grad():
        attn = model.transformer.h[2].attn.c_attn
        for cols in (q_columns(1), k_columns(1)):
            attn.weight[:, cols] *= 6
            attn.bias[cols] *= 6
    a = analyze(model, inputs())
    assert flagged(a, "entropy_collapse") == {(2, 1)}
    assert {(i.layer, i.head) for i in a.issues} == {(2, 1)}
    issue = next(i for i in a.issues if i.type == "entropy_collapse")
    assert issue.value < 0.5 and issue.severity == "warning"
    head = next(h for h in a.heads if (h["layer"], h["head"]) == (2, 1))
    assert head["logit_max"] > 20  # large logits, measured, not estimated from log(p)


def test_fp16_overflow_is_found_at_that_head():
    model = healthy_gpt2(torch.float16)
    with torch.no_grad():
        attn = model.transformer.h[1].attn.c_attn
        for cols in (q_columns(3), k_columns(3)):
            attn.weight[:, cols] *= 300
            attn.bias[cols] *= 300
    a = analyze(model, inputs())
    overflow = [i for i in a.issues if i.type == "overflow_risk" and i.severity == "error"]
    assert {(i.layer, i.head) for i in overflow} == {(1, 3)}
    assert overflow[0].value >= 65504
    nonfinite = [i for i in a.issues if i.type == "nonfinite"]
    assert len(nonfinite) == 1 and nonfinite[0].layer == 1 and nonfinite[0].head == 3
    assert "overflow" in nonfinite[0].message
    # layer 0 ran before the overflow and is untouched
    assert not any(i.layer == 0 and i.severity == "error" for i in a.issues)


def test_nan_weights_are_a_finding_at_the_first_layer_they_reach():
    model = healthy_gpt2()
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[3, 5] = math.nan  # below layer 1's attention
    a = analyze(model, inputs())
    nonfinite = [i for i in a.issues if i.type == "nonfinite"]
    assert len(nonfinite) == 1
    assert nonfinite[0].layer == 1
    assert "NaN" in nonfinite[0].message
    assert all(h["nonfinite_rows"] == 0 for h in a.heads if h["layer"] == 0)


def test_model_is_left_as_found_even_when_the_forward_fails():
    model = healthy_gpt2()
    model.train()
    before = model.config._attn_implementation
    with pytest.raises(Exception):
        analyze(model, {"input_ids": torch.full((1, 8), 10_000)})  # token id beyond the vocabulary
    assert model.training and model.config._attn_implementation == before
