"""What sparse attention costs on this machine against dense: time and peak memory of a forward.

``attnkit sparse eval`` puts these beside the fidelity numbers, so that the trade is one table. Time:
every configuration (dense first) runs once a round, after one warm-up round, in one process; the
ratio is the median over rounds of each round's time over dense's in the same round, so that the
machine's load, which moves between rounds, cancels. Peak memory: the most tensor memory PyTorch
holds during one forward above what was live before it (on CUDA the allocator's peak; on the CPU
summed from the allocation records of PyTorch's profiler, one extra untimed forward), so it counts
what the forward allocates, not what the C library keeps cached.

    costs = compare_costs({"dense": dense_step, "moba@0.25": sparse_step}, base="dense", rounds=3)
    costs["moba@0.25"]["time_ratio"], costs["moba@0.25"]["memory_ratio"]
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch


def peak_bytes(step: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """Bytes of tensor memory ``step()`` holds at its peak above what was live before it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile

    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _fd2_silenced():  # Kineto writes a "USDT: ... profiler_start" line straight to fd 2
        prof.start()
    try:
        step()
    finally:
        with _fd2_silenced():  # and "... profiler_stop"
            prof.stop()
    # each operator's own allocations (net of its own frees) and the frees recorded outside any
    # operator, in the order they happened
    deltas = []
    for event in prof.events():
        delta = event.cpu_memory_usage if event.name == "[memory]" else event.self_cpu_memory_usage
        if delta:
            deltas.append((event.time_range.start, delta))
    deltas.sort(key=lambda d: d[0])
    live = peak = 0
    for _, delta in deltas:
        live += delta
        peak = max(peak, live)
    return peak


@contextmanager
def _fd2_silenced() -> Iterator[None]:
    """File descriptor 2 sent to /dev/null for the block (C++ logging that bypasses ``sys.stderr``)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def compare_costs(steps: dict[str, Callable[[], object]], base: str, rounds: int,
                  device: torch.device | str = "cpu") -> dict[str, dict]:
    """{name: time and peak memory of ``steps[name]`` against ``steps[base]``}: interleaved ``rounds``
    after a warm-up round (see the module's docstring). Each value: time_s (median), time_ratio (median
    of the per-round ratios to base), time_ratio_rounds, peak_bytes, memory_ratio."""
    if base not in steps:
        raise ValueError(f"the base {base!r} is not among the steps")
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    cuda = torch.device(device).type == "cuda"

    def timed(step: Callable[[], object]) -> float:
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    for step in steps.values():
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            times[name].append(timed(step))
    peaks = {name: peak_bytes(step, device) for name, step in steps.items()}
    out = {}
    for name, ts in times.items():
        ratios = [t / b for t, b in zip(ts, times[base])]
        out[name] = {"time_s": statistics.median(ts), "time_ratio": statistics.median(ratios),
                     "time_ratio_rounds": ratios, "peak_bytes": peaks[name],
                     "memory_ratio": peaks[name] / peaks[base] if peaks[base] else float("nan"), "rounds": rounds}
    return out
