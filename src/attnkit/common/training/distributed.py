"""The process group a training run is part of: one process, or ``torchrun`` with DDP.

``torchrun`` sets RANK / WORLD_SIZE / MASTER_ADDR; ``init_from_env`` (``attnkit.common.distributed``,
shared with the commands that read a dataset) joins that group (gloo on the CPU, NCCL on CUDA)
unless the caller already did. Gradients are averaged by torch's own
``DistributedDataParallel``; attnkit only shards each global batch and averages logged numbers.
"""

from __future__ import annotations

from torch import Tensor, nn

from attnkit.common.distributed import DistEnv, barrier, init_from_env, leave_group, sum_over_ranks

__all__ = ["DistEnv", "barrier", "init_from_env", "leave_group", "mean_over_ranks", "shard", "wrap"]


def wrap(module: nn.Module, env: DistEnv, find_unused_parameters: bool = False) -> nn.Module:
    """``module`` in torch's DistributedDataParallel when there are several processes (else as is)."""
    if not env.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(module, find_unused_parameters=find_unused_parameters)


def shard(batch, env: DistEnv):
    """This rank's share of a global batch: tensors (and tensors in dicts/tuples/lists) split on dim 0.

    Equal shares, so the mean of the ranks' mean losses — what DDP's gradient averaging
    computes — is the mean loss of the whole batch.
    """
    if not env.distributed:
        return batch
    if isinstance(batch, Tensor):
        if batch.shape[0] % env.world_size:
            raise ValueError(f"a global batch of {batch.shape[0]} does not split evenly over {env.world_size} processes")
        return batch.chunk(env.world_size)[env.rank]
    if isinstance(batch, dict):
        return {k: shard(v, env) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(shard(v, env) for v in batch)
    return batch


def mean_over_ranks(values: dict[str, float], env: DistEnv) -> dict[str, float]:
    """Logged numbers averaged over the ranks (each rank's are means over equal shares)."""
    if not env.distributed or not values:
        return values
    keys = sorted(values)
    return {k: total / env.world_size for k, total in zip(keys, sum_over_ranks([values[k] for k in keys], env))}
