"""Summary counts, the conclusion (which of the report's interpretation scenarios) and the exit status.

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

Evidence: every section that judges attention statistically (2-7) rests on the query rows
that see at least two keys, counted per head (``Options.min_rows``, 32); the ablation (9) on
its predicted tokens (``Options.min_ablation_tokens``, 256). Below a minimum the section's ⚠ and
❌ verdicts become ℹ "inconclusive" with the sample size (a ✓ stays: a difference found in few
rows is still found), and a conclusion other than "incorrect" or "healthy" becomes
"inconclusive": two words of text cannot show that attention is uniform. Sanity (1) and
gradient flow (8) are exact checks, not estimates, and are never relaxed.

Exit status of ``attnkit validate``: 0 without critical findings, 1 with at least one (2 stays
reserved for user errors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from attnkit.validate.types import CRITICAL, INFO, OK, WARN, Section

SCENARIO3_DIVERSITY = 0.4  # scenario 3: high belief diversity (mu_dist > 0.4)
ROW_SECTIONS = ("positional", "tokens", "statistics", "heads", "query_variation", "diversity")
TOKEN_SECTIONS = ("ablation",)


@dataclass(frozen=True)
class Evidence:
    """How much data the verdicts rest on, and the documented minimums (``Options``)."""

    rows: int  # query rows per head that see >= 2 keys, over all captured sequences
    sequences: int
    seq_len: int
    ablation_tokens: int  # predicted tokens (LM) or output tokens (encoder) of the ablation
    min_rows: int
    min_ablation_tokens: int

    @property
    def rows_enough(self) -> bool:
        return self.rows >= self.min_rows

    @property
    def ablation_enough(self) -> bool:
        return self.ablation_tokens >= self.min_ablation_tokens

    def rows_text(self) -> str:
        return (f"{self.rows:,} query rows per head that see ≥ 2 keys ({self.sequences} × {self.seq_len} tokens; "
                f"minimum {self.min_rows})")

    def tokens_text(self) -> str:
        return f"{self.ablation_tokens:,} tokens (minimum {self.min_ablation_tokens})"

    def to_json(self) -> dict:
        return {"rows": self.rows, "sequences": self.sequences, "seq_len": self.seq_len,
                "ablation_tokens": self.ablation_tokens, "min_rows": self.min_rows,
                "min_ablation_tokens": self.min_ablation_tokens,
                "rows_enough": self.rows_enough, "ablation_enough": self.ablation_enough}


def measure_evidence(captured, ablation_ids, causal_lm: bool, options) -> Evidence:
    """Count the rows the attention sections use and the tokens the ablation predicts."""
    first = captured.layers[0] if captured.layers else None
    # Every head of a layer sees the same mask here (validate passes no padding); head 0 stands for all.
    rows = int((first.n_visible[:, 0] >= 2).sum()) if first is not None else 0
    n, t = (int(x) for x in ablation_ids.shape)
    tokens = n * (t - 1) if causal_lm else n * t
    return Evidence(rows=rows, sequences=int(captured.input_ids.shape[0]), seq_len=int(captured.input_ids.shape[1]),
                    ablation_tokens=tokens, min_rows=options.min_rows, min_ablation_tokens=options.min_ablation_tokens)


def apply_evidence(sections: list[Section], evidence: Evidence) -> None:
    """State each section's sample size; below the minimum, ⚠/❌ verdicts become ℹ "inconclusive"."""
    for sec in sections:
        if sec.key in ROW_SECTIONS:
            enough, basis, what = evidence.rows_enough, evidence.rows_text(), f"{evidence.rows} rows per head"
            needed = f"{evidence.min_rows}"
        elif sec.key in TOKEN_SECTIONS:
            enough, basis, what = evidence.ablation_enough, evidence.tokens_text(), f"{evidence.ablation_tokens} tokens"
            needed = f"{evidence.min_ablation_tokens}"
        else:
            continue
        sec.notes.append(f"Evidence: {basis}" + ("" if enough else " — too few: warnings and failures are inconclusive"))
        sec.figures["evidence"] = evidence.to_json()
        if enough:
            continue
        for check in sec.checks:
            if check.status in (WARN, CRITICAL):
                check.figures["inconclusive"] = True
                check.figures["status_with_enough_evidence"] = check.status
                check.status = INFO
                check.message = f"Inconclusive on {what} (fewer than {needed}): {check.message}"
        if sec.key == "ablation" and sec.figures.get("attention_matters") is False:
            # Too few tokens to say that attention does not help: the conclusion must not lean on it.
            sec.figures["attention_matters_measured"] = False
            sec.figures["attention_matters"] = None


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
        # ⚠/❌ verdicts withheld for want of data (see apply_evidence); they count as ℹ, not as tests
        "inconclusive": sum(bool(c.figures.get("inconclusive")) for c in checks),
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
    evidence = _fig(by_key, "statistics", "evidence", None)
    signals["evidence"] = evidence
    if incorrect:
        return Conclusion("incorrect", "❌ Attention is computed incorrectly.", [
            "A sanity check failed (rows that are not distributions, attention to future positions in a",
            "causal model, or NaN weights). Fix this first: nothing else in the report can be trusted."], signals)
    if evidence is not None and not evidence["rows_enough"] and not (not looks_uniform and matters):
        return Conclusion("inconclusive_sample", "ℹ Inconclusive: too little text to judge attention.", [
            f"The statistical sections rest on {evidence['rows']} query rows per head "
            f"({evidence['sequences']} × {evidence['seq_len']} tokens) and the ablation on "
            f"{evidence['ablation_tokens']} tokens; verdicts need at least {evidence['min_rows']} rows and "
            f"{evidence['min_ablation_tokens']} tokens.",
            "Give more text (--text-file, --dataset; the default is the KJV test split) before reading "
            "uniformity or usefulness into this."], signals)
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
