"""Summary counts, the conclusion (which scenario of seed 002's "Interpreting Your Results") and the exit status.

Counts: every check that is not informational (ℹ) is a test; a test passes when it is ✓.
Critical findings are the ❌ checks; ⚠ checks are failed tests that are not critical.

Signals the conclusion reads (all from the sections' figures):

- ``incorrect``: a critical check in [1/9] sanity (rows not distributions, future leakage in
  a causal LM, NaN);
- ``looks_uniform`` (key side): no sharp head and at least half the heads uniform ([5/9]);
- ``query_variation``: mean L2 between rows over shared keys ([6/9]);
- ``hidden_diversity``: mean cosine distance of the hidden states ([7/9]);
- ``attention_matters``: the ablation's uniform variant is clearly worse than learned
  (language model: ≥ 0.05 nats of loss; encoder: outputs move, 1 − cos ≥ 0.01) ([9/9]).

Rules, first match wins:

1. ``incorrect`` → "Attention is computed incorrectly" (fix this before reading anything else).
2. not ``looks_uniform`` and ``attention_matters`` → "Attention is learning meaningful patterns".
3. not ``looks_uniform`` and not ``attention_matters`` → "Attention has structure but the model
   does not rely on it" (the ablation shows uniform does as well).
4. ``looks_uniform`` and (query variation < 0.02 or not ``attention_matters``) → Scenario 2,
   "Model works, attention truly uniform" (the rest of the model does the work; when the
   ablation was run, it confirms it).
5. ``looks_uniform`` and query variation > 0.05 and ``attention_matters`` → Scenario 1,
   "Model works, attention looks uniform" (subtle but real: nothing to do).
6. ``looks_uniform`` and hidden diversity > 0.4 → Scenario 3, "Architectural limitation".
7. otherwise → "Attention is correct but may not be learning meaningful patterns" (seed's text).

Exit status of ``attnkit validate``: 0 without critical findings, 1 with at least one (2 stays
reserved for user errors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from attnkit.validate.types import CRITICAL, INFO, OK, WARN, Section

SCENARIO3_DIVERSITY = 0.4  # seed 002, Scenario 3: "High belief diversity (mu_dist > 0.4)"


@dataclass
class Conclusion:
    id: str
    title: str
    lines: list[str]
    signals: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.lines = [line for line in self.lines if line]

    def to_json(self) -> dict:
        return {"id": self.id, "title": self.title, "lines": self.lines, "signals": self.signals}


def counts(sections: list[Section]) -> dict:
    checks = [c for s in sections for c in s.checks]
    tests = [c for c in checks if c.status != INFO]
    critical = [(s, c) for s in sections for c in s.checks if c.status == CRITICAL]
    return {
        "tests": len(tests),
        "passed": sum(c.status == OK for c in tests),
        "warnings": sum(c.status == WARN for c in tests),
        "critical": len(critical),
        "critical_findings": [{"section": s.title, "check": c.name, "message": c.message} for s, c in critical],
    }


def _fig(sections: dict[str, Section], key: str, name: str, default=math.nan):
    s = sections.get(key)
    return s.figures.get(name, default) if s is not None else default


def conclude(sections: list[Section], options) -> Conclusion:
    by_key = {s.key: s for s in sections}
    incorrect = any(c.status == CRITICAL for c in by_key["sanity"].checks) if "sanity" in by_key else False
    head_counts = _fig(by_key, "heads", "counts", {}) or {}
    total = _fig(by_key, "heads", "total", 0) or 0
    looks_uniform = bool(total) and head_counts.get("sharp", 0) == 0 and head_counts.get("uniform", 0) >= total / 2
    qv = _fig(by_key, "query_variation", "mean")
    div = _fig(by_key, "diversity", "hidden_diversity")
    matters = _fig(by_key, "ablation", "attention_matters", None)
    signals = {"incorrect": incorrect, "looks_uniform": looks_uniform, "query_variation": qv,
               "hidden_diversity": div, "attention_matters": matters,
               "sharp_heads": head_counts.get("sharp", 0), "uniform_heads": head_counts.get("uniform", 0), "heads": total}
    helps = matters is not False  # an ablation that was not run does not count against
    low_qv = not math.isnan(qv) and qv < options.query_variation_low
    ablation_says = ""
    if matters is False:
        ablation_says = "The ablation confirms it: replacing attention by uniform makes no difference."
    elif matters:
        ablation_says = "The ablation shows the model relies on it: uniform attention is clearly worse."
    if incorrect:
        return Conclusion("incorrect", "❌ Attention is computed incorrectly.", [
            "A sanity check failed (rows that are not distributions, attention to future positions in a",
            "causal model, or NaN weights). Fix this first: nothing else in the report can be trusted."], signals)
    if not looks_uniform and helps:
        return Conclusion("healthy", "✓ Attention is learning meaningful patterns.", [
            f"Heads: {signals['sharp_heads']} sharp, {total - signals['sharp_heads'] - signals['uniform_heads']} medium, "
            f"{signals['uniform_heads']} uniform of {total}; queries attend differently (L2 {qv:.3f}).",
            ablation_says or "and attention differs significantly from uniform."], signals)
    if not looks_uniform:
        return Conclusion("structured_unused", "⚠️  Attention has structure, but the model does not rely on it.", [
            f"Attention is not uniform ({signals['sharp_heads']} sharp, {signals['uniform_heads']} uniform of {total} heads), "
            "yet replacing it by uniform changes nothing:",
            "the rest of the model (MLP, embeddings) does the work. Check whether attention is needed at all."], signals)
    if low_qv or matters is False:
        lines = ["Model works, attention truly uniform.",
                 f"Key side uniform ({signals['uniform_heads']}/{total} heads) and query side too (L2 {qv:.4f})."
                 if low_qv else f"Key side uniform ({signals['uniform_heads']}/{total} heads).",
                 "Interpretation: the MLP/embeddings do all the work; attention is just uniform mixing."]
        if ablation_says:
            lines.append(ablation_says)
        if not math.isnan(div) and div > SCENARIO3_DIVERSITY:
            lines.append(f"The hidden states are diverse ({div:.2f} > {SCENARIO3_DIVERSITY}) and attention ignores them "
                         "(Scenario 3's symptom): check that queries/keys can learn (see [8/9]).")
        return Conclusion("scenario_2", "⚠️  Scenario 2: attention is truly uniform.", lines, signals)
    if not math.isnan(qv) and qv > options.query_variation_high and helps:
        return Conclusion("scenario_1", "✓ Scenario 1: model works, attention looks uniform.", [
            f"Per-key weights look uniform, but different queries attend differently (L2 {qv:.3f} > "
            f"{options.query_variation_high:g}).",
            "Attention IS working, subtly: small differences × softmax = meaningful signal. Nothing to do.",
            ablation_says], signals)
    if not math.isnan(div) and div > SCENARIO3_DIVERSITY:
        return Conclusion("scenario_3", "❌ Scenario 3: architectural limitation.", [
            f"Hidden states are diverse ({div:.2f} > {SCENARIO3_DIVERSITY}) but attention stays uniform:",
            "the model cannot turn what it knows into sharp attention (head dimension, temperature, capacity)."],
            signals)
    return Conclusion("inconclusive", "⚠️  Attention is correct but may not be learning meaningful patterns.", [
        "This could be due to:", "  - Architectural limitations (low-dimensional heads)", "  - Insufficient training",
        "  - Hyperparameter issues (temperature, learning rate)"], signals)


def exit_status(summary: dict) -> int:
    return 1 if summary["critical"] else 0
