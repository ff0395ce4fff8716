"""Verdicts carry their sample size, and too little data gives "inconclusive", never a critical finding."""

import json

import pytest

from attnkit.cli.main import main
from attnkit.validate import CRITICAL, INFO, OK, WARN, Options, validate
from attnkit.validate.summary import ROW_SECTIONS, Evidence, apply_evidence, counts
from attnkit.validate.types import Section
from validate_helpers import REFERENCE_DIR, TEXT, tiny_gpt2, tokenizer


@pytest.fixture(scope="module")
def tok():
    return tokenizer()


@pytest.mark.skipif(not (REFERENCE_DIR / "model.safetensors").exists(), reason="the reference model is not built")
def test_two_words_are_inconclusive_not_critical(tmp_path, tok, capsys):
    out = tmp_path / "hello.json"
    code = main(["validate", "reference", "--text", "hello world", "--json", str(out)])
    doc = json.loads(out.read_text())
    printed = capsys.readouterr().out
    # Counted independently: a causal LM's first token sees one key, every other row sees >= 2.
    tokens = len(tok("hello world")["input_ids"])
    rows = tokens - 1
    assert rows < Options().min_rows
    assert code == 0 == doc["exit_status"]
    assert doc["summary"]["critical"] == 0 and doc["summary"]["critical_findings"] == []
    assert doc["summary"]["inconclusive"] >= 3  # the statistics, diversity and ablation verdicts withheld
    assert doc["summary"]["conclusion"]["id"] == "inconclusive_sample"
    assert "Scenario 2" not in printed and "truly uniform" not in printed.split("CONCLUSION")[-1]
    assert "Inconclusive" in printed
    assert f"Inconclusive (too little data): {doc['summary']['inconclusive']}" in printed  # in the summary too
    for sec in doc["sections"]:
        if sec["key"] in ROW_SECTIONS:
            assert sec["figures"]["evidence"]["rows"] == rows
            assert any(f"{rows} query rows per head" in note for note in sec["notes"])
        if sec["key"] == "ablation":
            assert sec["figures"]["evidence"]["ablation_tokens"] == tokens - 1
            assert sec["figures"]["attention_matters"] is None  # not "attention does not help"
        assert all(c["status"] != "critical" for c in sec["checks"] if sec["key"] != "sanity")


def test_short_ablation_is_inconclusive_but_enough_rows_still_judge(tok):
    # 2 x 32 tokens give 62 rows per head (enough); 4 ablation blocks give 124 predicted tokens (too few).
    report = validate(tiny_gpt2(tok, zero_qk=True), tok, [TEXT], options=Options(seq_len=32, sequences=2, ablation_blocks=4))
    stats = {c.name: c for c in report.section("statistics").checks}
    assert stats["vs_uniform"].status == CRITICAL  # exactly uniform attention, on enough rows
    assert report.section("statistics").figures["evidence"]["rows"] == 2 * 31
    ablation = {c.name: c for c in report.section("ablation").checks}
    assert ablation["vs_uniform"].status == INFO
    assert ablation["vs_uniform"].figures["status_with_enough_evidence"] == CRITICAL
    assert ablation["vs_uniform"].message.startswith("Inconclusive on 124 tokens")
    assert report.conclusion.id == "scenario_2"  # from the attention sections, which had enough rows
    assert report.exit_status == 1


def _section(key: str, *statuses: str) -> Section:
    sec = Section(key, key)
    for n, status in enumerate(statuses):
        sec.add(f"c{n}", status, f"verdict {n}")
    return sec


def test_only_warnings_and_failures_of_statistical_sections_are_withheld():
    sections = [_section("sanity", CRITICAL), _section("statistics", OK, WARN, CRITICAL), _section("gradients", CRITICAL),
                _section("ablation", CRITICAL)]
    few = Evidence(rows=4, sequences=1, seq_len=5, ablation_tokens=4, min_rows=32, min_ablation_tokens=256)
    apply_evidence(sections, few)
    status = {s.key: [c.status for c in s.checks] for s in sections}
    assert status == {"sanity": [CRITICAL], "statistics": [OK, INFO, INFO], "gradients": [CRITICAL], "ablation": [INFO]}
    assert counts(sections)["critical"] == 2 and counts(sections)["inconclusive"] == 3


def test_enough_evidence_changes_no_verdict():
    sections = [_section("statistics", OK, WARN, CRITICAL), _section("ablation", CRITICAL)]
    enough = Evidence(rows=32, sequences=1, seq_len=33, ablation_tokens=256, min_rows=32, min_ablation_tokens=256)
    apply_evidence(sections, enough)
    assert [c.status for s in sections for c in s.checks] == [OK, WARN, CRITICAL, CRITICAL]
    assert all("Evidence: " in s.notes[0] for s in sections)
