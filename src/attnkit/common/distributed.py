"""The process group a command is part of: one process, or ``torchrun`` (torch.distributed).

``torchrun`` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR; ``init_from_env`` joins that group
unless the caller already did. Training averages gradients with torch's own DDP
(``attnkit.common.training``); the commands that read a dataset (``analyze``, ``validate``'s
ablation, ``check --measure``) give each rank its share of the sequences (``rank_share``), sum
what the ranks measured, and report once, on rank 0::

    with command_group(device) as env:               # one process: rank 0 of 1, no group at all
        result = agree(env, lambda: work(rank_share(items, env)))   # a rank's error stops every rank
        ... all-reduce the statistics ...
        if env.is_main:
            write the report

A rank that fails while the others still work would leave them waiting in the next collective
until its timeout; ``agree`` makes every rank learn of any rank's failure at one point and stop
with the same one-line error.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from attnkit.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    initialized_here: bool = False  # this run created the group and destroys it at the end

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_world_size() -> int:
    """How many processes ``torchrun`` started (1 outside it)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def local_rank() -> int | None:
    """This process's index on its machine under ``torchrun`` (None outside it)."""
    if launched_world_size() <= 1 or "LOCAL_RANK" not in os.environ:
        return None
    try:
        return int(os.environ["LOCAL_RANK"])
    except ValueError:
        return None


def init_from_env(backend: str | None = None) -> DistEnv:
    """The group this process is in: an existing one, torchrun's (from the environment), or none.

    backend: torch.distributed's name; default NCCL when CUDA is present, else gloo.
    """
    if dist.is_available() and dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size())
    if launched_world_size() <= 1 or not dist.is_available():
        return DistEnv()
    dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"))
    return DistEnv(dist.get_rank(), dist.get_world_size(), initialized_here=True)


def leave_group() -> None:
    """Destroy this process's group, after freeing whatever still holds it.

    A ``DistributedDataParallel`` wrapper caught in a reference cycle is freed by the collector
    later, after the group is gone; its Reducer then destroys gloo's transport from a thread that
    was never joined and the process aborts ("terminate called without an active exception"), one
    run in ten or so. Collecting first frees the wrapper while its group still exists.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    gc.collect()
    dist.destroy_process_group()


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def backend_for(device: torch.device) -> str:
    """gloo for a model on the CPU; on CUDA, NCCL for the CUDA tensors and gloo beside it for the
    small Python objects the ranks exchange (``agree``, the per-sequence sums)."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


@contextmanager
def command_group(device: torch.device | str = "cpu") -> Iterator[DistEnv]:
    """This process's place in a ``torchrun`` launch, for one command run on ``device``: joins the
    group (and leaves it at the end, also after an error) when this call created it."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is not None and launched_world_size() > 1:
        torch.cuda.set_device(device)  # NCCL's collectives run on the current device
    env = init_from_env(backend_for(device))
    try:
        yield env
    finally:
        if env.initialized_here:
            leave_group()


def rank_share(items: Sequence[T], env: DistEnv) -> Sequence[T]:
    """This rank's share of ``items`` (a list, or a tensor along dim 0): every ``world_size``-th
    item from ``rank`` on. Interleaved rather than cut in runs, so a dataset sorted by length or
    source gives each rank a like mix; a rank past the end gets nothing and contributes nothing."""
    if not env.distributed:
        return items
    return items[env.rank :: env.world_size]


class RankFailed(UserError):
    """Another rank stopped with an error: this one stops too (the message says which rank and why)."""


def agree(env: DistEnv, work: Callable[[], T]) -> T:
    """``work()`` on this rank; then every rank learns whether any rank failed, and all stop if one did.

    A rank whose ``work`` raised re-raises its own error (its own one line and exit code); every
    other rank raises ``RankFailed`` naming the first rank that failed and its message. One
    process: ``work()`` as is.
    """
    if not env.distributed:
        return work()
    error: BaseException | None = None
    result = None
    try:
        result = work()
    except Exception as e:  # noqa: BLE001 - told to every rank below, then re-raised here
        error = e
    mine = None if error is None else (type(error).__name__, _first_line(error), isinstance(error, UserError))
    everyone: list = [None] * env.world_size
    dist.all_gather_object(everyone, mine)
    if error is not None:
        raise error
    failed = next(((rank, f) for rank, f in enumerate(everyone) if f is not None), None)
    if failed is not None:
        rank, (kind, message, user_error) = failed
        raise RankFailed(f"rank {rank} stopped: {message}" if user_error else f"rank {rank} stopped: {kind}: {message}")
    return result


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def gather_from_ranks(value: T, env: DistEnv) -> list[T]:
    """Every rank's ``value`` (any picklable object), in rank order; ``[value]`` in one process."""
    if not env.distributed:
        return [value]
    everyone: list = [None] * env.world_size
    dist.all_gather_object(everyone, value)
    return everyone


def sum_over_ranks(values: Sequence[float], env: DistEnv) -> list[float]:
    """Each value summed over the ranks, in float64 (counts and sums of losses)."""
    if not env.distributed or not values:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()
