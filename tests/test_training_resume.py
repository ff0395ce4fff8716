"""An interrupted run resumed from its checkpoint ends bit for bit where the uninterrupted run ends:
weights, optimizer moments, learning rate and logged history — with dropout, so the RNG counts too."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attnkit.common.training import StepOutput, TrainConfig, train


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Dropout(0.3), nn.Linear(16, 1))


def _batch(step, generator):
    x = torch.randn(5, 6, generator=generator)
    return x, x.sum(-1, keepdim=True).sin()


def _step(module, batch):
    x, y = batch
    return StepOutput((module(x) - y).square().mean())


def _cfg(path, **kw) -> TrainConfig:
    return TrainConfig(steps=9, lr=3e-2, warmup_steps=3, weight_decay=0.1, checkpoint_dir=path, checkpoint_every=2,
                       progress=False, **kw)


@pytest.mark.parametrize("stop_at", [4, 5])  # right after a checkpoint, and one step past it (work lost, redone)
def test_interrupted_and_resumed_equals_uninterrupted_bit_for_bit(tmp_path, stop_at):
    whole = _model()
    ref = train(whole, _step, _batch, _cfg(tmp_path / "whole"))

    def interrupting(step, generator):
        if step == stop_at:
            raise KeyboardInterrupt  # Ctrl-C between steps, or a killed job
        return _batch(step, generator)

    broken = _model()
    with pytest.raises(KeyboardInterrupt):
        train(broken, _step, interrupting, _cfg(tmp_path / "run"))
    torch.manual_seed(123)  # the new process's RNG is anything: the checkpoint's must win
    resumed_model = _model()
    resumed = train(resumed_model, _step, _batch, _cfg(tmp_path / "run", resume=True))
    assert resumed.resumed_from == 4
    for a, b in zip(whole.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)
    assert ref.history == resumed.history
    s_ref = torch.load(tmp_path / "whole" / "step-000009" / "optimizer.pt", weights_only=True)
    s_res = torch.load(tmp_path / "run" / "step-000009" / "optimizer.pt", weights_only=True)
    for k, st in s_ref["state"].items():
        for name, t in st.items():
            assert torch.equal(t, s_res["state"][k][name]), name


def test_without_the_rng_restored_the_runs_would_differ(tmp_path, monkeypatch):
    """The check above is not vacuous: dropout draws from the RNG, so a resume that skipped it diverges."""
    whole = _model()
    train(whole, _step, _batch, _cfg(tmp_path / "whole"))

    def interrupting(step, generator):
        if step == 4:
            raise KeyboardInterrupt
        return _batch(step, generator)

    with pytest.raises(KeyboardInterrupt):
        train(_model(), _step, interrupting, _cfg(tmp_path / "run"))
    import attnkit.common.training.checkpoint as ckpt_lib

    monkeypatch.setattr(ckpt_lib, "set_rng_state", lambda state: None)
    torch.manual_seed(123)
    resumed = _model()
    train(resumed, _step, _batch, _cfg(tmp_path / "run", resume=True))
    assert not torch.equal(whole[0].weight, resumed[0].weight)
