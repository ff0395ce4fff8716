"""One Finding type and one THRESHOLDS table (attnkit.common.findings) behind analyze, monitor and
check: each feature's JSON keeps its keys and order, non-finite figures stay valid JSON, where a
finding is reads the same in each feature, and every feature's numbers are the table's."""

from __future__ import annotations

import importlib
import json
import math

import pytest

from attnkit.common.findings import THRESHOLDS, Finding, severity_rank, threshold
from attnkit.seam.sites import Site


def _analyze_finding(value=0.11):
    return Finding("entropy_collapse", "warning", layer=0, head=2, value=value, threshold=0.5,
                   message="collapsing", suggestion="lower the logit scale", mitigations=["qk_norm"])


def _monitor_finding(value=50.0):
    return Finding("logit_growth", "warning", step=7, value=value, threshold=100.0, message="growing",
                   site=Site(3, "encoder"), head=1, started=2, projected_steps=math.inf)


def _check_finding(value=12.0):
    return Finding("rounding", "unsafe", value=value, threshold=6.1, message="rounds")


def test_each_feature_keeps_its_json_keys_in_order():
    from attnkit.analyze.diagnose import ISSUE_KEYS as ANALYZE
    from attnkit.check.safety import FINDING_KEYS as CHECK
    from attnkit.monitor.issues import ISSUE_KEYS as MONITOR

    assert _analyze_finding().to_dict(ANALYZE) == {
        "type": "entropy_collapse", "severity": "warning", "layer": 0, "head": 2, "value": 0.11, "threshold": 0.5,
        "message": "collapsing", "suggestion": "lower the logit scale", "mitigations": ["qk_norm"]}
    assert list(_analyze_finding().to_dict(ANALYZE)) == list(ANALYZE)
    assert _monitor_finding().to_dict(MONITOR) == {
        "type": "logit_growth", "severity": "warning", "step": 7, "value": 50.0, "threshold": 100.0,
        "message": "growing", "site": {"layer": 3, "stack": "encoder", "kind": "self"}, "head": 1, "started": 2,
        "projected_steps": "inf", "layer": 3}
    assert list(_monitor_finding().to_dict(MONITOR)) == list(MONITOR)
    assert _check_finding().to_dict(CHECK) == {"kind": "rounding", "status": "unsafe", "value": 12.0, "limit": 6.1,
                                               "message": "rounds"}


@pytest.mark.parametrize("make", [_analyze_finding, _monitor_finding, _check_finding])
@pytest.mark.parametrize("value,shown", [(math.nan, None), (math.inf, "inf"), (-math.inf, "-inf")])
def test_non_finite_figures_are_valid_json(make, value, shown):
    d = make(value).to_dict()
    assert d["value"] == shown
    json.dumps(d, allow_nan=False)  # what the report writers use


def test_where_reads_as_each_feature_wrote_it():
    assert _analyze_finding().where == "head 2 of layer 0"
    assert Finding("nonfinite", "error", layer=4).where == "layer 4"
    assert Finding("loss_spike", "error", step=3).where == "model"
    assert _monitor_finding().where == "encoder layer 3 head 1"
    assert Finding("grad_spike", "warning", site=Site(2)).where == "layer 2"


def test_severities_order_worst_first():
    ranked = sorted(["info", "error", "warning"], key=lambda s: -severity_rank(s))
    assert ranked == ["error", "warning", "info"]


def test_features_judge_by_the_table():
    diagnose = importlib.import_module("attnkit.analyze.diagnose")  # the package exports a function of that name
    from attnkit.check.dtypes import DISTORTION_TOLERANCE
    from attnkit.check.measure import AGREEMENT_FACTOR
    from attnkit.monitor import QKClip, Thresholds

    t = Thresholds()
    assert diagnose.ENTROPY_COLLAPSE_NATS == t.entropy_collapse == threshold("entropy_collapse_nats")
    assert diagnose.SINK_MASS == threshold("sink_mass") != t.sink_mass == threshold("sink_growth_mass")
    assert t.logit_danger == QKClip().tau == threshold("logit_danger")
    assert DISTORTION_TOLERANCE == threshold("distortion_tolerance")
    assert AGREEMENT_FACTOR == threshold("agreement_factor")


@pytest.mark.parametrize("name", list(THRESHOLDS))
def test_every_threshold_says_why(name):
    entry = THRESHOLDS[name]
    assert math.isfinite(entry.value) and entry.unit and len(entry.why) > 40
