"""AttentionMonitor: exactness of a monitored training step, what it records, trends, bounded
history, bad input before training, interventions' effects and the NaN/Inf tracer."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from attnkit.errors import UserError
from attnkit.monitor import AttentionMonitor, Policy, QKClip, Thresholds
from attnkit.monitor.detectors import DETECTORS, Trends
from attnkit.monitor.history import Ring
from attnkit.monitor.interventions import AttentionDropout, GradClip, ReduceLR, soft_cap, temperature
from attnkit.seam import AttentionCall, Site, Tap, attach

V, T = 64, 16


def gpt2(seed: int = 0, attn: str = "sdpa"):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_head=4, n_embd=32, n_positions=T, vocab_size=V, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0)
    return GPT2LMHeadModel._from_config(cfg, attn_implementation=attn)


def batch(i: int) -> torch.Tensor:
    return torch.randint(0, V, (3, T), generator=torch.Generator().manual_seed(100 + i))


def train(model, steps: int, monitor: AttentionMonitor | None = None, lr: float = 1e-2):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    if monitor is not None:
        monitor.optimizer = opt
    losses, grads = [], []
    for step in range(steps):
        x = batch(step)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        if monitor is not None:
            monitor.on_step(step, loss=loss)
    return losses, grads


def test_monitored_training_is_bit_identical_to_unmonitored(tmp_path):
    plain = gpt2()
    losses0, grads0 = train(plain, 4)
    watched = gpt2()
    with AttentionMonitor(watched, every=1, log_dir=tmp_path, emit=()) as monitor:
        losses1, grads1 = train(watched, 4, monitor)
    assert all(torch.equal(a, b) for a, b in zip(losses0, losses1))
    for g0, g1 in zip(grads0, grads1):
        assert all(torch.equal(a, b) for a, b in zip(g0, g1))
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), watched.parameters()))
    assert len(monitor.rings["entropy"]) == 4


@pytest.mark.parametrize("with_optimizer", [False, True])
def test_a_closed_monitor_keeps_nothing_alive(tmp_path, with_optimizer):
    """Once the monitor is closed and dropped, the model goes with its last reference, without
    waiting for the cycle collector: a DDP wrapper freed only by the collector, after its
    process group is destroyed, aborts the process (a CI run did)."""
    import gc
    import weakref

    gc.collect()
    gc.disable()
    try:
        model = gpt2()
        alive = weakref.ref(model)
        monitor = AttentionMonitor(model, every=1, log_dir=tmp_path, emit=())
        with monitor:
            train(model, 2, monitor if with_optimizer else None)
            monitor.on_step(2, loss=torch.tensor(1.0))
        del model, monitor
        assert alive() is None
    finally:
        gc.enable()


def test_observes_one_step_in_every_and_writes_jsonl(tmp_path):
    model = gpt2()
    with AttentionMonitor(model, every=3, log_dir=tmp_path, emit=()) as monitor:
        train(model, 10, monitor)
    lines = [json.loads(line) for line in (tmp_path / "monitor.jsonl").read_text().splitlines()]
    assert lines[0]["type"] == "meta" and lines[0]["series"][:2] == ["L0H0", "L0H1"]
    steps = [line["step"] for line in lines if line["type"] == "step"]
    assert steps == [0, 3, 6, 9]  # the first step, then every step divisible by 3
    rec = next(line for line in lines if line["type"] == "step")
    assert set(rec["metrics"]) >= {"entropy", "logit_max", "sink_mass", "max_attention"}
    assert len(rec["metrics"]["entropy"]) == 8 and len(rec["grad_norm"]) == 2 and rec["loss"] > 0


def test_statistics_match_eager_attention_weights(tmp_path):
    """Per-head entropy and max weight of the observed step against the model's own eager weights."""
    model = gpt2(attn="eager")
    x = batch(0)
    with torch.no_grad():
        probs = model(input_ids=x, output_attentions=True).attentions  # before the step's update
    with AttentionMonitor(model, every=1, log_dir=tmp_path, emit=()) as monitor:
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        monitor.on_step(0, loss=loss)
    rec = monitor.latest
    for layer, p in enumerate(probs):
        p = p[:, :, 1:].double()  # row 0 sees one key: left out of the means
        entropy = -(p * p.clamp_min(1e-30).log()).sum(-1).mean(dim=(0, 2))
        max_weight = p.max(-1).values.mean(dim=(0, 2))
        for h in range(4):
            i = rec.series.index((Site(layer), h))
            assert math.isclose(rec.metrics["entropy"][i], float(entropy[h]), rel_tol=1e-4)
            assert math.isclose(rec.metrics["max_attention"][i], float(max_weight[h]), rel_tol=1e-4)
            assert math.isclose(rec.metrics["sink_mass"][i], float(p[:, h, :, 0].mean()), rel_tol=1e-4)


def test_grad_norm_is_the_query_key_columns_of_c_attn(tmp_path):
    model = gpt2()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with AttentionMonitor(model, every=1, log_dir=tmp_path, emit=()) as monitor:
        x = batch(0)
        model(input_ids=x, labels=x).loss.backward()
        want = []
        for block in model.transformer.h:  # the independent reference: GPT-2's layout by hand
            w, b = block.attn.c_attn.weight.grad, block.attn.c_attn.bias.grad
            want.append(math.sqrt(float(w[:, :64].square().sum() + b[:64].square().sum())))
        opt.step()
        opt.zero_grad(set_to_none=True)
        monitor.on_step(0)
    assert monitor.latest.grad_norm == pytest.approx(want, rel=1e-5)


def _trends(metrics: dict, steps, losses=None, grad=None, t=None) -> Trends:
    n, s = next(iter(metrics.values())).shape
    ring = Ring(64, 1)
    for i, loss in enumerate(losses or []):
        ring.append(i, [loss])
    full = {m: metrics.get(m, np.zeros((n, s))) for m in ("entropy", "logit_max", "sink_mass", "max_attention",
                                                          "nonfinite_logits")}
    gs = np.asarray(steps) if grad is not None else np.zeros(0, dtype=int)
    return Trends([(Site(0), h) for h in range(s)], [Site(0)], np.asarray(steps), full, gs,
                  np.asarray(grad if grad is not None else np.zeros((0, 1))), ring, len(losses or []),
                  t or Thresholds())


def test_logit_growth_found_with_start_and_projection():
    steps = np.arange(0, 80, 10)
    grow = 12.0 * np.exp(0.02 * steps)  # doubles every ~35 steps: 12 -> 48.4 over the window
    flat = np.full_like(grow, 12.0)
    issues = DETECTORS["logit_growth"](_trends({"logit_max": np.stack([grow, flat], 1)}, steps))
    assert [(i.head, i.type) for i in issues] == [(0, "logit_growth")]
    assert issues[0].started == 0
    want = (math.log(100) - math.log(grow[-1])) / 0.02
    assert issues[0].projected_steps == pytest.approx(want, rel=1e-6)


def test_noisy_flat_and_slow_series_raise_nothing():
    rng = np.random.default_rng(0)
    steps = np.arange(0, 80, 10)
    noisy = 20 + rng.normal(0, 1, (8, 4))
    metrics = {"logit_max": noisy, "entropy": 2 + rng.normal(0, 0.05, (8, 4)), "sink_mass": np.full((8, 4), 0.2)}
    tr = _trends(metrics, steps, losses=list(3 + rng.normal(0, 0.05, 40)), grad=np.ones((8, 1)))
    assert [i for d in DETECTORS.values() for i in d(tr)] == []


def test_entropy_fall_across_heads_sink_growth_grad_and_loss_spikes():
    steps = np.arange(8)
    falling = np.linspace(2.0, 1.0, 8)[:, None].repeat(4, 1)
    issues = DETECTORS["entropy_fall"](_trends({"entropy": falling}, steps))
    assert len(issues) == 4 and issues[0].started == 0 and issues[0].projected_steps > 0
    one = np.full((8, 4), 2.0)
    one[:, 0] = falling[:, 0]
    assert DETECTORS["entropy_fall"](_trends({"entropy": one}, steps)) == []  # one head specialising
    sink = np.linspace(0.2, 0.7, 8)[:, None].repeat(2, 1)
    assert len(DETECTORS["sink_growth"](_trends({"sink_mass": sink}, steps))) == 2
    grad = np.array([[1.0]] * 7 + [[50.0]])
    assert [i.type for i in DETECTORS["grad_spike"](_trends({"entropy": one}, steps, grad=grad))] == ["grad_spike"]
    losses = [3.0] * 20 + [5.0]
    spike = DETECTORS["loss_spike"](_trends({"entropy": one}, steps, losses=losses))
    assert [(i.type, i.step) for i in spike] == [("loss_spike", 20)]


def test_warns_once_per_site_head_type(tmp_path):
    model = gpt2()
    t = Thresholds(logit_floor=0.0, logit_danger=1e6, horizon=1e9, growth_min=1.01, fit_r2=0.5, window=4)
    with AttentionMonitor(model, every=1, log_dir=tmp_path, emit=(), thresholds=t, detectors=("logit_growth",)) as m:
        train(model, 12, m, lr=3e-2)
    issues = [json.loads(line) for line in (tmp_path / "monitor.jsonl").read_text().splitlines()
              if '"issue"' in line]
    keys = [(i["layer"], i["head"], i["issue"]) for i in issues]
    assert keys and len(keys) == len(set(keys))


def test_history_is_bounded():
    ring = Ring(16, 3)
    size = ring.nbytes
    for i in range(100_000):
        ring.append(i, [i, i, i])
    assert ring.nbytes == size and len(ring) == 16
    steps, values = ring.last()
    assert steps.tolist() == list(range(100_000 - 16, 100_000)) and values[-1, 0] == 99_999


def test_monitor_state_flat_over_100k_steps(tmp_path):
    model = gpt2()
    with AttentionMonitor(model, every=1000, log_dir=tmp_path, emit=(), history=8, loss_history=32) as monitor:
        train(model, 2, monitor)
        size = monitor.memory_bytes()
        for step in range(2, 100_000):  # steps without a forward: only the loss is reported
            monitor.on_step(step, loss=3.0)
        assert monitor.memory_bytes() == size and len(monitor._pending) <= 32


@pytest.mark.parametrize("observe_first", [-1, 1.5, True])
def test_bad_observe_first_fails_before_training(observe_first, tmp_path):
    with pytest.raises(UserError, match="observe_first"):
        AttentionMonitor(gpt2(), every=4, observe_first=observe_first, log_dir=tmp_path, emit=())


@pytest.mark.parametrize("every", [0, -1, 1.5, True, "8"])
def test_bad_every_fails_before_training(every, tmp_path):
    with pytest.raises(UserError, match="every"):
        AttentionMonitor(gpt2(), every=every, log_dir=tmp_path)


def test_model_without_attention_and_unwritable_log_dir(tmp_path):
    with pytest.raises(UserError, match="no attention"):
        AttentionMonitor(nn.Sequential(nn.Linear(4, 4)), log_dir=tmp_path)
    afile = tmp_path / "file"
    afile.write_text("x")
    with pytest.raises(UserError, match="log directory"):
        AttentionMonitor(gpt2(), log_dir=afile)
    with pytest.raises(UserError, match="log directory"):
        AttentionMonitor(gpt2(), log_dir=afile / "below")
    with pytest.raises(UserError, match="unknown emitter"):
        AttentionMonitor(gpt2(), log_dir=tmp_path, emit=("nope",))


class _Dropout(Tap):
    wants_chunks, wants_call = False, True

    def __init__(self):
        self.p = []

    def on_call(self, call: AttentionCall) -> None:
        self.p.append(call.dropout)


def test_interventions_have_their_effect(tmp_path):
    model = gpt2()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    with AttentionMonitor(model, every=1, log_dir=tmp_path, emit=(), optimizer=opt, scheduler=sched) as monitor:
        x = batch(0)
        model(input_ids=x, labels=x).loss.backward()
        monitor.on_step(0)
        monitor.apply(ReduceLR(0.5))
        opt.step()
        sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(5e-3)  # the schedule does not undo it
        monitor.apply(GradClip(1e-3))
        opt.step()  # the pre-hook clips the gradients that are there
        total = torch.sqrt(sum(p.grad.square().sum() for p in model.parameters() if p.grad is not None))
        assert float(total) <= 1e-3 * 1.0001
        monitor.apply(AttentionDropout(0.25))
        tap = _Dropout()
        with attach(model, taps=[tap]):
            model(input_ids=x)
        assert tap.p == [0.25, 0.25]
        monitor.on_step(1)  # that forward was observed too: report it before measuring

        def max_logit():
            model.zero_grad()
            y = batch(1)
            model(input_ids=y, labels=y).loss.backward()
            monitor.on_step(monitor.step + 1)
            return max(monitor.latest.metrics["logit_max"])

        model.eval()  # no dropout: the same batch gives the same logits
        before = max_logit()
        monitor.apply(temperature(2.0))
        assert max_logit() == pytest.approx(before / 2, rel=1e-5)
        monitor.apply(soft_cap(before / 4))
        assert max_logit() <= before / 4
    entries = [json.loads(line) for line in (tmp_path / "monitor.jsonl").read_text().splitlines()
               if '"intervention"' in line]
    assert [e["action"] for e in entries] == ["reduce_lr", "grad_clip", "attention_dropout", "temperature", "soft_cap"]


def test_policy_clips_a_growing_head(tmp_path):
    model = gpt2()
    with torch.no_grad():  # head 0 of layer 0 (its key columns) has big logits
        model.transformer.h[0].attn.c_attn.weight[:, 32:40].mul_(1000.0)
    t = Thresholds(logit_danger=5.0)
    with AttentionMonitor(model, every=1, log_dir=tmp_path, emit=(), thresholds=t, policy=Policy(),
                          detectors=("overflow_risk",)) as monitor:
        monitor.policy.rules["overflow_risk"] = lambda issue: QKClip(5.0)
        train(model, 1, monitor, lr=0.0)
        assert monitor.interventions and monitor.interventions[0]["action"] == "qk_clip"
        model.eval()
        train(model, 1, monitor, lr=0.0)  # the next step measures the clipped weights on batch(0)
    lines = [json.loads(line) for line in (tmp_path / "monitor.jsonl").read_text().splitlines()]
    steps = [line for line in lines if line["type"] == "step"]
    assert max(steps[0]["metrics"]["logit_max"]) > 5.0
    assert max(steps[-1]["metrics"]["logit_max"]) <= 5.0 * (1 + 1e-5)


def test_nan_tracer_names_the_first_layer_and_head(tmp_path):
    model = gpt2()
    with torch.no_grad():  # layer 1, head 2: finite q and k whose dot product overflows to inf
        w = model.transformer.h[1].attn.c_attn.weight
        g = torch.Generator().manual_seed(0)
        w[:, 16:24] = torch.randn(32, 8, generator=g) * 1e19
        w[:, 48:56] = torch.randn(32, 8, generator=g) * 1e19
    with AttentionMonitor(model, every=1, log_dir=tmp_path, emit=()) as monitor:
        x = batch(0)
        loss = model(input_ids=x, labels=x).loss
        monitor.on_step(0, loss=loss)
    assert not math.isfinite(float(loss.detach()))
    trace = monitor.traces[0]
    assert trace.site == Site(1) and trace.heads == [2] and trace.cause == "logits"
    assert "layer 1 head 2" in trace.message
    issues = [json.loads(line) for line in (tmp_path / "monitor.jsonl").read_text().splitlines()
              if '"nonfinite_trace"' in line]
    assert issues and issues[0]["layer"] == 1 and issues[0]["head"] == 2


def test_nan_weights_upstream_are_named(tmp_path):
    from attnkit.monitor import trace_nonfinite

    model = gpt2()
    with torch.no_grad():
        model.transformer.h[0].mlp.c_proj.weight[0, 0] = math.nan  # after layer 0's attention
    result = trace_nonfinite(model, (batch(0),))
    assert result.site == Site(1) and result.cause == "inputs"
    assert "transformer.h.0.mlp.c_proj.weight" in result.nonfinite_params
