"""In-memory snapshots of a training run, so the ``rollback`` intervention can undo a trend.

    monitor = AttentionMonitor(model, optimizer=opt, scheduler=sched, policy=...,
                               snapshots=Snapshots(every=24, keep=4))

PaLM and OPT restart a run that spiked from a checkpoint taken ~100 steps before the spike (with
a lower learning rate or other batches). ``Snapshots`` is that checkpoint, kept in memory by the
monitor: one when the monitor starts (the run as it was handed over, labelled with the step before
the first ``on_step``), then one every ``every`` steps while the run looks healthy (the latest
observed step raised none of the ``unhealthy`` issue types and its loss was finite). At most
``keep`` are kept (the oldest dropped first), each a deep copy **on CPU** of the model's
``state_dict``, the optimizer's ``state_dict`` and the scheduler's ``state_dict`` (if given).
Cost: ``keep`` copies of the parameters and the optimizer state (AdamW: ~3x the parameters each),
in host memory; ``nbytes`` says how much.

A snapshot labelled step s holds the state after step s's update, i.e. the weights step s + 1's
forward used. ``restore`` copies a snapshot back **in place** (``load_state_dict`` on the same
parameter tensors, the same optimizer and scheduler objects): the user's loop, its optimizer,
hooks and any DDP wrapper keep working. Gradients are not part of a snapshot (the loop zeroes them
before its next backward).
"""

from __future__ import annotations

import copy
import math
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from attnkit.errors import UserError
from attnkit.seam import unwrap

# A step with any of these issues is not a state to come back to.
# (Not overflow_risk or logit_growth alone: at LR 1e-2 healthy GPT-2 runs pass a max logit of 100.)
UNHEALTHY = ("softmax_saturation", "nonfinite", "nonfinite_trace", "loss_spike")


def _to_cpu(obj: Any) -> Any:
    """A deep copy with every tensor copied to CPU (detached)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return copy.deepcopy(obj)


def _nbytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


@dataclass
class Snapshot:
    step: int  # the state after this step's update
    model: dict
    optimizer: dict | None
    scheduler: dict | None

    @property
    def nbytes(self) -> int:
        return _nbytes(self.model) + _nbytes(self.optimizer) + _nbytes(self.scheduler)


class Snapshots:
    """Bounded in-memory snapshots (see the module docstring). every: steps between snapshots (>= 1);
    keep: how many are kept (>= 1); unhealthy: issue types during which no snapshot is taken."""

    def __init__(self, every: int = 24, keep: int = 4, unhealthy: tuple[str, ...] = UNHEALTHY) -> None:
        for name, v in (("every", every), ("keep", keep)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UserError(f"Snapshots({name}=...) must be a whole number >= 1, got {v!r}")
        self.every, self.keep, self.unhealthy = every, keep, tuple(unhealthy)
        self.kept: deque[Snapshot] = deque(maxlen=keep)
        self.healthy = True
        self.restored_at: int | None = None  # the loop step of the latest restore

    def __len__(self) -> int:
        return len(self.kept)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.kept)

    # ---------------------------------------------------------------- taking
    def take(self, monitor, step: int) -> Snapshot:
        """Copy the run's state now (model, optimizer, scheduler) to CPU, labelled ``step``."""
        opt, sched = monitor.optimizer, monitor.scheduler
        snap = Snapshot(step, _to_cpu(unwrap(monitor.model).state_dict()),
                        _to_cpu(opt.state_dict()) if opt is not None else None,
                        _to_cpu(sched.state_dict()) if sched is not None and hasattr(sched, "state_dict") else None)
        self.kept.append(snap)
        return snap

    def after_step(self, monitor, step: int, diagnosis) -> None:
        """Called by the monitor after every step: note health on observed steps, snapshot when due."""
        if self.restored_at == step:
            return  # rolled back at this step: the diagnosis is of the state that was undone
        if diagnosis is not None:
            loss = monitor.latest.loss if monitor.latest is not None else None
            self.healthy = not any(i.type in self.unhealthy for i in diagnosis.issues) and (
                loss is None or math.isfinite(loss))
        if step % self.every == 0 and self.healthy:
            self.take(monitor, step)

    # ---------------------------------------------------------------- restoring
    def choose(self, before: int | None) -> tuple[Snapshot, bool]:
        """The newest snapshot taken before step ``before`` (None: the newest); when every kept one is
        newer, the oldest kept. Returns (snapshot, whether it is before ``before``)."""
        if not self.kept:
            raise UserError("no snapshot to roll back to (none taken yet)")
        if before is None:
            return self.kept[-1], True
        older = [s for s in self.kept if s.step < before]
        return (older[-1], True) if older else (self.kept[0], False)

    def restore(self, monitor, snap: Snapshot, step: int) -> None:
        """Copy ``snap`` back in place. The learning rates the monitor's interventions set stay
        (relative to the schedule): a rollback undoes the training, not the decision to slow it."""
        opt, sched = monitor.optimizer, monitor.scheduler
        if opt is not None and snap.optimizer is None:
            raise UserError(f"the snapshot of step {snap.step} has no optimizer state: give the optimizer to "
                            "AttentionMonitor(..., optimizer=opt) before it starts")
        unwrap(monitor.model).load_state_dict(snap.model)  # copy_ into the same tensors
        if opt is not None and snap.optimizer is not None:
            lrs = [g["lr"] for g in opt.param_groups]
            base = list(getattr(sched, "base_lrs", []) or [])
            # load_state_dict keeps CPU tensors as given: a copy, so later steps do not write into the snapshot
            opt.load_state_dict(_to_cpu(snap.optimizer))
            if sched is not None and snap.scheduler is not None:
                sched.load_state_dict(copy.deepcopy(snap.scheduler))
            if base and len(base) == len(snap.scheduler.get("base_lrs", [])):
                # the schedule as of the snapshot, times what the interventions did to its base rates since
                for g, now, then in zip(opt.param_groups, base, snap.scheduler["base_lrs"]):
                    if now != then:
                        g["lr"] = g["lr"] * (now / then)
                sched.base_lrs = base
                sched._last_lr = [g["lr"] for g in opt.param_groups]
            else:
                for g, lr in zip(opt.param_groups, lrs):
                    g["lr"] = lr
        # the snapshots after this one belong to a trajectory that no longer exists
        while self.kept and self.kept[-1].step > snap.step:
            self.kept.pop()
        self.restored_at = step
        self.healthy = True
