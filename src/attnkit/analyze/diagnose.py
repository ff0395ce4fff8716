"""Diagnoses: per-head statistics in, findings with a measured value, a threshold and a fix out.

Each detector is a plain function of one head's statistics (and the run's context) that
returns a ``Finding`` or None; ``DETECTORS`` is the registry. What each looks for (the numbers,
and why they sit where they do, are ``attnkit.common.findings.THRESHOLDS``):

entropy_collapse   mean row entropy < entropy_collapse_nats and mean largest weight >
                   entropy_collapse_max_attention. Heads that concentrate on their own or the
                   previous position are positional heads, often by design: reported as info.
                   Concentration on the first token is an attention sink, reported as such instead.
uniform_attention  largest weight < uniform_max_over_uniform x the uniform share 1/n and
                   normalised entropy > uniform_normalized_entropy: the head averages its context.
attention_spike    >= spike_fraction of rows put > 95 % on a single key while the head is not
                   collapsed on average.
attention_sink     >= sink_mass on the first visible key and >= sink_ratio x its uniform share.
overflow_risk      the largest |q.k| before scaling against the dtype in use: error when it
                   reached the largest finite value (65,504 in fp16), warning within
                   overflow_headroom of it. In fp16, logits above ln(65504) = 11.09 overflow an exp
                   that does not subtract the row maximum (a warning for hand-written kernels;
                   PyTorch's and transformers' softmax subtract it). For fp32/bf16 runs, heads that
                   would not survive fp16 are reported as info.
nonfinite          NaN/Inf logits: names the first layer (in call order) where they appear, the
                   logits that led there, and whether QK^T overflowed or NaN arrived from below.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from attnkit.analyze.mitigations import Mitigation
from attnkit.common.findings import Finding, severity_rank, threshold
from attnkit.metrics.numeric import exp_overflow_threshold, max_finite

# One letter per issue type, for the layer x head grids of the console and the plots.
ISSUE_LETTERS = {
    "nonfinite": "N", "overflow_risk": "O", "entropy_collapse": "C", "uniform_attention": "U",
    "attention_spike": "P", "attention_sink": "S",
}
# The keys of an issue in analyze's JSON, in order (``Finding.to_dict``).
ISSUE_KEYS = ("type", "severity", "layer", "head", "value", "threshold", "message", "suggestion", "mitigations")

ENTROPY_COLLAPSE_NATS = threshold("entropy_collapse_nats")
ENTROPY_COLLAPSE_MAX_ATTENTION = threshold("entropy_collapse_max_attention")
POSITIONAL_MASS = threshold("positional_mass")
SATURATED_LOGIT_RANGE = threshold("saturated_logit_range")
UNIFORM_MAX_OVER_UNIFORM = threshold("uniform_max_over_uniform")
UNIFORM_NORMALIZED_ENTROPY = threshold("uniform_normalized_entropy")
SPIKE_FRACTION = threshold("spike_fraction")
SINK_MASS = threshold("sink_mass")
SINK_RATIO = threshold("sink_ratio")
OVERFLOW_HEADROOM = threshold("overflow_headroom")
FP16_MAX = 65504.0  # the largest finite float16
FP16_EXP_LIMIT = math.log(FP16_MAX)  # 11.09


@dataclass
class Context:
    dtype: torch.dtype
    mitigations: list[Mitigation]


Detector = Callable[[dict, Context], "Finding | None"]


def _where(h: dict) -> str:
    return f"head {h['head']} of layer {h['layer']}"


def _pattern(h: dict) -> str | None:
    if h["diagonal_mass"] >= POSITIONAL_MASS:
        return "self"
    if 0.8 <= h["mean_distance"] <= 1.2 and h["max_attention"] >= POSITIONAL_MASS:
        return "previous"
    return None


def entropy_collapse(h: dict, ctx: Context) -> Finding | None:
    if not (h["entropy"] < ENTROPY_COLLAPSE_NATS and h["max_attention"] > ENTROPY_COLLAPSE_MAX_ATTENTION):
        return None
    if h["sink_mass"] >= POSITIONAL_MASS:
        return None  # an attention sink; attention_sink says it
    pattern = _pattern(h)
    saturated = h["logit_range"] > SATURATED_LOGIT_RANGE
    if pattern:
        target = "its own position" if pattern == "self" else "the previous token"
        return Finding(
            "entropy_collapse", "info", layer=h["layer"], head=h["head"], value=h["entropy"], threshold=ENTROPY_COLLAPSE_NATS,
            message=f"{_where(h)} attends almost only to {target} (entropy {h['entropy']:.2f} nats, "
            f"largest weight {h['max_attention']:.2f}): a positional head",
            suggestion="usually by design; if it was not meant to be positional, check its query/key projections",
        )
    return Finding(
        "entropy_collapse", "warning", layer=h["layer"], head=h["head"], value=h["entropy"],
        threshold=ENTROPY_COLLAPSE_NATS,
        message=f"{_where(h)} is collapsing to one token: entropy {h['entropy']:.2f} nats "
        f"(≈{h['effective_keys']:.2f} keys), largest weight {h['max_attention']:.2f}, "
        f"logits span {h['logit_range']:.1f}",
        suggestion="lower the logit scale for this head (temperature > 1 or soft-capping via attnkit's score mods), "
        "add QK-norm, an entropy regulariser or attention dropout; "
        + ("the logits are saturated (range > 20), so the other keys get no gradient" if saturated
           else "watch whether it sharpens further during training"),
    )


def uniform_attention(h: dict, ctx: Context) -> Finding | None:
    if not (h["max_over_uniform"] < UNIFORM_MAX_OVER_UNIFORM and h["normalized_entropy"] > UNIFORM_NORMALIZED_ENTROPY):
        return None
    return Finding(
        "uniform_attention", "warning", layer=h["layer"], head=h["head"], value=h["max_over_uniform"],
        threshold=UNIFORM_MAX_OVER_UNIFORM,
        message=f"{_where(h)} attends uniformly: its largest weight is {h['max_over_uniform']:.3f} × 1/n "
        f"(normalised entropy {h['normalized_entropy']:.3f}, logits span {h['logit_range']:.3f})",
        suggestion="the head only averages its context: check that its query/key weights are not zero or frozen and "
        "receive gradient, that the logit scale is not too small (temperature < 1), or add an output gate "
        "(gated attention, Qiu et al. 2025: attnkit.gate.add_gates, then train); run `attnkit validate` to see whether ablating it changes the loss",
    )


def attention_spike(h: dict, ctx: Context) -> Finding | None:
    # Written as "not (...)" so NaN statistics (a head with no finite row) never fire.
    if not (h["spike_fraction"] >= SPIKE_FRACTION and h["entropy"] >= ENTROPY_COLLAPSE_NATS):
        return None
    return Finding(
        "attention_spike", "warning", layer=h["layer"], head=h["head"], value=h["spike_fraction"], threshold=SPIKE_FRACTION,
        message=f"{_where(h)} spikes: in {100 * h['spike_fraction']:.0f}% of rows one key takes > 95% "
        f"(logits up to {h['logit_max']:.1f})",
        suggestion="nearly one-hot rows pass no gradient to the other keys; soft-cap or clamp the logits, or add "
        "attention dropout",
    )


def attention_sink(h: dict, ctx: Context) -> Finding | None:
    if not (h["sink_mass"] >= SINK_MASS and h["sink_ratio"] >= SINK_RATIO):
        return None
    return Finding(
        "attention_sink", "info", layer=h["layer"], head=h["head"], value=h["sink_mass"], threshold=SINK_MASS,
        message=f"{_where(h)} is an attention sink: {100 * h['sink_mass']:.0f}% of its mass on the first token, "
        f"{h['sink_ratio']:.1f}× its uniform share",
        suggestion="usually benign (a 'no-op' head); keep the first token when truncating or windowing the KV cache "
        "(StreamingLLM), or give the model an explicit sink token / gated attention if it is unwanted",
    )


def overflow_risk(h: dict, ctx: Context) -> Finding | None:
    dtype_max = max_finite(ctx.dtype)
    qk, lmax = h["qk_absmax"], h["logit_max"]
    name = str(ctx.dtype).replace("torch.", "")
    if qk >= dtype_max:
        return Finding(
            "overflow_risk", "error", layer=h["layer"], head=h["head"], value=qk, threshold=dtype_max,
            message=f"{_where(h)}: QK^T overflowed {name} (max finite {dtype_max:.4g})",
            suggestion="compute attention scores in float32 (upcast q and k), scale queries before the product, "
            "or add QK-norm / soft-capping",
        )
    if qk > dtype_max / OVERFLOW_HEADROOM:
        return Finding(
            "overflow_risk", "warning", layer=h["layer"], head=h["head"], value=qk, threshold=dtype_max / OVERFLOW_HEADROOM,
            message=f"{_where(h)}: |QK^T| reaches {qk:.4g}, within {dtype_max / qk:.1f}× of {name}'s max {dtype_max:.4g}",
            suggestion="little headroom: longer inputs or further training will overflow; upcast scores to float32 "
                       "or add QK-norm",
        )
    exp_limit = exp_overflow_threshold(ctx.dtype)
    if ctx.dtype == torch.float16 and lmax > exp_limit:
        return Finding(
            "overflow_risk", "warning", layer=h["layer"], head=h["head"], value=lmax, threshold=exp_limit,
            message=f"{_where(h)}: logits reach {lmax:.1f} and fp16 exp overflows at {exp_limit:.1f}",
            suggestion="safe only with a max-subtracting softmax (PyTorch's is); a hand-written kernel must subtract the "
            "row max or compute the softmax in float32",
        )
    if ctx.dtype != torch.float16 and qk > FP16_MAX / OVERFLOW_HEADROOM:
        return Finding(
            "overflow_risk", "info", layer=h["layer"], head=h["head"], value=qk, threshold=FP16_MAX / OVERFLOW_HEADROOM,
            message=f"{_where(h)}: |QK^T| reaches {qk:.4g}; in fp16 (max 65,504) this head would overflow or come within 4 bits",
            suggestion="keep this model's attention scores in float32 or bf16 if you move to fp16",
        )
    return None


DETECTORS: dict[str, Detector] = {
    "entropy_collapse": entropy_collapse,
    "uniform_attention": uniform_attention,
    "attention_spike": attention_spike,
    "attention_sink": attention_sink,
    "overflow_risk": overflow_risk,
}


def nonfinite(heads: list[dict], call_order: list[int]) -> Finding | None:
    """The first layer (in the order calls ran) whose logits went NaN/Inf, and what led there."""
    bad = {(h["layer"], h["head"]): h for h in heads if h["nonfinite_rows"] > 0}
    if not bad:
        return None
    order = call_order + sorted({layer for layer, _ in bad} - set(call_order))
    first = next(layer for layer in order if any(k[0] == layer for k in bad))
    in_layer = [h for (layer, _), h in sorted(bad.items()) if layer == first]
    worst = max(in_layer, key=lambda h: h["nonfinite_logits"])
    before = [h for h in heads if h["layer"] == order[order.index(first) - 1]] if order.index(first) > 0 else []
    qk = max(h["qk_absmax"] for h in in_layer)
    nan = sum(h["nan_logits"] for h in in_layer)
    lmax = max(h["logit_max"] for h in in_layer)
    trail = f"; logits in layer {before[0]['layer']} reached {max(h['logit_max'] for h in before):.1f}" if before else ""
    heads_txt = ", ".join(str(h["head"]) for h in in_layer)
    if nan == 0 or math.isinf(qk):
        cause = f"QK^T overflow: |QK^T| reached {qk:.4g} and logits {lmax:.1f}"
        fix = "compute attention scores in float32, clamp or soft-cap the logits, or add QK-norm"
    else:
        cause = f"NaN arrives in the queries/keys ({int(nan)} NaN logits)"
        fix = "NaN comes from below this layer: check the weights (NaN/Inf parameters) and the previous layers' outputs"
    return Finding(
        "nonfinite", "error", layer=first, head=worst["head"], value=worst["nonfinite_logits"], threshold=0.0,
        message=f"non-finite attention first appears in layer {first} (heads {heads_txt}): {cause}{trail}",
        suggestion=fix,
    )


def diagnose(heads: list[dict], dtype: torch.dtype, mitigations: list[Mitigation], call_order: list[int]) -> list[Finding]:
    """All issues for the heads of one analysis, most severe first."""
    ctx = Context(dtype=dtype, mitigations=mitigations)
    issues: list[Finding] = []
    first_bad = nonfinite(heads, call_order)
    if first_bad:
        issues.append(first_bad)
    for h in heads:
        # Heads with no finite row have NaN means; every detector compares so that NaN never fires.
        for detect in DETECTORS.values():
            issue = detect(h, ctx)
            if issue is not None:
                issue.mitigations = [m.detail for m in mitigations if issue.type in m.addresses]
                issues.append(issue)
    issues.sort(key=lambda i: (-severity_rank(i.severity), i.layer if i.layer is not None else -1, i.head or 0))
    return issues
