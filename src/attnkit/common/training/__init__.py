"""A small training harness shared by attnkit's features (sparse distillation, gating, paths, ...).

``train(module, step_fn, batch_fn, cfg)``: AdamW, warmup + cosine learning rate, gradient
clipping, a progress bar with a live metric, checkpoints written atomically and an exact resume,
in one process or under ``torchrun`` with torch's DistributedDataParallel (see ``loop.py``).
"""

from attnkit.common.training.checkpoint import Checkpoint, latest
from attnkit.common.training.distributed import DistEnv, init_from_env, mean_over_ranks, shard
from attnkit.common.training.loop import StepOutput, TrainConfig, TrainResult, batch_generator, train
from attnkit.common.training.schedule import warmup_cosine

__all__ = [
    "Checkpoint", "DistEnv", "StepOutput", "TrainConfig", "TrainResult", "batch_generator", "init_from_env",
    "latest", "mean_over_ranks", "shard", "train", "warmup_cosine",
]
