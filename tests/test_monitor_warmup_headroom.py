"""``warmup_headroom``: at the end of the learning-rate warm-up (the first observed step at which the
optimizer's rate, having risen, no longer rose), a q·kᵀ product or module output within
``warmup_headroom_bits`` of its number format's largest value is reported once, and the default
policies cut the rate to a quarter there (schedule included). The rate is what the monitor records
from the optimizer; a replay of the recording finds the same finding at the same step."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from attnkit.common.findings import DTYPE_THRESHOLDS
from attnkit.monitor import DEFAULT_RULES, ROLLBACK_RULES, AttentionMonitor, Policy, Thresholds
from attnkit.monitor.detectors import Trends, warmup_ended_now, warmup_headroom
from attnkit.monitor.history import Ring
from attnkit.monitor.replay import replay
from attnkit.seam import Site

FP16 = DTYPE_THRESHOLDS["fp16"]["qk_product_max"].value
V, T = 64, 16


@pytest.mark.parametrize("lrs, ended", [
    ([0.1, 0.2, 0.3, 0.3], True),  # linear warm-up, then constant: the first flat step
    ([0.1, 0.2, 0.3, 0.3, 0.3], False),  # ... and not again
    ([0.1, 0.2, 0.3, 0.25], True),  # warm-up, then decay
    ([0.1, 0.2, 0.3, 0.25, 0.2], False),  # the decay is not a second end
    ([0.3, 0.3, 0.3], False),  # constant: no warm-up
    ([0.3, 0.2, 0.1], False),  # decay from the start: no warm-up
    ([0.3, 0.2, 0.2], False),
    ([0.1, 0.2], False),  # still rising
    ([0.1, math.nan, 0.2, 0.2], False),  # no optimizer at some step: not judged
    ([0.2], False),
])
def test_the_end_of_a_warm_up_is_the_first_step_the_rate_stops_rising(lrs, ended):
    assert warmup_ended_now(np.asarray(lrs)) is ended


def _trends(product_bits: float, activation_bits: float | None, lrs, formats=("fp16", "fp16"), scale=0.25,
            t: Thresholds | None = None) -> Trends:
    """Two heads, the second with a q·kᵀ product ``product_bits`` below fp16's limit at the newest step."""
    n = len(lrs) if lrs is not None else len(WARMED)
    metrics = {m: np.zeros((n, 2)) for m in ("entropy", "sink_mass", "max_attention", "nonfinite_logits")}
    product = np.full((n, 2), FP16 / 2.0 ** 20)
    product[-1, 1] = FP16 / 2.0 ** product_bits
    metrics["logit_max"] = 0.5 * product * scale
    metrics["logit_min"] = -product * scale
    if activation_bits is not None:
        metrics["activation_absmax"] = np.full((n, 2), FP16 / 2.0 ** activation_bits)
    if lrs is not None:
        metrics["learning_rate"] = np.repeat(np.asarray(lrs, dtype=float)[:, None], 2, axis=1)
    return Trends([(Site(0), 0), (Site(0), 1)], [Site(0)], np.arange(n), metrics, np.zeros(0, dtype=int),
                  np.zeros((0, 1)), Ring(8, 1), 0, t or Thresholds(warmup_headroom_bits=7.0),
                  formats=list(formats), scales=[scale, scale])


WARMED = [0.1, 0.2, 0.3, 0.3]


@pytest.mark.parametrize("product_bits, activation_bits, lrs, formats, fires, where", [
    (6.0, None, WARMED, ("fp16", "fp16"), True, (Site(0), 1)),  # a product 6 bits below the limit: the head named
    (8.0, None, WARMED, ("fp16", "fp16"), False, None),  # 8 bits below: room left
    (8.0, 5.0, WARMED, ("fp16", "fp16"), True, None),  # a module output 5 bits below: the model, no head
    (6.0, None, [0.1, 0.2, 0.3, 0.4], ("fp16", "fp16"), False, None),  # the warm-up goes on: not yet
    (6.0, None, [0.1, 0.2, 0.3, 0.3, 0.3], ("fp16", "fp16"), False, None),  # past its end: once only
    (6.0, None, [0.3, 0.3, 0.3, 0.3], ("fp16", "fp16"), False, None),  # no warm-up
    (6.0, None, None, ("fp16", "fp16"), False, None),  # no optimizer, no rates recorded
    (6.0, None, WARMED, ("bf16", "bf16"), False, None),  # the same product is nowhere near bf16's range
])
def test_warmup_headroom_fires_at_the_end_of_the_warm_up_near_the_formats_limit(product_bits, activation_bits, lrs,
                                                                               formats, fires, where):
    found = warmup_headroom(_trends(product_bits, activation_bits, lrs, formats))
    assert len(found) == int(fires)
    if fires:
        (f,) = found
        assert f.type == "warmup_headroom" and f.step == len(lrs) - 1 and f.threshold == FP16
        assert (f.site, f.head) == (where or (None, None))
        bits = activation_bits if activation_bits is not None and activation_bits < product_bits else product_bits
        assert f.value == pytest.approx(FP16 / 2.0 ** bits)
        assert f"{bits:.1f} bits below fp16's largest value" in f.message


def test_the_default_policies_cut_the_rate_to_a_quarter():
    for rules in (DEFAULT_RULES, ROLLBACK_RULES):
        (f,) = warmup_headroom(_trends(6.0, None, WARMED))
        action = rules["warmup_headroom"](f)
        assert (action.name, action.factor) == ("warmup_rate_cut", 0.25)


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=T, vocab_size=V, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0)
    return GPT2LMHeadModel._from_config(cfg, attn_implementation="eager")


def _train(log_dir, bits: float, steps: int = 6, warmup: int = 3, every: int = 1, dtype=torch.float16,
           before_step=None, act: bool = True):
    """A tiny GPT-2 in autocast (fp16 by default) with a linear warm-up over ``warmup`` steps and the default
    policy (none without ``act``); the threshold ``bits`` decides whether its (far from the limit) figures count as near it.
    ``before_step(step, monitor, sched)``: a hook run before each step. Returns the rates used at each step,
    the monitor's interventions, the scheduler's base rate at the end and the observed steps."""
    model = _gpt2()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    x = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(1))
    used = []
    with AttentionMonitor(model, every=every, log_dir=log_dir, emit=("jsonl",), optimizer=opt, scheduler=sched,
                          policy=Policy() if act else None, thresholds=Thresholds(warmup_headroom_bits=bits)) as monitor:
        for step in range(steps):
            if before_step is not None:
                before_step(step, monitor, sched)
            used.append(opt.param_groups[0]["lr"])
            with torch.autocast("cpu", dtype=dtype):
                loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            sched.step()
            monitor.on_step(step, loss=loss)
    observed = [json.loads(line)["step"] for line in (log_dir / "monitor.jsonl").read_text().splitlines()
                if '"type": "step"' in line]
    return used, list(monitor.interventions), sched.base_lrs[0], observed


def test_a_run_that_ends_its_warm_up_near_the_limit_trains_on_at_a_quarter_of_the_rate(tmp_path):
    used, interventions, base, _ = _train(tmp_path, bits=40.0)  # 40 bits: any fp16 figure counts as near
    # rates read after steps 0, 1, 2: 2/3, 1, 1 of the peak: the warm-up ended at step 2, acted on there
    assert [i["step"] for i in interventions] == [2]
    assert interventions[0]["action"] == "warmup_rate_cut"
    assert used == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 2.5e-4, 2.5e-4, 2.5e-4])  # the schedule keeps the cut
    assert base == pytest.approx(2.5e-4)
    # the recording replays to the same finding at the same step
    (found,) = [i for i in replay(tmp_path / "monitor.jsonl", Thresholds(warmup_headroom_bits=40.0),
                                  ("warmup_headroom",))]
    assert found.step == 2


def test_a_run_with_room_left_is_not_touched(tmp_path):
    used, interventions, _, _ = _train(tmp_path, bits=1.0)
    assert interventions == []
    assert used == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3, 1e-3, 1e-3])


def test_in_fp16_the_monitor_observes_every_step_of_the_warm_up_so_its_end_is_judged_where_it_happens(tmp_path):
    # one step in 16 otherwise: the warm-up's steps 1 and 2 are observed because the rate is still rising
    _, interventions, _, observed = _train(tmp_path, bits=40.0, steps=6, every=16)
    assert observed == [0, 1, 2]
    assert [(i["step"], i["action"]) for i in interventions] == [(2, "warmup_rate_cut")]


def test_in_bf16_the_warm_up_is_not_observed_densely(tmp_path):
    # bf16's limit is out of any run's reach: nothing to judge, no extra observations
    _, interventions, _, observed = _train(tmp_path / "bf16", bits=40.0, steps=6, every=16, dtype=torch.bfloat16)
    assert observed == [0] and interventions == []


def _issues(log_dir, kind: str = "warmup_headroom") -> list[int]:
    return [r["step"] for r in map(json.loads, (log_dir / "monitor.jsonl").read_text().splitlines())
            if r["type"] == "issue" and r["issue"] == kind]


def test_a_cut_during_the_warm_up_is_not_its_end(tmp_path):
    from attnkit.monitor import ReduceLR

    def cut_at_2(step, monitor, sched):
        if step == 2:  # the rate falls while the schedule still rises: not the end of the warm-up
            monitor.apply(ReduceLR(0.5))
    _, interventions, _, _ = _train(tmp_path, bits=40.0, warmup=5, before_step=cut_at_2)
    assert [i["action"] for i in interventions] == ["reduce_lr"]
    assert _issues(tmp_path) == []


def test_a_rollback_that_replays_the_warm_up_does_not_judge_it_again(tmp_path):
    state = {}

    def replay_warm_up_at_4(step, monitor, sched):
        if step == 0:
            state["sched"] = sched.state_dict()
        if step == 4:  # what a rollback to the start does: the schedule restored, the monitor's history dropped
            sched.load_state_dict(state["sched"])
            monitor.forget_history()
    for act in (True, False):  # with the cut (the rate the monitor set) and without any action
        log_dir = tmp_path / str(act)
        _, interventions, _, _ = _train(log_dir, bits=40.0, steps=9, before_step=replay_warm_up_at_4, act=act)
        assert [(i["step"], i["action"]) for i in interventions] == ([(2, "warmup_rate_cut")] if act else [])
        assert _issues(log_dir) == [2]  # warned once: the replayed warm-up's end is not a second one
