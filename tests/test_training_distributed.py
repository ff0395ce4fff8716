"""attnkit.common.training under torch.distributed, joined as torchrun starts processes (RANK, WORLD_SIZE,
MASTER_ADDR/PORT in the environment): two gloo ranks with torch's DistributedDataParallel, each on
half of every global batch, train as one process on the whole batch does; an interrupted 2-rank run
resumed from its checkpoint ends bit for bit where the uninterrupted 2-rank run ends."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from attnkit.common.training import StepOutput, TrainConfig, train
from attnkit.common.training.distributed import leave_group

WORLD = 2


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))


def _batch(step, generator):
    x = torch.randn(8, 6, generator=generator)  # the global batch; each rank takes 4
    return x, x.sum(-1, keepdim=True).sin()


def _cfg(path, **kw) -> TrainConfig:
    return TrainConfig(steps=6, lr=2e-2, warmup_steps=2, checkpoint_dir=path, checkpoint_every=2, progress=False, **kw)


def _worker(rank: int, port: int, base: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))  # what torchrun sets
    torch.set_num_threads(1)
    seen: list[type] = []

    def step(module, batch):
        seen.append(type(module))
        x, y = batch
        assert x.shape[0] == 4  # this rank's half
        return StepOutput((module(x) - y).square().mean())

    def interrupting(s, generator):
        if s == 3:
            raise KeyboardInterrupt
        return _batch(s, generator)

    whole = _model()
    result = train(whole, step, _batch, _cfg(f"{base}/whole"))  # joins the group from the environment
    assert result.env.world_size == WORLD and dist.is_initialized()
    assert seen[0] is DistributedDataParallel
    try:
        train(_model(), step, interrupting, _cfg(f"{base}/run"))
    except KeyboardInterrupt:
        pass
    resumed = _model()
    again = train(resumed, step, _batch, _cfg(f"{base}/run", resume=True))
    assert again.resumed_from == 2
    if rank == 0:
        torch.save({"whole": whole.state_dict(), "resumed": resumed.state_dict(), "history": result.history},
                   f"{base}/rank0.pt")
    leave_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_train_as_one_process_and_resume_exactly(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    got = torch.load(tmp_path / "rank0.pt", weights_only=True)
    for name, t in got["whole"].items():
        assert torch.equal(t, got["resumed"][name]), name  # resume under DDP: bit for bit
    single = _model()
    ref = train(single, lambda m, b: StepOutput((m(b[0]) - b[1]).square().mean()), _batch,
                _cfg(tmp_path / "single"))
    for name, t in single.state_dict().items():
        # the mean of two half-batch gradients is the whole batch's, up to float rounding
        assert torch.allclose(t, got["whole"][name], atol=1e-6, rtol=1e-5), name
    assert [h["loss"] for h in got["history"]] == pytest.approx([h["loss"] for h in ref.history], rel=1e-5)
    assert not torch.allclose(single.state_dict()["0.weight"], _model().state_dict()["0.weight"])  # it trained
