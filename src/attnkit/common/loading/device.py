"""Where a model runs and in which dtype: ``--device``, ``--dtype`` and ``--device-map`` resolved once.

Every command that loads a model passes these three through ``load_model``; the features then read a
model's device from its parameters (``model_device``) and put their inputs there.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from attnkit.errors import UserError

DEVICE_CHOICES = "auto|cpu|cuda[:N]|mps"
DTYPE_NAMES = ("float32", "float16", "bfloat16")
DEVICE_MAPS = ("auto",)  # Accelerate's placement over GPUs and CPU

_DEVICE_SPEC = re.compile(r"^(auto|cpu|mps|cuda)(?::(\d+))?$")


def resolve_device(spec: str | torch.device) -> torch.device:
    """"auto" is cuda if there is one, else mps if there is one, else cpu; anything absent is a UserError.

    Under ``torchrun`` "auto" and "cuda" (without an index) mean this process's own GPU,
    cuda:LOCAL_RANK (one GPU a process, as torchrun is meant to start them)."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    match = _DEVICE_SPEC.match(spec.strip().lower())
    if match is None or (match.group(2) is not None and match.group(1) != "cuda"):
        raise UserError(f"cannot read --device '{spec}': use auto, cpu, cuda, cuda:N or mps")
    kind, index = match.group(1), match.group(2)
    if kind == "auto":
        if torch.cuda.is_available():
            return _this_process_gpu()
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise UserError("CUDA is not available on this machine; use --device cpu")
        count = torch.cuda.device_count()
        if index is not None and int(index) >= count:
            raise UserError(f"--device {spec}: this machine has {count} CUDA device{'s' if count != 1 else ''} "
                            f"(cuda:0 to cuda:{count - 1})")
        return torch.device("cuda", int(index)) if index is not None else _this_process_gpu()
    if kind == "mps" and not _mps_available():
        raise UserError("MPS (Apple GPU) is not available on this machine; use --device cpu")
    return torch.device(kind)


def _this_process_gpu() -> torch.device:
    """cuda:LOCAL_RANK under torchrun, else cuda. NCCL refuses two processes on one GPU, so more
    processes on a machine than it has GPUs is a UserError."""
    from attnkit.common.distributed import local_rank

    rank = local_rank()
    if rank is None:
        return torch.device("cuda")
    count = torch.cuda.device_count()
    if rank >= count:
        raise UserError(f"torchrun started process {rank} on a machine with {count} CUDA device"
                        f"{'s' if count != 1 else ''}: one process a GPU (--nproc-per-node {count} or fewer), "
                        "or --device cpu")
    return torch.device("cuda", rank)


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_dtype(spec: str | torch.dtype, device: torch.device, checkpoint_dtype: torch.dtype | str | None = None
                  ) -> torch.dtype:
    """"auto" is the checkpoint's own dtype on an accelerator and float32 on the CPU (where half precision
    is slow and the statistics are cheapest to trust); a dtype the device cannot compute in is a UserError."""
    if isinstance(spec, torch.dtype):
        dtype = spec
    elif spec == "auto":
        if device.type == "cpu":
            return torch.float32
        if isinstance(checkpoint_dtype, str):
            checkpoint_dtype = getattr(torch, checkpoint_dtype, None)
        dtype = checkpoint_dtype if isinstance(checkpoint_dtype, torch.dtype) and checkpoint_dtype.is_floating_point \
            else torch.float32
    elif spec in DTYPE_NAMES:
        dtype = getattr(torch, spec)
    else:
        raise UserError(f"cannot read --dtype '{spec}': use auto, {', '.join(DTYPE_NAMES)}")
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        if spec == "auto":
            return torch.float16  # the checkpoint's bfloat16 on a GPU without it: the half format it has
        raise UserError(f"this GPU ({torch.cuda.get_device_name(device)}) cannot compute in bfloat16; "
                        f"use --dtype float16 or float32")
    return dtype


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's first parameter (the CPU for a model without any): where its inputs go."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def out_of_memory_message(error: BaseException) -> str:
    """One line for an out-of-memory, naming the flags that would help."""
    first = str(error).strip().splitlines()[0] if str(error).strip() else "out of memory"
    return (f"out of memory ({first[:160]}); try --dtype bfloat16 (half the memory of float32), "
            f"--device-map auto (spread the model over GPUs and CPU), or a shorter text / smaller --batch-size")
