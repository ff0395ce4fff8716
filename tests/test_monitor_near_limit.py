"""Observation near a number format's limit, and the GradScaler-stall finding.

- ``near_limit_every``: while the latest observed step put a head's q·kᵀ product (or the largest module
  output) within the overflow floor of its format's largest value, the monitor observes one step in
  ``near_limit_every``; the replay of an every-step recording decides the same schedule and raises the
  live monitor's warnings, and a planted growth that crosses the limit between two sparse observations
  is warned with it and missed without it.
- ``grad_scaler_stall``: a real ``torch.amp.GradScaler`` in fp16 autocast whose gradients overflow at
  every step (planted) is reported with the scaler's own count and scale; a healthy run is not; and
  the monitor emits no RuntimeWarning on such a run (its gradient norms are NaN at every step).
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from attnkit.common.findings import dtype_threshold
from attnkit.errors import UserError
from attnkit.monitor import AttentionMonitor, Thresholds
from attnkit.monitor.replay import first_step, replay
from attnkit.seam.layouts import qk_layout

V, T = 64, 16
LIMIT = dtype_threshold("qk_product_max", "fp16")  # 65,504
PREDICTORS = ("format_overflow", "activation_overflow")
# the thresholds the planted runs below are laid out on: the projection from 6 bits below the limit, confirmed
# at 2 observations, no absolute headroom rule (so that only the schedule decides whether a crossing is seen)
LAYOUT = Thresholds(overflow_floor_bits=6.0, overflow_confirm=2, overflow_headroom_bits=0.0)


def gpt2(layers: int = 1):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=layers, n_head=2, n_embd=16, n_positions=T, vocab_size=V, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel._from_config(cfg, attn_implementation="eager")


X = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(1))


def _product(model) -> float:
    """Head 0's largest |q·kᵀ| on X, in float64 from the weights (the planted head)."""
    attn = model.transformer.h[0].attn
    with torch.no_grad():
        hidden = model.transformer.h[0].ln_1(model.transformer.wte(X) + model.transformer.wpe(torch.arange(T)))
        q, k, _ = attn.c_attn(hidden).double().split(16, dim=2)
        q, k = q[..., :8], k[..., :8]  # head 0
        s = q @ k.transpose(-1, -2)
        s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), 0.0)
    return float(s.abs().max())


def planted_run(log_dir, steps: int, start_bits: float, every: int, near_limit_every, growth: float = 2.0):
    """Head 0's W_q and W_k multiplied so its q·kᵀ product starts ``start_bits`` below fp16's limit, then × growth
    after every step (1 bit a step at 2.0), forwards in fp16 autocast. Returns the monitor's new
    predictor warnings, the observed steps, and the step the product passes the limit (from the weights)."""
    model = gpt2().eval()
    layout = qk_layout(model.transformer.h[0].attn)
    grow = lambda factor: (layout.scale_query(0, factor ** 0.5), layout.scale_key(0, factor ** 0.5))  # noqa: E731
    grow(LIMIT / 2.0 ** start_bits / _product(model))  # q and k alike: no module output nears the limit
    crossed, warned = None, []
    with AttentionMonitor(model, every=every, near_limit_every=near_limit_every, log_dir=log_dir, emit=(),
                          detectors=PREDICTORS, trace_nonfinite=False, thresholds=LAYOUT) as monitor:
        for step in range(steps):
            if crossed is None and _product(model) > LIMIT:
                crossed = step
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
                model(input_ids=X)
            d = monitor.on_step(step)
            warned += d.new if d else []
            grow(growth)
    observed = [json.loads(line)["step"] for line in (log_dir / "monitor.jsonl").read_text().splitlines()
                if '"type": "step"' in line]
    return warned, observed, crossed


def test_a_growth_crossing_between_sparse_observations_is_warned_only_with_dense_observation_near_the_limit(tmp_path):
    # 1 bit a step from 11.5 bits below 65,504: observed at 4 (7.5 bits below: under the 6-bit floor) and 8
    # (3.5 bits below); the product passes the limit at step 12 - between two observations 4 steps apart
    sparse, seen_sparse, crossed = planted_run(tmp_path / "sparse", 14, 11.5, every=4, near_limit_every=None)
    assert crossed == 12 and seen_sparse == [0, 4, 8, 12]
    assert first_step(sparse, PREDICTORS) is None or first_step(sparse, PREDICTORS) >= crossed
    dense, seen_dense, crossed = planted_run(tmp_path / "dense", 14, 11.5, every=4, near_limit_every=1)
    assert seen_dense[:3] == [0, 4, 8] and {9, 10, 11} <= set(seen_dense)  # every step once within the floor
    warning = next(i for i in dense if i.type == "format_overflow")
    assert warning.head == 0 and warning.step < crossed


def test_replay_of_an_every_step_recording_gives_the_near_limit_schedule_s_warnings(tmp_path):
    """A live monitor at every=4, near_limit_every=1 against the replay of the same run recorded at every
    step: the same warnings (type, step, head), decided on the same observed steps."""
    live, seen, _ = planted_run(tmp_path / "live", 16, 14.0, every=4, near_limit_every=1, growth=1.6)
    planted_run(tmp_path / "every", 16, 14.0, every=1, near_limit_every=None, growth=1.6)
    replayed = replay(tmp_path / "every", LAYOUT, detectors=PREDICTORS, every=4, near_limit_every=1)
    key = lambda i: (i.type, i.step, i.site, i.head)  # noqa: E731
    assert live and sorted(map(key, replayed)) == sorted(map(key, live))
    assert len(seen) > len(range(0, 16, 4))  # the schedule went dense somewhere
    sparse = replay(tmp_path / "every", LAYOUT, detectors=PREDICTORS, every=4)
    assert sorted(map(key, sparse)) != sorted(map(key, live))


def test_bad_near_limit_every_fails_before_training(tmp_path):
    for bad in (0, 1.5, True):
        with pytest.raises(UserError, match="near_limit_every"):
            AttentionMonitor(gpt2(), near_limit_every=bad, log_dir=tmp_path, emit=())
    with pytest.raises(UserError, match="grad_scaler"):
        AttentionMonitor(gpt2(), grad_scaler=object(), log_dir=tmp_path, emit=())


def scaler_run(log_dir, overflow: bool, steps: int = 24):
    """A tiny GPT-2 trained in fp16 autocast with a real GradScaler; ``overflow``: the loss × 1e30, so
    every backward overflows fp16 (planted). Returns the findings, the scales after each update and
    the RuntimeWarnings the monitor raised."""
    model = gpt2(layers=2).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    scales, found = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        with AttentionMonitor(model, every=4, log_dir=log_dir, emit=(), optimizer=opt, grad_scaler=scaler,
                              trace_nonfinite=False) as monitor:
            for step in range(steps):
                with torch.autocast("cpu", dtype=torch.float16):
                    loss = model(input_ids=X, labels=X).loss
                scaler.scale(loss * (1e30 if overflow else 1.0)).backward()
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
                scales.append(scaler.get_scale())
                d = monitor.on_step(step, loss=loss)
                found += d.new if d else []
    return found, scales, [w for w in caught if issubclass(w.category, RuntimeWarning)]


def test_a_gradscaler_that_skips_every_update_is_reported_with_its_own_count_and_scale(tmp_path):
    found, scales, runtime_warnings = scaler_run(tmp_path, overflow=True)
    stall = [i for i in found if i.type == "grad_scaler_stall"]
    assert len(stall) == 1, [i.type for i in found]
    (issue,) = stall
    # the scaler's own record: an update skipped <=> its scale went down
    window = Thresholds().scaler_window
    before = [65536.0] + scales
    skipped = [after < prior for prior, after in zip(before, scales)]
    assert all(skipped)  # planted: every backward overflowed
    assert issue.step == 20  # the first observed step (1 in 4) with a full window of 20 updates behind it
    assert issue.value == sum(skipped[issue.step - window + 1:issue.step + 1]) / window == 1.0
    assert f"{window} of the last {window} steps" in issue.message
    assert f"{scales[issue.step]:.3g}" in issue.message and "training has stopped" in issue.message
    assert runtime_warnings == []  # NaN gradient norms at every step: no "All-NaN slice" warning
    rows = [json.loads(line) for line in (tmp_path / "monitor.jsonl").read_text().splitlines()]
    recorded = {r["step"]: r["grad_scale"] for r in rows if r["type"] == "step"}
    assert recorded == {s: scales[s] for s in range(0, 24, 4)}


def test_a_healthy_fp16_run_gets_no_stall_finding(tmp_path):
    found, scales, runtime_warnings = scaler_run(tmp_path, overflow=False)
    assert scales[-1] == 65536.0 and not [i for i in found if i.type == "grad_scaler_stall"]
    assert runtime_warnings == []


def test_the_trainer_callback_hands_accelerate_s_grad_scaler_to_the_monitor(tmp_path):
    """The Trainer hands its callbacks Accelerate's optimizer wrapper, which keeps an fp16 run's
    GradScaler as ``.scaler`` (``accelerate.optimizer.AcceleratedOptimizer``; constructing one needs a
    live ``Accelerator``, whose process-wide state the other tests must not inherit: a stand-in with the
    same attribute here)."""
    from transformers import TrainingArguments

    from attnkit.monitor.integrations.hf_trainer import AttnkitCallback

    class AcceleratedLike(torch.optim.SGD):
        scaler = None

    model = gpt2()
    scaler = torch.amp.GradScaler("cpu")
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[])
    for given, want in ((scaler, scaler), (None, None)):
        opt = AcceleratedLike(model.parameters(), lr=0.1)
        opt.scaler = given
        callback = AttnkitCallback(every=2, emit=(), log_dir=tmp_path)
        callback.on_train_begin(args, None, None, model=model, optimizer=opt)
        try:
            assert callback.monitor.grad_scaler is want
        finally:
            callback.monitor.close()


@pytest.mark.parametrize("snapshots, rules, action, lr", [
    (True, "defaults", "rollback+reduce_lr", 0.025), (False, "defaults", "qk_clip+reduce_lr", 0.05),
    (True, "halve", "rollback+reduce_lr", 0.05)])
def test_the_default_policy_rolls_back_and_cuts_the_rate_where_the_monitor_keeps_snapshots(
        snapshots, rules, action, lr, tmp_path):
    """``Policy()`` takes its monitor's defaults: with snapshots a product heading for fp16's limit is
    answered by a rollback to the newest snapshot from before its run-up and the rate cut to a quarter
    (``ROLLBACK_RULES``), without them by QK-clip and the rate halved (``DEFAULT_RULES``); the guide's
    recipe with ``format_rollback_rule(lr_factor=0.5)`` does the same rollback and halves. The planted
    head's product, from the weights, is back at the restored step's value after the rollback, and that
    step is no later than the one the warning says the run-up began at."""
    from attnkit.monitor import ROLLBACK_RULES, Policy, Snapshots, format_rollback_rule

    halve = format_rollback_rule(lr_factor=0.5)
    policy = Policy() if rules == "defaults" else Policy(
        rules={**ROLLBACK_RULES, "format_overflow": halve, "activation_overflow": halve})
    model = gpt2().eval()
    layout = qk_layout(model.transformer.h[0].attn)
    grow = lambda factor: (layout.scale_query(0, factor ** 0.5), layout.scale_key(0, factor ** 0.5))  # noqa: E731
    grow(LIMIT / 2.0 ** 12 / _product(model))  # 12 bits below the limit, then 1 bit a step
    products, warned = [], []
    opt = torch.optim.SGD(model.parameters(), lr=0.1)  # no backward: the optimizer never moves a weight
    with AttentionMonitor(model, every=1, log_dir=tmp_path, emit=(), optimizer=opt, policy=policy,
                          snapshots=Snapshots(every=2, keep=3) if snapshots else None, detectors=PREDICTORS,
                          trace_nonfinite=False) as monitor:
        for step in range(12):
            products.append(_product(model))
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
                model(input_ids=X)
            d = monitor.on_step(step)
            warned += [i for i in (d.new if d else []) if i.type == "format_overflow"]
            if monitor.interventions:
                break
            grow(2.0)
    (entry,) = monitor.interventions
    assert entry["action"] == action and entry["reason"].startswith("format_overflow")
    assert opt.param_groups[0]["lr"] == pytest.approx(lr)
    if snapshots:
        assert 0 < entry["undone_steps"] and entry["restored_step"] == step - entry["undone_steps"]
        assert 0 <= entry["restored_step"] <= warned[0].started  # a snapshot of step s holds the weights step s observed
        assert _product(model) == pytest.approx(products[entry["restored_step"]], rel=1e-5)
    else:
        assert _product(model) < LIMIT / 8  # clipped 3 bits below the limit


def test_a_product_growing_again_after_a_rollback_is_warned_sooner_when_the_trend_is_kept(tmp_path):
    """The planted head's product keeps growing 1 bit a step after the rollback (the growth is planted, not
    trained): the warning says where the run-up began (the first observed step within the 6-bit floor,
    from the weights), and the second warning comes on fewer observations when the rollback keeps the
    restored run's own past (``Rollback(keep_trend=True)``) than when it forgets it."""
    from attnkit.monitor import Chain, Policy, ReduceLR, Rollback, Snapshots

    def run(keep_trend: bool, log_dir):
        model = gpt2().eval()
        layout = qk_layout(model.transformer.h[0].attn)
        grow = lambda factor: (layout.scale_query(0, factor ** 0.5), layout.scale_key(0, factor ** 0.5))  # noqa: E731
        grow(LIMIT / 2.0 ** 12.5 / _product(model))  # 12.5 bits below the limit, then 1 bit a step
        rule = lambda issue: Chain((Rollback(times=3, keep_trend=keep_trend), ReduceLR(0.5)))  # noqa: E731
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        products, warned = [], []
        with AttentionMonitor(model, every=1, log_dir=log_dir, emit=(), optimizer=opt, detectors=PREDICTORS,
                              policy=Policy(rules={"format_overflow": rule, "activation_overflow": rule}),
                              snapshots=Snapshots(every=2, keep=3), trace_nonfinite=False, thresholds=LAYOUT) as monitor:
            for step in range(40):
                products.append(_product(model))
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
                    model(input_ids=X)
                d = monitor.on_step(step)
                warned += [i for i in (d.new if d else []) if i.type == "format_overflow"]
                if len(monitor.interventions) == 2:
                    break
                grow(2.0)
        return products, warned, monitor.interventions

    products, warned, acted = run(False, tmp_path / "forget")
    floor = LIMIT / 2.0 ** LAYOUT.overflow_floor_bits
    assert warned[0].started == next(s for s, p in enumerate(products) if p >= floor) == 7
    first, second = acted
    forget_gap = second["step"] - first["step"]
    _, warned_keep, (first_keep, second_keep) = run(True, tmp_path / "keep")
    assert first_keep["step"] == first["step"] and warned_keep[0].started == 7  # the same run up to the rollback
    assert second_keep["step"] - first_keep["step"] < forget_gap
