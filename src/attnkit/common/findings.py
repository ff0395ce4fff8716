"""What attnkit finds, and the numbers it judges by: one ``Finding`` type and one ``THRESHOLDS`` table.

``analyze`` judges one forward pass (per-head statistics), ``monitor`` the trends of a training
run, ``check`` a logit estimate against a number format. Each has its own detectors, because each
sees different evidence, but all three report the same thing: a ``Finding`` names what was found
(``type``), how bad it is (``severity``), the figure that was measured (``value``), what it was
compared with (``threshold``), a sentence, and where: a layer and head, a call site, a step.

Each feature's JSON keeps its own keys (its schema): ``Finding.to_dict(keys)`` takes the feature's
list of keys, or a map from its key to the field (``check`` says ``kind``/``status``/``limit``).

Every threshold lives in ``THRESHOLDS`` with its unit and the reason for its value, argued once
here. Where two features judge a similar thing by different numbers, they are two named entries
and the reason says why they differ (``sink_mass`` / ``sink_growth_mass``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import KW_ONLY, dataclass, field, fields
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # a site is only carried and printed here: no torch at import time
    from attnkit.seam.sites import Site

SEVERITIES = ("info", "warning", "error")  # analyze and monitor, least severe first
VERDICTS = ("safe", "marginal", "unsafe", "advice")  # check's severities: a number format's verdict


@dataclass(frozen=True)
class Threshold:
    value: float
    unit: str
    why: str


THRESHOLDS: dict[str, Threshold] = {
    # ----------------------------------------------------------------------------- attention entropy
    "entropy_collapse_nats": Threshold(0.5, "nats", (
        "mean row entropy below 0.5 nats: the row behaves like fewer than e^0.5 = 1.65 keys. Its softmax "
        "Jacobian diag(p) - pp^T then has entries of order p(1-p) < 0.16 and gradient reaches almost no key "
        "(Zhai et al. 2023, attention entropy collapse). analyze reports a head below it (with a concentrated "
        "row, below); monitor warns when a head falls below it during training and projects the steps to it.")),
    "entropy_collapse_max_attention": Threshold(0.8, "probability", (
        "analyze's second condition for a collapsed head: its mean largest weight above 0.8, so low entropy "
        "means one key takes the row, not a few keys sharing it evenly.")),
    "positional_mass": Threshold(0.8, "probability", (
        "a collapsed head with this much mass on its own position (or a mean distance of 0.8-1.2 to the "
        "previous token with its largest weight above it) is a positional head, often by design: reported as "
        "info. With this much mass on the first key it is an attention sink instead.")),
    "saturated_logit_range": Threshold(20.0, "logit", (
        "logits spanning more than 20 put e^-20 ~ 2e-9 of the row's mass on the lowest key: the softmax is "
        "saturated and the other keys receive no gradient (said in the collapse suggestion).")),
    "uniform_max_over_uniform": Threshold(1.25, "x 1/n", (
        "a head whose largest weight is below 1.25 x the uniform share 1/n (and normalised entropy above 0.98) "
        "averages its context: a trained head with any preference beats 1.25 x easily; a head whose query or "
        "key projection is dead sits at exactly 1.0.")),
    "uniform_normalized_entropy": Threshold(0.98, "H / ln n", (
        "the uniform head's second condition: its entropy within 2 % of the largest possible, ln n.")),
    "spike_fraction": Threshold(0.25, "share of rows", (
        "a head spikes when at least a quarter of its rows put > 95 % on one key (the row statistic's own "
        "line, attnkit.metrics.accumulate.SPIKE_THRESHOLD) while it is not collapsed on average: sharp, brittle "
        "rows whose gradients vanish for the other keys.")),
    "entropy_drop": Threshold(0.25, "relative", (
        "monitor: a head's entropy fell by a quarter from the first to the last quarter of the trend window. "
        "Together with entropy_heads: entropy collapse across the model, not one head specialising.")),
    "entropy_heads": Threshold(0.5, "share of heads", (
        "monitor: at least half of all heads must show a trend (entropy falling, logits growing) before it is "
        "the model's trouble: one head's trend is a head specialising (it fired on half the healthy runs of "
        "the learning-rate sweep, experiments/monitor_sweep.py).")),
    # ----------------------------------------------------------------------------- attention sinks
    "sink_mass": Threshold(0.3, "probability", (
        "analyze: a head is an attention sink with >= 30 % of its mass on the first visible key (and >= 5 x "
        "its uniform share). Common and usually benign in trained LMs (Xiao et al. 2023), so it is reported as "
        "info, and a low bar describes the model fully.")),
    "sink_ratio": Threshold(5.0, "x 1/n", (
        "analyze: the sink's second condition, its first-key mass at least 5 x the uniform share, so a short "
        "context (where 30 % is close to 1/n) does not count as a sink.")),
    "sink_growth_mass": Threshold(0.5, "probability", (
        "monitor: a head's first-key mass rising (by sink_rise over the window) to >= 50 % is a warning during "
        "training. Higher than analyze's sink_mass on purpose: it warns rather than describes, and heads of "
        "30-50 % sink mass are ordinary in trained LMs.")),
    "sink_rise": Threshold(0.2, "probability", (
        "monitor: the first-key mass must have risen by 0.2 over the trend window: a sink forming now, not one "
        "the model has had all along.")),
    # ----------------------------------------------------------------------------- logits and overflow
    "overflow_headroom": Threshold(16.0, "x", (
        "analyze: |QK^T| within 16 x (4 bits) of the dtype's largest finite value is a warning: longer inputs "
        "or further training will overflow. fp32/bf16 heads that would come this close in fp16 are info.")),
    "logit_danger": Threshold(100.0, "logit", (
        "monitor: a max logit of 100 is the danger line (an error when reached, the target of logit_growth's "
        "projection) and QK-clip's default tau: MuonClip's tau in Kimi K2.")),
    "logit_floor": Threshold(10.0, "logit", (
        "monitor: logit growth below a max logit of 10 is ordinary learning (logits start near 0 and grow "
        "while a model learns).")),
    "growth_min": Threshold(1.25, "x over the window", (
        "monitor: the max logit must have grown by 1.25 x over the trend window to count as growth.")),
    "fit_r2": Threshold(0.8, "R^2", (
        "monitor: log(max logit) must fit a rising line with R^2 >= 0.8: exponential growth, the precursor "
        "of divergence in Wortsman et al. 2023 and ViT-22B, not noise.")),
    "horizon": Threshold(8.0, "window spans", (
        "monitor: logit_growth warns when the fitted line reaches logit_danger within 8 trend windows.")),
    "saturation_horizon": Threshold(2.0, "window spans", (
        "monitor: softmax_saturation (logits growing and entropy falling across the model) needs danger "
        "within 2 windows: chosen on two runs per learning rate of the sweep (experiments/monitor_sweep.py), "
        "judged on held-out runs.")),
    # ----------------------------------------------------------------------------- training signals
    "grad_spike": Threshold(5.0, "x recent max", (
        "monitor: a layer's query/key gradient norm at 5 x the largest of the window before is a spike "
        "(relative to the recent maximum because gradients grow from ~0 at initialisation).")),
    "loss_spike_nats": Threshold(1.0, "nats", (
        "monitor: a step's loss 1 nat above the median of the steps before (e-fold worse perplexity) is a "
        "spike; smaller jumps are ordinary batch noise.")),
    "overflow_headroom_bits": Threshold(0.5, "bits", (
        "monitor: format_overflow and activation_overflow also fire when a figure is within this many bits of its "
        "number format's largest finite value (DTYPE_THRESHOLDS) at overflow_confirm observed steps in a row, "
        "whatever its trend: a figure that drifts into the limit at ~1 % a step is never projected to reach it "
        "within the horizon. Chosen on 150 fp16 design runs of the breaking sweep (experiments/monitor_breaking, "
        "outcomes over 200 steps; 0, 0.1, 0.25 and 0.5 tried): 0.5 bits with 3 observations warned 119 of 123 "
        "failures and none of 27 healthy runs, the projection alone (0) with 2 observations 121 and 1. Runs that sat "
        "within 0.4 bits of 65,504 for a hundred steps without failing in 150 steps went non-finite by step 200.")),
    "overflow_floor_bits": Threshold(8.0, "bits", (
        "monitor: format_overflow projects a figure's trend only from 8 bits (1/256) below the format's "
        "largest value, and the monitor observes densely there (near_limit_every): in the first steps of "
        "training products grow from ~0 by 10x in a few steps, a rate that projects to anything and means "
        "nothing. fp16 runs about to overflow climbed 1-2 bits a step from 5-8 bits below. Chosen on 150 fp16 "
        "design runs of the breaking sweep (experiments/monitor_breaking, outcomes over 200 steps; 6 and 8 tried "
        "with every headroom, horizon and confirm setting): 8 with 0.5 bits of headroom and 3 observations warned "
        "119 of 123 failures and no healthy run, 6 with the same 118.")),
    "overflow_window": Threshold(3, "observed steps", (
        "monitor: format_overflow and activation_overflow fit the growth rate (log of the figure against the "
        "step) over the last 3 observations: the current rate. Over the detectors' full window the first "
        "steps' growth from ~0 dominates and healthy runs are projected to overflow (design seed: 2 warned "
        "2 steps later, 4 warned 2 of 12 healthy runs). Re-checked on 90 fp16 design runs: 2 warned 61 of 63 "
        "failures and 2 of 27 healthy runs, 3 and 4 63 and 1.")),
    "overflow_horizon": Threshold(8.0, "steps", (
        "monitor: format_overflow's and activation_overflow's projection: the current rate reaches the "
        "format's largest value within 8 steps. Chosen on the breaking sweep's design seed (4, 6, 8, 16 tried): "
        "4 warned one failure fewer, a median 3.5 steps ahead instead of 8; 16 warned 5 of 12 healthy runs, "
        "whose products creep toward 65,504 over a hundred steps. Re-checked on 150 fp16 design runs with 200-step "
        "outcomes (8, 16, 32): 16 and 32 warned 6 or more of 27 healthy runs under every other setting.")),
    "overflow_confirm": Threshold(3, "observed steps", (
        "monitor: format_overflow and activation_overflow fire only when their test holds at 3 consecutive "
        "observed steps: one observation's jump is noise. On 90 fp16 design runs (150-step outcomes, no headroom "
        "rule) one observation warned 7 of 27 healthy runs, two 1, three 0 but missed 5 of 63 failures; on 150 "
        "design runs with 200-step outcomes and 0.5 bits of headroom, three warned 119 of 123 failures and no "
        "healthy run, two 122 and 2 healthy runs.")),
    "near_limit_every": Threshold(2, "steps", (
        "monitor: while any head's q·kᵀ product or the largest module output is within overflow_floor_bits of "
        "its number format's largest value (the band where the overflow detectors project), the monitor "
        "observes one step in this many instead of one in `every`: a product climbing 1-2 bits a step crosses "
        "the last bits between two observations 4 steps apart. Chosen on 90 fp16 design runs of the breaking "
        "sweep (experiments/monitor_breaking; off, 1 and 2 tried, with every=4): off warned 58 of 63 failures, "
        "1 in 2 all 63 (1 of 27 healthy runs warned) and every step all 63 but 8 healthy runs (products sit "
        "within a bit of the limit for a hundred steps in runs that survive, and a fit over 3 observations one "
        "step apart reads their noise as growth). The cost: on those runs the share of steps observed rose "
        "from 50 % to 66 %, each observed step costing ~1.3 plain ones; runs far from the limit pay nothing.")),
    "warmup_headroom_bits": Threshold(7.3, "bits", (
        "monitor: warmup_headroom fires when, at the first observed step after the learning rate stopped "
        "rising (the end of its warm-up), a head's q·kᵀ product or the largest module output is within 7.3 bits "
        "(1/160) of its number format's largest finite value: the warm-up alone used up nearly all of the "
        "format's range and the run goes on at its peak rate. Chosen on 330 fp16 runs of the breaking sweep "
        "(experiments/monitor_breaking, seeds 0-10, outcomes over 200 steps) as the widest margin at which it "
        "and the overflow predictors together warn at most 10 % of the healthy runs (6 of 62; 7.0 bits: 4, "
        "7.4: 9). Within one configuration the first steps do not tell the seeds that will fail from those that "
        "will not; across configurations they tell a rate too high for the model, whose failures come a hundred "
        "steps later, after the run has fallen behind the same run at a lower rate.")),
    "scaler_window": Threshold(20, "steps", (
        "monitor: grad_scaler_stall counts the GradScaler's skipped updates (its scale lowered: the scaled "
        "gradients were non-finite) over the last 20 steps: the window of the breaking sweep's failure rule for stalled runs "
        "(experiments/monitor_breaking), long enough that a scaler finding its scale after a burst of overflows "
        "(it halves the scale once per skipped update) is not counted as stalled.")),
    "scaler_skip_share": Threshold(0.8, "share of steps", (
        "monitor: grad_scaler_stall reports a run whose GradScaler skipped at least 80 % of the last "
        "scaler_window updates (16 of 20): its loss stays finite but its weights no longer move. A GradScaler "
        "skips one update when its scale is too high and then halves it, so a run that trains skips a few in a "
        "row at most: on 27 healthy fp16 runs of the breaking sweep at most 2 of any 20 updates were "
        "skipped, on the 12 whose scale collapsed to 1e-32-1e-38, 20 of 20 (6 of them with a finite loss and "
        "no spike: stalled, not diverged).")),
    # ----------------------------------------------------------------------------- number formats (check)
    "distortion_tolerance": Threshold(0.10, "relative weight change", (
        "check: an attention weight may change by at most 10 % (factor e^err - 1 <= 0.10) from rounding the "
        "largest logit; with 4 roundings of |L| 2^-s that puts the largest logit a format holds at "
        "ln(1.1) 2^s / 4: 6.1 in bf16, 48.8 in fp16. The one number check's verdicts rest on.")),
    "high_quantile": Threshold(0.99, "probability", (
        "check: the 'high' estimate is the value the largest logit stays below with 99 % probability: "
        "marginal when only it crosses a limit.")),
    "agreement_factor": Threshold(2.5, "x either way", (
        "check --measure: the weights-based estimate and the measured logits agree within 2.5 x. The estimate "
        "assumes isotropic inputs, which moves single heads by up to ~4 x and model-level figures by up to 2 x "
        "on the shipped models (trained hidden states are not isotropic: norm gains, directions the heads are "
        "tuned to; the reference model's largest logit is predicted at 0.50 x the measured); what it must tell "
        "apart differs by far more (init-scale logits ~0.2 against trained ones ~20).")),
}


def threshold(name: str) -> float:
    """The value of ``THRESHOLDS[name]``."""
    return THRESHOLDS[name].value


# Thresholds that depend on the number format a head's q·kᵀ is computed in (the autocast dtype, else
# the query's): format name -> threshold name -> Threshold. Read by ``dtype_threshold``.
DTYPE_THRESHOLDS: dict[str, dict[str, Threshold]] = {
    "fp16": {
        "qk_product_max": Threshold(65504.0, "q·kᵀ before the softmax scale", (
            "fp16's largest finite value. Eager attention (GPT-2's and Llama's reference code) stores q·kᵀ in "
            "the autocast dtype before multiplying by the scale: a product past 65,504 is inf, its softmax row "
            "NaN, and the loss NaN (an attention temperature t moves the line in logits to 65,504 x scale / t). "
            "The exp limit, ln 65,504 = 11.09, does not bind: softmax subtracts the row maximum and autocast "
            "runs it in fp32.")),
    },
    "bf16": {
        "qk_product_max": Threshold(3.3895313892515355e38, "q·kᵀ before the softmax scale", (
            "bf16 keeps fp32's exponent range: a q·kᵀ product does not overflow at any scale a run reaches. Its "
            "8 significant bits round a logit of 256-512 to a multiple of 2, but on the breaking sweep bf16 "
            "runs with products past 10^6 trained as well as fp32 ones: rounding is no divergence signal there, "
            "so no bf16 rounding alarm (check's distortion_tolerance judges it for inference).")),
    },
    "fp32": {
        "qk_product_max": Threshold(3.4028234663852886e38, "q·kᵀ before the softmax scale", (
            "fp32's largest finite value: out of reach of attention products.")),
    },
}


def dtype_threshold(name: str, fmt: str | None) -> float | None:
    """``DTYPE_THRESHOLDS[fmt][name]``'s value; None for a format (or a threshold) the table lacks."""
    entry = DTYPE_THRESHOLDS.get(fmt or "", {}).get(name)
    return None if entry is None else entry.value


def _json_value(v):
    """JSON has no NaN or Infinity: those become null / "inf" / "-inf"."""
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, tuple) and hasattr(v, "_asdict"):  # a Site: {"layer", "stack", "kind"}
        return dict(v._asdict())
    if isinstance(v, list):
        return list(v)
    return v


@dataclass
class Finding:
    """One thing found, with what it is and how bad positionally and the rest by name. An
    ``analyze`` finding has a layer, head, suggestion and mitigations; a monitor finding has
    the ``site`` of the call, the ``step`` it was seen at, the step its trend ``started`` and the
    ``projected_steps`` until the danger threshold at the current rate (None: no projection)."""

    type: str  # "entropy_collapse", "logit_growth", "qk_overflow", ...
    severity: str  # SEVERITIES (analyze, monitor) or VERDICTS (check)
    _: KW_ONLY  # the rest by name: Finding("overflow_risk", "error", layer=3, head=1, value=..., ...)
    layer: int | None = None  # None: the whole model (or no layer: a number format)
    head: int | None = None
    value: float = math.nan  # the measured figure
    threshold: float = math.nan  # what it was compared with
    message: str = ""
    suggestion: str = ""
    mitigations: list[str] = field(default_factory=list)
    site: "Site | None" = None
    step: int | None = None
    started: int | None = None
    projected_steps: float | None = None

    def __post_init__(self) -> None:
        if self.layer is None and self.site is not None:
            self.layer = self.site.layer

    @property
    def where(self) -> str:
        """``model``; the site's name (``encoder layer 2 head 5``) when a call site is known;
        else ``head 5 of layer 2`` / ``layer 2``."""
        if self.site is not None:
            return f"{self.site} head {self.head}" if self.head is not None else str(self.site)
        if self.layer is None:
            return "model"
        return f"layer {self.layer}" if self.head is None else f"head {self.head} of layer {self.layer}"

    @property
    def key(self) -> tuple:
        """What makes two findings the same standing trouble: (site, head, type)."""
        return (self.site, self.head, self.type)

    # check's words for the same fields (its JSON says kind / status / limit)
    @property
    def kind(self) -> str:
        return self.type

    @property
    def status(self) -> str:
        return self.severity

    @property
    def limit(self) -> float:
        return self.threshold

    def to_dict(self, keys: Iterable[str] | Mapping[str, str] | None = None) -> dict:
        """The finding as JSON: ``keys`` are the feature's keys in its order (or a map from its key to
        the field); None gives every field. Non-finite numbers become null / "inf"; a site, its parts."""
        if keys is None:
            keys = [f.name for f in fields(self)]
        pairs = keys.items() if isinstance(keys, Mapping) else ((k, k) for k in keys)
        return {out: _json_value(getattr(self, name)) for out, name in pairs}


def severity_rank(severity: str) -> int:
    """0 for info, 1 warning, 2 error: sort by ``-severity_rank`` for the worst first."""
    return SEVERITIES.index(severity) if severity in SEVERITIES else -1
