"""Peak memory of one step on the CPU, read from the kernel's resident-set counters.

Run the step in a fresh process started with glibc's mmap threshold fixed at 128 KiB
(``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_``, see ``FIXED_MMAP_ENV``): every large
allocation is then its own mapping, unmapped when freed, and RSS follows live memory. Before the
step, freed pages are handed back (``malloc_trim``), the peak counter is reset
(``/proc/self/clear_refs``, Linux >= 4.0) and RSS is read; the step's peak is ``VmHWM - VmRSS``
after it: everything the step allocated and touched on top of what was there. ``tracemalloc``
does not see torch's allocations, and torch's memory profiler covers CUDA only; hence RSS.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

FIXED_MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def status() -> dict[str, int]:
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(k + r":\s+(\d+)", text).group(1)) * 1024 for k in ("VmRSS", "VmHWM")}


def trim() -> None:
    """Hand freed heap pages back to the kernel (glibc)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_of(step: Callable[[], object]) -> int:
    """Bytes ``step()`` allocates and touches at its peak, on top of what was live before it."""
    gc.collect()
    trim()
    Path("/proc/self/clear_refs").write_text("5")
    base = status()["VmRSS"]
    result = step()
    peak = status()["VmHWM"] - base
    del result
    return peak


def report(result: dict) -> None:
    """What a worker process prints for ``run_fresh`` to read."""
    print("RESULT " + json.dumps(result))


def run_fresh(cmd: list[str], what: str) -> dict:
    """Run a worker (``cmd``, which ends by calling ``report``) in a fresh process with the fixed
    mmap threshold, and return what it reported; its output in the error when it reports nothing."""
    env = dict(os.environ, PYTHONWARNINGS="ignore", TRANSFORMERS_VERBOSITY="error", **FIXED_MMAP_ENV)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(f"{what} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])

