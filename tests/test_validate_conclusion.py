"""Every rule of the conclusion (seed 002's "Interpreting Your Results") is reachable, first match wins.

The sections are built by hand with only the figures ``conclude`` reads, so each case states the
symptoms of one scenario and nothing else; the end-to-end runs (reference model, MiniLM, a
uniform model) are in test_validate_reference.py / test_validate_sections.py.
"""

from __future__ import annotations

import math

import pytest

from attnkit.validate.context import Options
from attnkit.validate.summary import conclude
from attnkit.validate.types import CRITICAL, OK, Section


def sections(*, sanity_ok=True, sharp=0, medium=0, uniform=0, query_variation=math.nan,
             hidden_diversity=math.nan, attention_matters=None) -> list[Section]:
    sanity = Section("sanity", "Sanity Checks (Correctness)")
    sanity.add("row sums", OK if sanity_ok else CRITICAL, "rows sum to 1" if sanity_ok else "rows do not sum to 1")
    heads = Section("heads", "Per-Head Analysis")
    heads.figures.update(counts={"sharp": sharp, "medium": medium, "uniform": uniform}, total=sharp + medium + uniform)
    qv = Section("query_variation", "Query-Side Variation")
    qv.figures.update(mean=query_variation)
    div = Section("diversity", "Diversity Correlation")
    div.figures.update(hidden_diversity=hidden_diversity)
    abl = Section("ablation", "Ablation Study")
    abl.figures.update(attention_matters=attention_matters)
    return [sanity, heads, qv, div, abl]


CASES = {
    # a failed sanity check overrides everything else
    "incorrect": dict(sanity_ok=False, sharp=4, medium=4, attention_matters=True),
    "healthy": dict(sharp=3, medium=5, uniform=0, query_variation=0.3, attention_matters=True),
    # structure without use: the ablation says uniform does as well
    "structured_unused": dict(sharp=2, medium=6, query_variation=0.3, attention_matters=False),
    # Scenario 1: key side uniform, queries differ (> 0.05), the model needs attention
    "scenario_1": dict(medium=2, uniform=6, query_variation=0.08, hidden_diversity=0.2, attention_matters=True),
    # Scenario 2: key side uniform and query side too (< 0.02)
    "scenario_2": dict(uniform=8, query_variation=0.01, attention_matters=True),
    # Scenario 3: uniform attention over diverse hidden states (mu_dist > 0.4), queries in between
    "scenario_3": dict(uniform=8, query_variation=0.03, hidden_diversity=0.55, attention_matters=True),
    "inconclusive": dict(uniform=8, query_variation=0.03, hidden_diversity=0.2, attention_matters=True),
}


@pytest.mark.parametrize("expected", sorted(CASES))
def test_each_rule_is_reached(expected):
    conclusion = conclude(sections(**CASES[expected]), Options())
    assert conclusion.id == expected
    assert conclusion.title and conclusion.lines


def test_uniform_with_an_ablation_that_changes_nothing_is_scenario_2_even_with_query_variation():
    conclusion = conclude(sections(uniform=8, query_variation=0.08, attention_matters=False), Options())
    assert conclusion.id == "scenario_2"
    assert any("makes no difference" in line for line in conclusion.lines)


def test_one_sharp_head_means_attention_is_not_uniform():
    # Half the heads uniform but one sharp head: not "looks uniform" (the rule asks for no sharp head).
    conclusion = conclude(sections(sharp=1, uniform=7, query_variation=0.01, attention_matters=True), Options())
    assert conclusion.id == "healthy"


def test_scenario_1_needs_the_threshold_to_be_passed():
    # Query variation exactly at the seed's 0.05 is not "> 0.05".
    conclusion = conclude(sections(uniform=8, query_variation=0.05, hidden_diversity=0.2, attention_matters=True), Options())
    assert conclusion.id == "inconclusive"
