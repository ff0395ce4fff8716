"""attnkit.common.training: schedule, optimizer groups, clipping, checkpoint files and the errors a user meets."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from attnkit.errors import UserError
from attnkit.common.training import StepOutput, TrainConfig, batch_generator, latest, train, warmup_cosine
from attnkit.common.training.loop import make_optimizer

TARGET = torch.tensor([[1.5, -2.0, 0.5], [0.0, 1.0, 3.0]])


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(3, 2)


def _batch(step, generator):
    x = torch.randn(8, 3, generator=generator)
    return x, x @ TARGET.T


def _step(module, batch):
    x, y = batch
    loss = (module(x) - y).square().mean()
    return StepOutput(loss, {"mse": loss})


def test_warmup_then_cosine_against_the_formula():
    assert warmup_cosine(0, 4, 20, 0.1) == pytest.approx(0.25)
    assert warmup_cosine(3, 4, 20, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(4, 4, 20, 0.1) == pytest.approx(1.0)  # peak at the first decay step
    assert warmup_cosine(19, 4, 20, 0.1) == pytest.approx(0.1)  # floor at the last step
    mid = 4 + 15 / 2
    assert warmup_cosine(mid, 4, 20, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert warmup_cosine(0, 0, 1, 0.0) == pytest.approx(1.0)  # a one-step run trains at the peak


def test_weight_decay_only_on_matrices():
    m = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    opt = make_optimizer(list(m.parameters()), TrainConfig(steps=1, weight_decay=0.1))
    decays = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decays[id(m[0].weight)] == 0.1
    assert decays[id(m[0].bias)] == decays[id(m[1].weight)] == decays[id(m[1].bias)] == 0.0


def test_it_trains_and_logs_the_schedule_and_the_metric():
    m = _model()
    result = train(m, _step, _batch, TrainConfig(steps=200, lr=0.05, warmup_steps=10, grad_clip=None,
                                                  progress=False))
    assert result.steps == 200 and len(result.history) == 200
    assert result.history[-1]["mse"] < 1e-3 < result.history[0]["mse"]
    assert torch.allclose(m.weight, TARGET, atol=0.05)
    lrs = [h["lr"] for h in result.history]
    assert lrs[0] == pytest.approx(0.005) and max(lrs) == pytest.approx(0.05)
    assert lrs[-1] == pytest.approx(0.005)  # min_lr_ratio 0.1


def test_grad_clip_logs_the_norm_before_clipping_and_clips_the_step():
    m = _model()
    lr, clip = 0.1, 1e-3
    before = m.weight.detach().clone()
    result = train(m, _step, _batch, TrainConfig(steps=1, lr=lr, grad_clip=clip, betas=(0.0, 0.0), progress=False))
    ref = _model()
    x, y = _batch(0, batch_generator(0, 0))
    (ref(x) - y).square().mean().backward()
    norm = torch.cat([ref.weight.grad.flatten(), ref.bias.grad.flatten()]).norm()
    assert result.history[0]["grad_norm"] == pytest.approx(float(norm), rel=1e-5)
    clipped = torch.cat([m.weight.grad.flatten(), m.bias.grad.flatten()]).norm()  # what the optimizer stepped on
    assert float(clipped) == pytest.approx(clip, rel=1e-5)
    # Adam with beta2=0 normalises each coordinate: the step is lr * sign(g)
    assert torch.allclose((m.weight.detach() - before).abs(), torch.full_like(before, lr), rtol=1e-3)


def test_checkpoint_files_load_safely_and_only_the_newest_are_kept(tmp_path):
    m = _model()
    cfg = TrainConfig(steps=6, checkpoint_dir=tmp_path, checkpoint_every=2, keep_checkpoints=2, progress=False)
    train(m, _step, _batch, cfg)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest.json", "step-000004", "step-000006"]
    found = latest(tmp_path)
    assert found.step == 6 and json.loads((tmp_path / "latest.json").read_text())["dir"] == "step-000006"
    weights = load_file(str(found.path / "weights.safetensors"))
    assert torch.equal(weights["weight"], m.weight.detach()) and set(weights) == {"weight", "bias"}
    for name in ("optimizer.pt", "scheduler.pt", "rng-rank0.pt"):
        torch.load(found.path / name, weights_only=True)  # tensors and numbers only
    assert len(found.state["history"]) == 6


def test_a_half_written_checkpoint_is_never_the_latest(tmp_path):
    cfg = TrainConfig(steps=4, checkpoint_dir=tmp_path, checkpoint_every=2, progress=False)

    def stop_at_3(step, generator):
        if step == 2:
            raise KeyboardInterrupt
        return _batch(step, generator)

    with pytest.raises(KeyboardInterrupt):
        train(_model(), _step, stop_at_3, cfg)
    (tmp_path / ".step-000004.tmp").mkdir()  # what a run killed while writing leaves
    (tmp_path / ".step-000004.tmp" / "weights.safetensors").write_bytes(b"half")
    assert latest(tmp_path).step == 2
    cfg.resume = True
    assert train(_model(), _step, _batch, cfg).resumed_from == 2
    assert latest(tmp_path).step == 4 and not (tmp_path / ".step-000004.tmp").exists()
    load_file(str(tmp_path / "step-000004" / "weights.safetensors"))


def test_user_mistakes_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="at least 1"):
        TrainConfig(steps=0)
    with pytest.raises(UserError, match="positive"):
        TrainConfig(steps=1, lr=0.0)
    frozen = _model().requires_grad_(False)
    with pytest.raises(UserError, match="nothing to train"):
        train(frozen, _step, _batch, TrainConfig(steps=1, progress=False))
    train(_model(), _step, _batch, TrainConfig(steps=2, checkpoint_dir=tmp_path, progress=False))
    with pytest.raises(UserError, match="already holds a checkpoint"):
        train(_model(), _step, _batch, TrainConfig(steps=2, checkpoint_dir=tmp_path, progress=False))
    with pytest.raises(UserError, match="settings changed.*lr"):
        train(_model(), _step, _batch, TrainConfig(steps=2, lr=0.5, checkpoint_dir=tmp_path, resume=True,
                                                   progress=False))
    bigger = nn.Linear(3, 3)
    with pytest.raises(UserError, match="shape"):
        train(bigger, _step, _batch, TrainConfig(steps=2, checkpoint_dir=tmp_path, resume=True, progress=False))

    def nan_step(module, batch):
        return module(batch[0]).sum() * float("nan")

    with pytest.raises(UserError, match="loss is nan at step 1"):
        train(_model(), nan_step, _batch, TrainConfig(steps=3, progress=False))


def test_batches_are_a_function_of_the_step():
    a = torch.randn(4, generator=batch_generator(3, 7))
    b = torch.randn(4, generator=batch_generator(3, 7))
    c = torch.randn(4, generator=batch_generator(3, 8))
    assert torch.equal(a, b) and not torch.equal(a, c)
