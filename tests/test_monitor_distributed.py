"""The monitor under torch.distributed: two gloo ranks, each training on half of a batch, log (on
rank 0 only) the same per-head statistics and loss as one process on the whole batch."""

from __future__ import annotations

import json
import math

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from attnkit.monitor import AttentionMonitor
from attnkit.common.training.distributed import leave_group

WORLD = 2


def _model() -> nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    with torch.no_grad():
        for lyr in enc.layers:
            lyr.self_attn.in_proj_weight.mul_(3.0)
    return enc


def _batch() -> torch.Tensor:
    return torch.randn(4, 9, 16, generator=torch.Generator().manual_seed(7))


def _run(x: torch.Tensor, log_dir: str) -> None:
    model = _model()
    with AttentionMonitor(model, every=1, log_dir=log_dir, emit=()) as monitor:
        loss = model(x).square().mean()
        loss.backward()
        monitor.on_step(0, loss=loss)


def _worker(rank: int, rendezvous: str, base: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
    try:
        _run(_batch().chunk(WORLD)[rank], f"{base}/rank{rank}")
    finally:
        leave_group()


def _step(log_dir) -> dict:
    return next(json.loads(line) for line in (log_dir / "monitor.jsonl").read_text().splitlines()
                if '"type": "step"' in line)


def test_two_ranks_log_once_the_statistics_of_the_whole_batch(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD, join=True)
    assert not (tmp_path / "rank1").exists()  # only rank 0 logs
    merged = _step(tmp_path / "rank0")
    _run(_batch(), str(tmp_path / "single"))
    whole = _step(tmp_path / "single")
    _run(_batch().chunk(WORLD)[0], str(tmp_path / "half"))
    half = _step(tmp_path / "half")
    assert math.isclose(merged["loss"], whole["loss"], rel_tol=1e-6)
    for metric in ("entropy", "logit_max", "sink_mass", "max_attention"):
        assert len(merged["metrics"][metric]) == 8
        for got, want in zip(merged["metrics"][metric], whole["metrics"][metric]):
            assert math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9), metric
    assert merged["metrics"]["entropy"] != half["metrics"]["entropy"]  # not one rank's numbers


def _ddp_run(x: torch.Tensor, log_dir: str, wrap: bool) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = _model()
    trained = DDP(model) if wrap else model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with AttentionMonitor(trained, every=1, log_dir=log_dir, emit=(), optimizer=opt) as monitor:
        loss = trained(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        monitor.on_step(0, loss=loss)


def _ddp_worker(rank: int, rendezvous: str, base: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
    try:
        _ddp_run(_batch().chunk(WORLD)[rank], f"{base}/rank{rank}", wrap=True)
    finally:
        leave_group()


def test_ddp_gradient_norms_are_those_of_the_whole_batch(tmp_path):
    """Under DDP each rank's accumulate hooks see only its half-batch gradient; the monitor reads
    the averaged one at the optimizer step, which is the unwrapped model's on the whole batch."""
    mp.spawn(_ddp_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD, join=True)
    merged = _step(tmp_path / "rank0")
    _ddp_run(_batch(), str(tmp_path / "single"), wrap=False)
    whole = _step(tmp_path / "single")
    _ddp_run(_batch().chunk(WORLD)[0], str(tmp_path / "half"), wrap=False)
    half = _step(tmp_path / "half")
    assert len(merged["grad_norm"]) == 2 and all(g > 0 for g in merged["grad_norm"])
    for got, want in zip(merged["grad_norm"], whole["grad_norm"]):
        assert math.isclose(got, want, rel_tol=1e-5), (merged["grad_norm"], whole["grad_norm"])
    assert not math.isclose(merged["grad_norm"][0], half["grad_norm"][0], rel_tol=1e-3)  # not one rank's
    # and the model under the monitor trained exactly as without it: the loss is the whole batch's
    assert math.isclose(merged["loss"], whole["loss"], rel_tol=1e-6)
