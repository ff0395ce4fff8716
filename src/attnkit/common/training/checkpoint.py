"""Checkpoints written whole or not at all, and read back for an exact resume.

Layout under a run's checkpoint folder::

    latest.json                   {"step": 200, "dir": "step-000200"}   (tmp file + os.replace)
    step-000200/
        weights.safetensors       the trainable parameters (names as in module.named_parameters())
        optimizer.pt scheduler.pt torch.save of state_dicts: tensors and numbers only
        rng-rank0.pt ...          each process's torch RNG state (dropout, sampling)
        state.json                step, history of logged numbers, the run's settings

A checkpoint folder is filled under a temporary name and renamed into place (``os.replace``:
atomic on one filesystem), then ``latest.json`` is replaced; a run killed at any moment leaves
the previous checkpoint intact. Everything loads with ``torch.load(weights_only=True)`` or
safetensors: nothing pickled runs.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from attnkit.errors import UserError
from attnkit.common.io import write_atomic
from attnkit.common.training.distributed import DistEnv, barrier

LATEST = "latest.json"


@dataclass
class Checkpoint:
    """What a run is resumed from."""

    path: Path
    step: int  # steps completed
    state: dict  # state.json


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that train (requires_grad), by name, as contiguous CPU copies."""
    return {n: p.detach().cpu().contiguous().clone() for n, p in module.named_parameters() if p.requires_grad}


def save(root: Path, step: int, module: nn.Module, optimizer, scheduler, state: dict, env: DistEnv,
         keep: int = 2) -> Path:
    """Write checkpoint ``step`` under ``root`` (every rank calls this; rank 0 writes the shared parts)."""
    name = f"step-{step:06d}"
    final, tmp = root / name, root / f".{name}.tmp"
    if env.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a half-written folder of a killed run
        tmp.mkdir()
        save_file(trainable_state(module), str(tmp / "weights.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "state.json").write_text(json.dumps({**state, "step": step, "world_size": env.world_size}, indent=1))
    barrier(env)
    torch.save(rng_state(), tmp / f"rng-rank{env.rank}.pt")
    barrier(env)
    if env.is_main:
        shutil.rmtree(final, ignore_errors=True)  # the same step written again (a rerun of a finished run)
        os.replace(tmp, final)
        write_atomic(root / LATEST, json.dumps({"step": step, "dir": name}) + "\n")
        older = sorted(p for p in root.glob("step-*") if p.is_dir() and p.name < name)
        for old in older[: max(0, len(older) - (keep - 1))]:  # keep the newest keep-1 before this one
            shutil.rmtree(old, ignore_errors=True)
    barrier(env)
    return final


def latest(root: Path) -> Checkpoint | None:
    """The last complete checkpoint under ``root``, or None when there is none."""
    pointer = root / LATEST
    if not pointer.exists():
        return None
    try:
        info = json.loads(pointer.read_text())
        path = root / info["dir"]
        state = json.loads((path / "state.json").read_text())
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"checkpoint {pointer} cannot be read ({e}); delete {root} to start over") from e
    return Checkpoint(path, int(info["step"]), state)


def load(ckpt: Checkpoint, module: nn.Module, optimizer, scheduler, env: DistEnv) -> None:
    """Put ``module``'s trainable parameters, the optimizer, the scheduler and this rank's RNG back."""
    if ckpt.state.get("world_size", 1) != env.world_size:
        raise UserError(f"checkpoint {ckpt.path} was written by {ckpt.state.get('world_size')} processes; "
                        f"resume it with as many (this run has {env.world_size})")
    weights = load_file(str(ckpt.path / "weights.safetensors"))
    params = {n: p for n, p in module.named_parameters() if p.requires_grad}
    if set(weights) != set(params):
        missing, extra = sorted(set(params) - set(weights)), sorted(set(weights) - set(params))
        raise UserError(f"checkpoint {ckpt.path} does not fit this run's trainable parameters "
                        f"(missing {missing[:3]}, unexpected {extra[:3]})")
    with torch.no_grad():
        for n, p in params.items():
            if p.shape != weights[n].shape:
                raise UserError(f"checkpoint {ckpt.path}: {n} has shape {tuple(weights[n].shape)}, "
                                f"this run's is {tuple(p.shape)}")
            p.copy_(weights[n])
    optimizer.load_state_dict(torch.load(ckpt.path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(ckpt.path / "scheduler.pt", weights_only=True))
    set_rng_state(torch.load(ckpt.path / f"rng-rank{env.rank}.pt", weights_only=True))


def rng_state() -> dict:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
