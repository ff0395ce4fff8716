"""Launching attnkit under a real ``torchrun`` (``python -m torch.distributed.run``) from a test:
gloo on the CPU, a free port per launch, one thread a process."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import pytest

needs_torchrun = pytest.mark.skipif(
    shutil.which("torchrun") is None and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
    reason="torchrun is not installed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(target: list[str], nproc: int = 2, timeout: float = 600) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node NPROC TARGET``: the processes' stdout and stderr, and torchrun's exit code."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TRANSFORMERS_VERBOSITY="error")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
           str(free_port()), *target]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def torchrun_attnkit(args: list[str], nproc: int = 2, timeout: float = 600) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node NPROC attnkit ARGS``."""
    return torchrun(["-m", "attnkit.cli.main", *args], nproc, timeout)


def torchrun_python(script: str, args: list[str], nproc: int = 2, timeout: float = 600) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node NPROC SCRIPT ARGS``: a Python file run as each rank's main."""
    return torchrun([script, *args], nproc, timeout)
