"""The ``rollback`` intervention and the monitor's in-memory snapshots: an exact, in-place restore of
the model, optimizer and scheduler; the snapshot chosen is the newest before the trend started;
memory is bounded; bad parameters fail before training; a second warning rolls back again."""

from __future__ import annotations

import copy
import gc
import json
import weakref

import pytest
import torch

from attnkit.errors import UserError
from attnkit.monitor import AttentionMonitor, Chain, Diagnosis, Issue, LRBackoff, Policy, QKClip, Rollback, Snapshots
from attnkit.monitor.interventions import INTERVENTIONS
from attnkit.seam import Site

V, T = 64, 16


def gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_head=4, n_embd=32, n_positions=T, vocab_size=V, resid_pdrop=0.0, embd_pdrop=0.0,
                     attn_pdrop=0.0)
    return GPT2LMHeadModel._from_config(cfg, attn_implementation="sdpa")


def llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=T, vocab_size=V, tie_word_embeddings=True)
    return LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")


def _saturation(step: int, started: int) -> Issue:
    """A softmax-saturation warning on head 0 of layer 0 whose trend began at ``started``."""
    return Issue("softmax_saturation", "error", step=step, value=50.0, threshold=100.0, message="saturating",
                 site=Site(0), head=0, started=started)


def batch(i: int) -> torch.Tensor:
    return torch.randint(0, V, (3, T), generator=torch.Generator().manual_seed(100 + i))


def setup(model, lr: float = 1e-2):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 5))  # a warmup: the schedule matters
    return opt, sched


def step(model, opt, sched, i: int) -> torch.Tensor:
    x = batch(i)
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()


def state(model, opt, sched) -> tuple:
    """An independent copy of the whole training state (not the monitor's code)."""
    return ({k: v.clone() for k, v in model.state_dict().items()}, copy.deepcopy(opt.state_dict()),
            copy.deepcopy(sched.state_dict()))


def assert_same_state(a: tuple, b: tuple) -> None:
    (ma, oa, sa), (mb, ob, sb) = a, b
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
    assert oa["param_groups"] == ob["param_groups"] and oa["state"].keys() == ob["state"].keys()
    for i in oa["state"]:
        for k, v in oa["state"][i].items():
            assert torch.equal(v, ob["state"][i][k]), (i, k)
    assert sa == sb


@pytest.mark.parametrize("make", [gpt2, llama], ids=["gpt2", "llama"])
def test_rollback_restores_the_snapshot_bit_for_bit_in_place_and_training_goes_on(tmp_path, make):
    model = make()
    opt, sched = setup(model)
    ptrs = [p.data_ptr() for p in model.parameters()]
    monitor = AttentionMonitor(model, every=1, log_dir=tmp_path, emit=(), optimizer=opt, scheduler=sched,
                               snapshots=Snapshots(every=3, keep=2))
    with monitor:
        for i in range(9):
            step(model, opt, sched, i)
            monitor.on_step(i)
            if i == 6:
                at6 = state(model, opt, sched)  # the snapshot of step 6 should hold exactly this
        assert [s.step for s in monitor.snapshots.kept] == [3, 6]
        entry = monitor.apply(Rollback(before=7, reason="test"))
        assert_same_state(state(model, opt, sched), at6)
        assert [p.data_ptr() for p in model.parameters()] == ptrs  # the same tensors: optimizer, DDP keep working
        assert entry["restored_step"] == 6 and entry["trend_started"] == 7 and entry["undone_steps"] == 2
        assert monitor.latest is None and len(monitor.rings["entropy"]) == 0 and not monitor.warned
        # training goes on from the restored state exactly as a run that never left it
        for i in (9, 10, 11):
            step(model, opt, sched, i)
            monitor.on_step(i)
        monitor.apply(Rollback(before=7))  # the same snapshot again: later steps did not write into it
        assert_same_state(state(model, opt, sched), at6)
    reference = make()
    ref_opt, ref_sched = setup(reference)
    for i in list(range(7)) + [9, 10, 11]:
        step(reference, ref_opt, ref_sched, i)
    for i in (9, 10, 11):
        step(model, opt, sched, i)
    assert_same_state(state(model, opt, sched), state(reference, ref_opt, ref_sched))
    logged = [json.loads(line) for line in (tmp_path / "monitor.jsonl").read_text().splitlines()]
    rollbacks = [e for e in logged if e.get("type") == "intervention" and e.get("action") == "rollback"]
    assert [(e["step"], e["restored_step"]) for e in rollbacks] == [(8, 6), (11, 6)]
    assert rollbacks[0]["reason"] == "test"


def test_the_chosen_snapshot_is_the_newest_before_the_trend_start_and_memory_is_bounded(tmp_path):
    model = gpt2()
    opt, sched = setup(model)
    snaps = Snapshots(every=2, keep=3)
    with AttentionMonitor(model, every=4, log_dir=tmp_path, emit=(), optimizer=opt, scheduler=sched,
                          snapshots=snaps) as monitor:
        assert [s.step for s in snaps.kept] == [-1]  # the run as handed over, before step 0
        for i in range(9):
            step(model, opt, sched, i)
            monitor.on_step(i)
        assert [s.step for s in snaps.kept] == [4, 6, 8]  # -1, 0, 2 dropped: at most keep
        one = snaps.kept[0].nbytes
        assert one > 3 * sum(p.numel() * 4 for p in model.parameters())  # params + AdamW's two moments
        assert snaps.choose(7) == (snaps.kept[1], True)  # step 6
        assert snaps.choose(6) == (snaps.kept[0], True)  # strictly before: the state the trend's first step used
        assert snaps.choose(None)[0].step == 8
        assert snaps.choose(3) == (snaps.kept[0], False)  # none older: the oldest kept, and said so
        params = {p.data_ptr() for p in model.parameters()}
        assert all(t.device.type == "cpu" and t.data_ptr() not in params for t in snaps.kept[0].model.values())
        for i in range(9, 40):
            step(model, opt, sched, i)
            monitor.on_step(i)
        assert len(snaps) == 3 and snaps.nbytes == 3 * one and monitor.snapshot_bytes() == 3 * one
        detail = monitor.apply(Rollback(before=2))["detail"]
        assert "oldest kept" in detail and [s.step for s in snaps.kept] == [34]  # later ones were on the undone path


def test_no_snapshot_while_the_run_is_unhealthy(tmp_path):
    model = gpt2()
    opt, sched = setup(model)
    snaps = Snapshots(every=1, keep=10)
    with AttentionMonitor(model, every=1, log_dir=tmp_path, emit=(), optimizer=opt, scheduler=sched,
                          snapshots=snaps) as monitor:
        step(model, opt, sched, 0)
        monitor.on_step(0)
        sick = Diagnosis(1, [_saturation(1, started=0)])
        snaps.after_step(monitor, 1, sick)
        snaps.after_step(monitor, 2, None)  # not observed: still the last diagnosis' verdict
        assert [s.step for s in snaps.kept] == [-1, 0]
        snaps.after_step(monitor, 3, Diagnosis(3, []))
        assert [s.step for s in snaps.kept] == [-1, 0, 3]


def test_bad_snapshot_and_rollback_parameters_fail_before_training(tmp_path):
    for bad in (dict(every=0), dict(every=-3), dict(keep=0), dict(every=1.5), dict(every=True)):
        with pytest.raises(UserError, match="whole number"):
            Snapshots(**bad)
    with pytest.raises(UserError, match="whole number"):
        Rollback(times=0)
    with pytest.raises(UserError, match="Snapshots"):
        AttentionMonitor(gpt2(), every=1, log_dir=tmp_path, emit=(), snapshots=24)
    model = gpt2()
    with AttentionMonitor(model, every=1, log_dir=tmp_path, emit=()) as monitor:
        with pytest.raises(UserError, match="needs snapshots"):
            monitor.apply(Rollback(before=3))
    assert INTERVENTIONS["rollback"] is Rollback


def test_a_second_warning_rolls_back_again_and_the_retries_are_bounded(tmp_path):
    model = gpt2()
    opt, sched = setup(model, lr=1e-2)
    # the back-off's growth test never passes here: only its halving at each application moves the LR
    policy = Policy(rules={"softmax_saturation": lambda i: Chain((Rollback(i.started, times=2), QKClip(50.0),
                                                                  LRBackoff(growth=1e9)))})
    with AttentionMonitor(model, every=1, log_dir=tmp_path, emit=(), optimizer=opt, scheduler=sched,
                          snapshots=Snapshots(every=2, keep=4)) as monitor:
        entries = []
        for i in range(12):
            step(model, opt, sched, i)
            monitor.on_step(i)
            if i in (5, 9, 11):  # a saturation warning (trend since step 3) on the restored run each time
                warning = _saturation(i, started=i - 2)
                intervention = policy.get_intervention(Diagnosis(i, [warning], [warning]))
                entries.append(intervention and monitor.apply(intervention, None))
            if i == 7:  # a warning still standing (not new) is not a second warning
                standing = _saturation(i, started=3)
                assert policy.get_intervention(Diagnosis(i, [standing], [])) is None
        assert [e and (e["step"], e["restored_step"]) for e in entries] == [(5, 2), (9, 6), None]  # at most twice
        # the new QK-clip and back-off replace the first ones (no stacked halvings); the LR cuts stay
        assert sorted(type(p).__name__ for p in monitor.persistent) == ["LRBackoff", "QKClip"]
        assert sched.base_lrs == [pytest.approx(1e-2 / 4)]


def test_a_closed_monitor_with_snapshots_keeps_nothing_alive(tmp_path):
    gc.collect()
    gc.disable()
    try:
        model = gpt2()
        opt, sched = setup(model)
        alive = weakref.ref(model)
        policy = Policy(rules={"softmax_saturation": lambda i: Chain((Rollback(i.started), LRBackoff()))})
        monitor = AttentionMonitor(model, every=1, log_dir=tmp_path, emit=(), optimizer=opt, scheduler=sched,
                                   snapshots=Snapshots(every=1, keep=2), policy=policy)
        with monitor:
            for i in range(3):
                step(model, opt, sched, i)
                monitor.on_step(i)
            warning = _saturation(2, started=1)
            monitor.apply(policy.get_intervention(Diagnosis(2, [warning], [warning])))
        del model, monitor, opt, sched, policy
        assert alive() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("keep_trend", [False, True], ids=["forget", "keep_trend"])
def test_a_rollback_keeps_the_restored_runs_own_observations_only_when_asked(tmp_path, keep_trend):
    model = gpt2()
    opt, sched = setup(model)
    with AttentionMonitor(model, every=1, log_dir=tmp_path, emit=(), optimizer=opt, scheduler=sched,
                          snapshots=Snapshots(every=3, keep=2)) as monitor:
        for i in range(10):
            monitor.on_step(i, loss=step(model, opt, sched, i))
        steps, values = monitor.rings["logit_max"].last()
        before = dict(zip(steps.tolist(), values.copy()))  # step -> that step's max logits, recorded independently
        entry = monitor.apply(Rollback(before=8, keep_trend=keep_trend))
        restored = entry["restored_step"]
        assert monitor.step == 9 and restored == 6
        kept_steps, kept_values = monitor.rings["logit_max"].last()
        if not keep_trend:
            assert len(kept_steps) == 0 and len(monitor.losses) == 0
        else:
            shift = 9 - restored
            # the restored run's past: every observation up to the snapshot, ending just before the next step
            assert kept_steps.tolist() == [s + shift for s in sorted(before) if s <= restored]
            for s, row in zip(kept_steps.tolist(), kept_values):
                assert row == pytest.approx(before[s - shift], nan_ok=True)
            assert kept_steps[-1] == monitor.step and monitor.losses.last()[0].tolist() == kept_steps.tolist()
        assert not monitor.warned
