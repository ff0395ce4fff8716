"""The instability predictor and what acts on it: ``softmax_saturation`` (logit growth together with
entropy falling across the model, not one head), the replay of a recorded run through the same
detectors, and the LR back-off's effect on the optimizer."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from attnkit.monitor import AttentionMonitor, Chain, LRBackoff, QKClip, Thresholds
from attnkit.monitor.detectors import DETECTORS
from attnkit.monitor.replay import first_step, replay
from test_monitor import _trends, batch, gpt2

STEPS = np.arange(0, 32, 4)  # a full window of 8 observed steps, 1 in 4


def _series(grow_heads: int, fall_heads: int, heads: int = 4):
    logits = np.full((8, heads), 12.0)
    logits[:, :grow_heads] = 12.0 * np.exp(0.06 * STEPS)[:, None]  # 12 -> 64 over the window, 100 in 7 steps
    entropy = np.full((8, heads), 3.0)
    entropy[:, :fall_heads] = np.linspace(3.0, 1.5, 8)[:, None]
    return {"logit_max": logits, "entropy": entropy}


def test_softmax_saturation_needs_growth_and_entropy_fall_in_half_the_heads():
    detect = DETECTORS["softmax_saturation"]
    issues = detect(_trends(_series(4, 4), STEPS))
    assert sorted(i.head for i in issues) == [0, 1, 2, 3] and {i.type for i in issues} == {"softmax_saturation"}
    assert issues[0].started == 0 and issues[0].severity == "error"
    slope = 0.06
    assert issues[0].projected_steps == pytest.approx((math.log(100) - math.log(12 * math.exp(slope * 28))) / slope)
    assert len(detect(_trends(_series(2, 2), STEPS))) == 2  # half the heads is enough; names those heads
    assert detect(_trends(_series(1, 4), STEPS)) == []  # one head's logits growing: a head specialising
    assert detect(_trends(_series(4, 1), STEPS)) == []  # logits growing but attention not sharpening
    short = {k: v[:7] for k, v in _series(4, 4).items()}
    assert detect(_trends(short, STEPS[:7])) == []  # needs a full window
    # per head, logit_growth alone fires on the one growing head: the per-head warning stays
    assert [i.head for i in DETECTORS["logit_growth"](_trends(_series(1, 4), STEPS))] == [0]


def test_softmax_saturation_horizon_and_floor():
    far = _series(4, 4)
    far["logit_max"] = 12.0 * np.exp(0.01 * STEPS)[:, None].repeat(4, 1)  # grew 1.32x, 100 only in ~184 steps
    assert DETECTORS["softmax_saturation"](_trends(far, STEPS)) == []
    low = _series(4, 4)
    low["logit_max"] = low["logit_max"] / 10  # the same growth from 1.2: ordinary learning
    assert DETECTORS["softmax_saturation"](_trends(low, STEPS)) == []
    t = Thresholds(saturation_horizon=100.0)
    assert len(DETECTORS["softmax_saturation"](_trends(far, STEPS, t=t))) == 4


def _grow_run(tmp_path, detectors=None, every: int = 2, observe_first: int = 0):
    """A real monitored run whose q/k weights grow 1.4x a step: logits grow exponentially."""
    model = gpt2()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    monitor = AttentionMonitor(model, every=every, observe_first=observe_first, log_dir=tmp_path, emit=(),
                               optimizer=opt, detectors=detectors)
    live = []
    with monitor:
        for step in range(40):
            x = batch(step % 3)
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                for block in model.transformer.h:
                    block.attn.c_attn.weight[:, :64].mul_(1.2)  # q and k columns of every head
            d = monitor.on_step(step, loss=loss)
            if d:
                live += d.new
    return live


def test_replay_of_the_jsonl_gives_the_live_monitor_s_issues(tmp_path):
    live = _grow_run(tmp_path)
    assert {"softmax_saturation", "logit_growth"} <= {i.type for i in live}
    replayed = replay(tmp_path / "monitor.jsonl", detectors=tuple(d for d in DETECTORS if d != "loss_spike"))
    key = lambda i: (i.type, i.step, i.site, i.head)  # noqa: E731
    assert sorted(map(key, replayed)) == sorted(key(i) for i in live if i.type != "loss_spike")
    sat = [i for i in live if i.type == "softmax_saturation"]
    assert first_step(replayed, ("softmax_saturation",)) == min(i.step for i in sat)
    for a, b in zip(sorted(sat, key=key), sorted((i for i in replayed if i.type == "softmax_saturation"), key=key)):
        assert a.value == b.value and a.projected_steps == pytest.approx(b.projected_steps)


def test_replay_on_a_schedule_gives_the_live_monitor_on_that_schedule(tmp_path):
    """A run recorded at every step, replayed as if observed on steps 0-5 then 1 in 4, raises what a live
    monitor on that schedule raised (which observed exactly those steps)."""
    live = _grow_run(tmp_path / "live", every=4, observe_first=6)
    steps = [json.loads(line)["step"] for line in (tmp_path / "live" / "monitor.jsonl").read_text().splitlines()
             if '"type": "step"' in line]
    assert steps == [0, 1, 2, 3, 4, 5] + list(range(8, 40, 4))
    _grow_run(tmp_path / "dense", every=1)
    detectors = tuple(d for d in DETECTORS if d != "loss_spike")  # the live one saw every step's loss
    replayed = replay(tmp_path / "dense", detectors=detectors, every=4, observe_first=6)
    key = lambda i: (i.type, i.step, i.site, i.head)  # noqa: E731
    assert replayed and sorted(map(key, replayed)) == sorted(key(i) for i in live if i.type != "loss_spike")
    assert sorted(map(key, replay(tmp_path / "dense", detectors=detectors))) != sorted(map(key, replayed))


def test_replay_reads_the_last_run_of_a_reused_log_and_refuses_bad_input(tmp_path):
    from attnkit.errors import UserError

    _grow_run(tmp_path)
    first = replay(tmp_path)
    _grow_run(tmp_path)  # the same directory again: appended
    assert len((tmp_path / "monitor.jsonl").read_text().split('"type": "meta"')) == 3
    assert [(i.type, i.step) for i in replay(tmp_path)] == [(i.type, i.step) for i in first]
    with pytest.raises(UserError, match="unknown detector"):
        replay(tmp_path, detectors=("nope",))
    with pytest.raises(UserError, match="observe_first"):
        replay(tmp_path, every=4, observe_first=-1)
    with pytest.raises(UserError):
        replay(tmp_path / "missing")


def _monitor_after_steps(tmp_path, logit_rows, lr=0.1, persistent=()):
    """A monitor with an optimizer whose latest records have the given per-head max logits."""
    model = gpt2()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    monitor = AttentionMonitor(model, every=1, log_dir=tmp_path, emit=(), optimizer=opt, scheduler=sched)
    monitor.start()
    x = batch(0)
    model(input_ids=x, labels=x).loss.backward()
    monitor.on_step(0)
    monitor.persistent.extend(persistent)
    return monitor, opt, sched


def test_lr_backoff_halves_now_and_while_the_logits_keep_growing(tmp_path):
    monitor, opt, sched = _monitor_after_steps(tmp_path, None)
    backoff = LRBackoff(growth=1.25)
    n = len(monitor.latest.metrics["logit_max"])
    monitor.latest.metrics["logit_max"] = [10.0] * n
    monitor.apply(backoff)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05) and sched.base_lrs == [pytest.approx(0.05)]
    monitor.latest.metrics["logit_max"] = [10.0 * 1.3] * (n // 2) + [10.0] * (n - n // 2)  # half grew 1.3x
    backoff.reapply(monitor)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)
    monitor.latest.metrics["logit_max"] = [13.0 * 1.1] * (n // 2) + [10.0 * 1.1] * (n - n // 2)  # 1.1x: slower
    backoff.reapply(monitor)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)
    for _ in range(10):  # never below min_fraction (1/64) of the rate it started from
        monitor.latest.metrics["logit_max"] = [v * 2 for v in monitor.latest.metrics["logit_max"]]
        backoff.reapply(monitor)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 / 64)
    actions = [json.loads(line)["action"] for line in (tmp_path / "monitor.jsonl").read_text().splitlines()
               if '"intervention"' in line]
    assert actions == ["lr_backoff"] * 6  # 1/64 = six halvings: 1 + 1 + 4 more


def test_lr_backoff_default_rate_and_floor_come_from_the_detectors_thresholds(tmp_path):
    monitor, opt, _ = _monitor_after_steps(tmp_path, None)
    backoff = LRBackoff()
    assert backoff._growth(monitor) == pytest.approx(1.25 ** (1 / 7))  # growth_min over a window of 8
    n = len(monitor.latest.metrics["logit_max"])
    monitor.latest.metrics["logit_max"] = [2.0] * n
    backoff.apply(monitor)
    monitor.latest.metrics["logit_max"] = [8.0] * n  # 4x, but below the floor 10: ordinary learning
    backoff.reapply(monitor)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    monitor.latest.metrics["logit_max"] = [8.0 * 1.05] * n  # still below the floor
    backoff.reapply(monitor)
    monitor.latest.metrics["logit_max"] = [20.0] * n
    backoff.reapply(monitor)  # from 8.4 (< floor): not counted
    monitor.latest.metrics["logit_max"] = [20.0 * 1.05] * n  # 1.05x from 20 >= 1.03x
    backoff.reapply(monitor)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)


def test_lr_backoff_measures_growth_from_where_the_clip_left_the_logits(tmp_path):
    clip = QKClip(10.0)
    monitor, opt, _ = _monitor_after_steps(tmp_path, None, persistent=(clip,))
    n = len(monitor.latest.metrics["logit_max"])
    backoff = LRBackoff()
    monitor.latest.metrics["logit_max"] = [40.0] * n  # the clip cuts these to 10
    backoff.apply(monitor)
    monitor.latest.metrics["logit_max"] = [14.0] * n  # 14 < 1.25 x 40, but 1.4 x the clipped 10
    backoff.reapply(monitor)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)


def test_chain_applies_each_part_and_logs_one_action(tmp_path):
    monitor, opt, _ = _monitor_after_steps(tmp_path, None)
    entry = monitor.apply(Chain((QKClip(1e9), LRBackoff())))
    assert entry["action"] == "qk_clip+lr_backoff" and opt.param_groups[0]["lr"] == pytest.approx(0.05)
    assert len(monitor.persistent) == 2


def test_lr_to_rate_scales_the_lr_by_target_over_measured_growth(tmp_path):
    from attnkit.monitor import LRToRate

    monitor, opt, _ = _monitor_after_steps(tmp_path, None)
    n = len(monitor.series)
    ring = monitor.rings["logit_max"]
    for step in range(4, 36, 4):  # 8 observed steps: the whole window, span 28 steps
        row = np.full(n, 5.0)  # below the floor: not measured
        row[: n // 2] = 12.0 * np.exp(0.1 * step)  # half the heads grow at 0.1 per step
        ring.append(step, row)
    rate, target = LRToRate().rates(monitor)
    assert target == pytest.approx(math.log(1.25) / 28)
    assert rate == pytest.approx(0.1, rel=1e-6)
    detail = monitor.apply(LRToRate())["detail"]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * target / 0.1) and "×" in detail
    monitor.apply(LRToRate(min_fraction=0.5))  # floored; and never raises the rate
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * target / 0.1 * 0.5)
