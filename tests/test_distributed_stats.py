"""Streamed statistics across processes: two gloo ranks, each observing half of a batch, hold after
``StatsCollector.all_reduce`` exactly the statistics one process computes on the whole batch."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from attnkit.seam import StatsCollector, attach
from attnkit.common.training.distributed import leave_group

WORLD = 2


def _model() -> nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    with torch.no_grad():
        for lyr in enc.layers:
            lyr.self_attn.in_proj_weight.mul_(3.0)
    return enc


def _batch() -> torch.Tensor:
    return torch.randn(4, 9, 16, generator=torch.Generator().manual_seed(7))


def _stats_of(x: torch.Tensor) -> StatsCollector:
    model = _model()  # built identically on every rank
    stats = StatsCollector()
    with torch.no_grad(), attach(model, taps=[stats]):
        model(x)
    return stats


def _worker(rank: int, rendezvous: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
    try:
        x = _batch().chunk(WORLD)[rank]  # each rank sees its own half of the batch
        stats = _stats_of(x)
        stats.all_reduce()
        if rank == 0:
            with open(out, "w") as f:
                json.dump(stats.heads(), f)
    finally:
        leave_group()


def test_all_reduce_over_two_processes_equals_one_process_on_the_whole_batch(tmp_path):
    out = tmp_path / "heads.json"
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), str(out)), nprocs=WORLD, join=True)
    merged = json.loads(out.read_text())
    whole = _stats_of(_batch())
    halves = [_stats_of(half).heads() for half in _batch().chunk(WORLD)]
    assert len(merged) == len(whole.heads()) == 8
    for got, want, first in zip(merged, whole.heads(), halves[0]):
        assert got["rows"] == want["rows"] == 2 * first["rows"]
        for key in ("entropy", "normalized_entropy", "max_attention", "sink_mass", "logit_range", "logit_max",
                    "logit_min", "qk_absmax", "log10_curvature_max"):
            assert math.isclose(got[key], want[key], rel_tol=1e-9, abs_tol=1e-9), key
        # the interval over sequences rests on every rank's sequences, gathered
        assert got["sequences"] == want["sequences"] == 2 * first["sequences"]
        assert got["entropy_ci95"] == pytest.approx(want["entropy_ci95"], rel=1e-9, abs=1e-9)
        # the two halves really differ: the reduction is not one rank's numbers
        assert not math.isclose(first["entropy"], want["entropy"], rel_tol=1e-6)
