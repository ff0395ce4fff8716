"""The training loop: a user's step function, AdamW, warmup + cosine, clipping, checkpoints, DDP.

    from attnkit.common.training import TrainConfig, StepOutput, train

    def batch_fn(step, generator):            # the global batch of a step, from its own generator
        return random_blocks(ids, 1024, 8, generator)

    def step_fn(module, batch):               # module: yours, or DDP around it under torchrun
        loss = module(batch)                  # call the module (DDP syncs gradients on its forward)
        return StepOutput(loss, {"kl": loss})

    train(module, step_fn, batch_fn, TrainConfig(steps=300, lr=1e-3, checkpoint_dir="out/ckpt"))

Only ``module``'s parameters that require grad are trained. Each step's batch comes from a
generator seeded by (seed, step), so a batch is a function of its step: a run resumed from its
checkpoint sees the same batches, and with the optimizer, scheduler and RNG states restored it
ends bit for bit where the uninterrupted run ends (``tests/test_training_resume.py``). Under
``torchrun`` every rank builds the same global batch and takes its share (``distributed.shard``);
torch's ``DistributedDataParallel`` averages the gradients, so two ranks train as one process on
the whole batch would (``tests/test_training_distributed.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from attnkit.errors import UserError
from attnkit.common.progress import ProgressBar
from attnkit.common.training import checkpoint as ckpt_lib
from attnkit.common.training.distributed import DistEnv, init_from_env, mean_over_ranks, shard, wrap
from attnkit.common.training.schedule import make_scheduler

# Settings that must not change between a run and its resume: they decide every step.
RESUME_KEYS = ("steps", "lr", "weight_decay", "betas", "warmup_steps", "min_lr_ratio", "grad_clip", "seed")


@dataclass
class TrainConfig:
    """steps: total optimizer steps. lr: peak learning rate (AdamW), reached after ``warmup_steps``,
    then a cosine down to ``min_lr_ratio`` × lr. grad_clip: max global gradient norm (None: off).
    checkpoint_dir: where checkpoints go (None: none); checkpoint_every: steps between them (0: only
    at the end). resume: continue from the last checkpoint in checkpoint_dir (a fresh start when
    there is none). metric: the logged number the progress bar shows. meta: the caller's settings
    (model, data, ...) that a resume must match, stored in each checkpoint."""

    steps: int
    lr: float = 1e-3
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    grad_clip: float | None = 1.0
    seed: int = 0
    checkpoint_dir: str | Path | None = None
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    resume: bool = False
    metric: str = "loss"
    progress: bool = True
    log_every: int = 50
    description: str = "training"
    find_unused_parameters: bool = False
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise UserError(f"steps must be at least 1, got {self.steps}")
        if not self.lr > 0:
            raise UserError(f"learning rate must be positive, got {self.lr}")
        if self.warmup_steps < 0 or self.checkpoint_every < 0:
            raise UserError("warmup steps and checkpoint interval must be 0 or more")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise UserError(f"grad clip must be positive (or None), got {self.grad_clip}")
        if self.keep_checkpoints < 1:
            raise UserError("keep at least 1 checkpoint")

    def fingerprint(self) -> dict:
        d = asdict(self)
        out = {k: d[k] for k in RESUME_KEYS}
        out["betas"] = list(out["betas"])
        out["meta"] = self.meta
        return out


@dataclass
class StepOutput:
    """What a step function returns: the loss to minimise and numbers to log (tensors or floats)."""

    loss: Tensor
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainResult:
    steps: int  # steps completed in all (including those before a resume)
    resumed_from: int | None  # the checkpoint step this run started from
    history: list[dict]  # per step: {"step", "lr", "loss", "grad_norm", metrics...}, averaged over ranks
    checkpoint: Path | None  # the last checkpoint written
    env: DistEnv = field(default_factory=DistEnv)


def batch_generator(seed: int, step: int) -> torch.Generator:
    """The generator of a step's batch: a function of (seed, step) only, so a resume sees the same batches."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63 - 1))


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (nanoGPT's rule: no decay on biases, norms, scalars)."""
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0})
              if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


def train(
    module: nn.Module,
    step_fn: Callable[[nn.Module, Any], StepOutput | Tensor],
    batch_fn: Callable[[int, torch.Generator], Any],
    cfg: TrainConfig,
    env: DistEnv | None = None,
) -> TrainResult:
    """Train ``module``'s parameters that require grad for ``cfg.steps`` steps (see the module doc)."""
    env = env or init_from_env()
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise UserError("nothing to train: no parameter of the module requires grad")
    optimizer = make_optimizer(params, cfg)
    scheduler = make_scheduler(optimizer, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
    root = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir is not None else None
    start, history, resumed_from = 0, [], None
    found = ckpt_lib.latest(root) if root is not None else None
    if found is not None and not cfg.resume:
        raise UserError(f"{root} already holds a checkpoint (step {found.step}); resume it, or give a new directory")
    if found is not None:
        _check_resumable(found, cfg)
        ckpt_lib.load(found, module, optimizer, scheduler, env)
        start, history, resumed_from = found.step, list(found.state.get("history", [])), found.step
    else:
        torch.manual_seed(cfg.seed + env.rank)  # dropout and sampling inside steps: reproducible per rank
    wrapped = wrap(module, env, cfg.find_unused_parameters)
    last_ckpt = found.path if found is not None else None
    progress = ProgressBar(cfg.description, cfg.steps, completed=start, transient=False,
                           log_every=cfg.log_every, enabled=cfg.progress and env.is_main)
    with progress:
        for step in range(start, cfg.steps):
            batch = shard(batch_fn(step, batch_generator(cfg.seed, step)), env)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.zero_grad(set_to_none=True)
            out = step_fn(wrapped, batch)
            out = out if isinstance(out, StepOutput) else StepOutput(out)
            out.loss.backward()
            numbers = {"loss": float(out.loss.detach())}
            if cfg.grad_clip is not None:
                numbers["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
            optimizer.step()
            scheduler.step()
            numbers.update({k: float(v.detach()) if isinstance(v, Tensor) else float(v) for k, v in out.metrics.items()})
            numbers = mean_over_ranks(numbers, env)
            if not math.isfinite(numbers["loss"]):
                raise UserError(f"the loss is {numbers['loss']} at step {step + 1}; lower the learning rate "
                                f"(now {lr:.3g}) or check the data")
            history.append({"step": step + 1, "lr": lr, **numbers})
            shown = numbers.get(cfg.metric)
            progress.update(step + 1, shown=(f"{cfg.metric} {shown:.4g}" if shown is not None else "") + f"  lr {lr:.2e}")
            done = step + 1
            if root is not None and (done == cfg.steps or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0)):
                last_ckpt = ckpt_lib.save(root, done, module, optimizer, scheduler,
                                          {"history": history, "settings": cfg.fingerprint()}, env,
                                          keep=cfg.keep_checkpoints)
    return TrainResult(max(start, cfg.steps), resumed_from, history, last_ckpt, env)


def _check_resumable(found: ckpt_lib.Checkpoint, cfg: TrainConfig) -> None:
    saved = found.state.get("settings", {})
    now = cfg.fingerprint()
    differ = [k for k in now if k in saved and saved[k] != now[k]]
    if differ:
        shown = ", ".join(f"{k}: {saved[k]!r} then, {now[k]!r} now" for k in differ[:4])
        raise UserError(f"cannot resume {found.path}: the run's settings changed ({shown}); "
                        f"use the same settings, or a new directory")
