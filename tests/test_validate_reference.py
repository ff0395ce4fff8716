"""validate on attnkit's reference model (GPT-2 trained on the KJV): learned attention clearly beats uniform and local."""

import pytest

from validate_helpers import REFERENCE_DIR, TEXT

pytestmark = pytest.mark.skipif(not (REFERENCE_DIR / "model.safetensors").exists(),
                                reason="the reference model is not built (scripts/train_reference.py)")


@pytest.fixture(scope="module")
def report():
    from attnkit.common.loading.registry import load_model
    from attnkit.validate import Options, validate

    loaded = load_model("reference")
    from attnkit.common.data.bible import kjv_available

    if kjv_available():  # shipped with attnkit; Debian's bible-kjv-text as fallback
        from attnkit.common.data import load_corpus

        docs, source = load_corpus("kjv").split("test"), "kjv [test]"
    else:
        docs, source = [TEXT * 4], "built-in passage"
    return validate(loaded.model, loaded.tokenizer, docs, name="reference", kind=loaded.kind, data_source=source,
                    options=Options(seq_len=128, sequences=2, ablation_blocks=8))


def test_learned_attention_beats_uniform_and_local(report):
    abl = report.to_json()["ablation"]
    learned = abl["learned"]["loss"]
    assert abl["uniform"]["loss"] - learned > 0.2  # measured ~0.35 nats on these 8 held-out blocks
    assert abl["local"]["loss"] - learned > 0.2
    assert abl["first_token"]["loss"] - learned > 0.5
    assert abl["learned"]["perplexity"] < abl["uniform"]["perplexity"] / 1.2
    checks = {c.name: c.status for c in report.section("ablation").checks}
    assert checks["vs_uniform"] == checks["vs_local"] == "ok"


def test_reference_report_is_healthy(report):
    assert report.summary["critical"] == 0 and report.exit_status == 0
    assert report.conclusion.id == "healthy"
    heads = report.section("heads").figures
    assert heads["counts"]["uniform"] < heads["total"] / 2
    sharpest = min(h["normalized_entropy"] for h in heads["per_head"])
    assert sharpest < 0.7 and heads["sharpest"]
    assert report.section("sanity").figures["causal"] is True
    import json

    cfg = json.loads((REFERENCE_DIR / "config.json").read_text())
    width = cfg["n_embd"]  # GPT-2's fused c_attn: the query and key columns and their biases, every layer
    assert report.section("gradients").figures["parameters"] == cfg["n_layer"] * 2 * width * (width + 1)


def test_per_head_classification_finds_the_sharp_heads(report):
    """Independent reference: the model card's head roles, measured by measure_head_roles (attention on i-1, not entropy).

    A head that the card names previous-token puts much of each row on a single key, so [5/9]
    must call it sharp; heads the card finds no role for must not all be sharp.
    """
    import json

    card = json.loads((REFERENCE_DIR / "eval_results.json").read_text())["heads"]
    named = {f"L{h['layer']}H{h['head']}" for h in card["heads"] if h["previous_token"] >= 0.4}
    assert named, "the card names no previous-token head"
    sharp = set(report.section("heads").figures["sharp"])
    assert named <= sharp
    assert len(sharp) < len(card["heads"])
    check = {c.name: c for c in report.section("heads").checks}["sharp_heads"]
    assert check.status == "ok" and all(name in check.message for name in named)
