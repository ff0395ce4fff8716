"""Thresholds by number format: the monitor reads the format q·kᵀ is computed in from the attention
call itself (autocast's dtype, else the query's) and its softmax scale, and ``format_overflow``
judges each head's product (max |logit| / scale) against that format's largest value from the shared
table (``DTYPE_THRESHOLDS``)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from attnkit.common.findings import DTYPE_THRESHOLDS, threshold
from attnkit.monitor import AttentionMonitor, Thresholds
from attnkit.monitor.detectors import DETECTORS, Trends
from attnkit.monitor.history import Ring
from attnkit.monitor.interventions import DEFAULT_RULES, format_clip_rule
from attnkit.seam import Site

V, T = 64, 16


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=T, vocab_size=V, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0)
    return GPT2LMHeadModel._from_config(cfg, attn_implementation="eager")


@pytest.mark.parametrize("autocast, want", [(None, "fp32"), (torch.bfloat16, "bf16"), (torch.float16, "fp16")])
def test_the_monitor_records_the_format_and_scale_of_each_call(autocast, want, tmp_path):
    model = gpt2()
    model.transformer.h[0].attn.scaling *= 2.0  # an attention temperature of 1/2: the scale the call gets
    x = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(1))
    with AttentionMonitor(model, every=1, log_dir=tmp_path, emit=()) as monitor:
        with torch.autocast("cpu", dtype=autocast) if autocast else torch.autocast("cpu", enabled=False):
            loss = model(input_ids=x, labels=x).loss
        monitor.on_step(0, loss=loss)
        (site,) = monitor.modules()
        assert monitor.sites_tap.formats[site] == want
        assert monitor.sites_tap.scales[site] == pytest.approx(2.0 * model.transformer.h[0].attn.head_dim ** -0.5)


# the thresholds these cases are laid out on (the trend confirmed at 2 observations, projected from 6 bits
# below the limit, no absolute headroom rule): each case is built to sit on one side of one of them
LAYOUT = Thresholds(overflow_confirm=2, overflow_floor_bits=6.0, overflow_headroom_bits=0.0)


def _trends(product: np.ndarray, formats, scale: float, t: Thresholds | None = None) -> Trends:
    """Trends whose heads' largest |logit| is ``product`` × scale (the most negative logit the larger)."""
    n, s = product.shape
    metrics = {m: np.zeros((n, s)) for m in ("entropy", "sink_mass", "max_attention", "nonfinite_logits")}
    metrics["logit_max"] = 0.5 * product * scale
    metrics["logit_min"] = -product * scale
    return Trends([(Site(0), h) for h in range(s)], [Site(0)], np.arange(0, 4 * n, 4), metrics, np.zeros(0, dtype=int),
                  np.zeros((0, 1)), Ring(8, 1), 0, t or LAYOUT, formats=formats, scales=[scale] * s)


@pytest.mark.parametrize("fmt", sorted(DTYPE_THRESHOLDS))
def test_format_overflow_judges_the_product_against_its_format(fmt):
    limit = DTYPE_THRESHOLDS[fmt]["qk_product_max"].value
    scale = 0.125
    t = LAYOUT
    steps = 8
    floor = limit / 2 ** t.overflow_floor_bits
    ramp = 4.0 ** (np.arange(steps) - steps + 1)  # x4 every observation (4 steps), ending at 1
    # head 0: just under the limit but flat: a product that stopped growing is not heading to overflow;
    # head 1: from above the projection floor, x4 every observation: reaches the limit within the horizon
    #         at the last two observations;
    # head 2: the same rate below the floor: early training's growth from ~0, not projected;
    # head 3: flat above the floor, one x8 jump at the last observation only: not yet a trend (confirm)
    jump = np.full(steps, floor * 2.0)
    jump[-1] *= 8.0
    rows = np.stack([np.full(steps, limit * 0.99), limit * 0.375 * ramp, floor * 0.5 * ramp, jump], 1)
    found = DETECTORS["format_overflow"](_trends(rows, [fmt] * 4, scale))
    assert {i.head for i in found} == {1}
    for i in found:
        assert i.threshold == pytest.approx(limit * scale)  # reported in logits: the product x the scale
        assert i.value == pytest.approx(rows[-1, i.head] * scale)
        # the rate fitted over the last overflow_window observations: x4 per 4 steps
        assert i.projected_steps == pytest.approx(math.log(limit / rows[-1, i.head]) / (math.log(4) / 4), rel=1e-6)
        assert i.projected_steps <= t.overflow_horizon
    # with one observation enough, the jump is a trend too; a near-the-limit rule catches the flat head
    loose = replace(t, overflow_confirm=1, overflow_headroom_bits=1.0)
    found = DETECTORS["format_overflow"](_trends(rows, [fmt] * 4, scale, loose))
    assert {i.head for i in found} == {0, 1, 3}


def _growing(last: float, n: int = 8) -> np.ndarray:
    """A product x2 every observation (4 steps) ending at ``last``: 2 steps from doubling."""
    return (last * 2.0 ** (np.arange(n) - n + 1))[:, None]


def test_only_fp16_has_a_line_within_reach_and_unknown_formats_are_not_judged():
    product = _growing(40000.0)  # q·kᵀ growing to 40,000: 61 % of fp16's largest value, nothing in bf16/fp32
    assert [i.type for i in DETECTORS["format_overflow"](_trends(product, ["fp16"], 0.25))] == ["format_overflow"]
    for fmt in ("bf16", "fp32", None, "fp64"):
        assert DETECTORS["format_overflow"](_trends(product, [fmt], 0.25)) == []
    assert threshold("overflow_headroom_bits") >= 0


def test_default_policy_clips_below_the_format_limit():
    (issue,) = DETECTORS["format_overflow"](_trends(_growing(40000.0), ["fp16"], 0.25))
    action = DEFAULT_RULES["format_overflow"](issue)
    assert action.name == "qk_clip+reduce_lr"
    clip, slower = action.parts
    assert clip.tau == pytest.approx(65504.0 * 0.25 / 8) and clip.persistent and slower.factor == 0.5
    alone = format_clip_rule(lr_factor=None)(issue)
    assert alone.name == "qk_clip" and alone.tau == clip.tau


@pytest.mark.parametrize("autocast, fires", [(torch.float16, True), (None, False)])
def test_activation_overflow_sees_an_mlp_near_the_format_limit(autocast, fires, tmp_path):
    model = gpt2()
    x = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(1))
    mlp = model.transformer.h[0].mlp
    with torch.no_grad():  # an MLP whose output grows 20,000 -> 30,000 -> 45,000 (69 % of fp16's largest value)
        mlp.c_fc.weight.mul_(2000.0)  # both halves scaled, so no weight itself leaves fp16's range
        caught = {}
        hook = mlp.c_proj.register_forward_hook(lambda _m, _i, o: caught.update(top=o.abs().amax().item()))
        model(input_ids=x)
        hook.remove()
        mlp.c_proj.weight.mul_(20000.0 / caught["top"])
        mlp.c_proj.bias.mul_(20000.0 / caught["top"])
    outputs = {}  # the reference: every leaf module's output, caught by our own hooks

    def keep(module, _inputs, output):
        outputs[module] = output.detach().abs().amax().item()

    hooks = [m.register_forward_hook(keep) for m in model.modules() if next(m.children(), None) is None]
    try:
        with AttentionMonitor(model, every=1, log_dir=tmp_path, emit=(), thresholds=LAYOUT) as monitor:
            found = []
            for step in range(3):
                if step:  # x1.5 a step: 1 step from 65,504 at the last, the test held at the two last steps
                    with torch.no_grad():
                        mlp.c_proj.weight.mul_(1.5)
                        mlp.c_proj.bias.mul_(1.5)
                with torch.autocast("cpu", dtype=autocast) if autocast else torch.autocast("cpu", enabled=False):
                    loss = model(input_ids=x, labels=x).loss
                found += monitor.on_step(step, loss=loss).new
            recorded = monitor.last_value("activation_absmax", *monitor.series[0])
    finally:
        for h in hooks:
            h.remove()
    top = outputs[mlp.c_proj]
    assert recorded == pytest.approx(max(outputs.values()), rel=1e-6)
    assert recorded == pytest.approx(top, rel=1e-6) and 32752 < top < 65504
    assert [i.type for i in found if i.type == "activation_overflow"] == (["activation_overflow"] if fires else [])
