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


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def malloc_in_use() -> int:
    """Bytes the process holds in live ``malloc`` allocations (glibc's ``mallinfo2``: in-use heap
    chunks plus mapped blocks), 0 where glibc has no ``mallinfo2``: live memory to the byte,
    whatever pages it touches (torch's CPU tensors and CPython's larger objects; CPython's small
    objects come from its own arenas and are not counted)."""
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return 0
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return info.uordblks + info.hblkhd


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


def unit(metric: str) -> int:
    """What a worker's figure ``metric`` is shown in: MiB, KiB for the byte-exact live ``malloc``
    figures (``fwd_malloc``), 1 for counts (``..._blocks``)."""
    return 1 if metric.endswith("_blocks") else 2**10 if metric.endswith("_malloc") else 2**20


def unit_name(metric: str) -> str:
    return {1: "", 2**10: "KiB", 2**20: "MiB"}[unit(metric)]


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

