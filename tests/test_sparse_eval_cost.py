"""The cost columns of ``attnkit sparse eval`` (attnkit.sparse.cost): peak tensor memory against
allocations whose sizes and lifetimes are known, and the interleaved comparison's bookkeeping
(no timing is asserted: speed is measured in bench/, not tested)."""

from __future__ import annotations

import pytest
import torch

from attnkit.sparse.cost import compare_costs, peak_bytes

MB = 1_000_000


def _allocates(sizes_alive_together: list[int]):
    """A step that holds float32 tensors of these byte sizes at once, then frees them."""
    def step():
        held = [torch.ones(n // 4) for n in sizes_alive_together]
        return sum(float(t[0]) for t in held)
    return step


@pytest.mark.parametrize("sizes", [[4 * MB], [4 * MB, 2 * MB], [1 * MB, 1 * MB, 3 * MB]], ids=["one", "two", "three"])
def test_peak_bytes_is_the_most_held_at_once(sizes):
    peak = peak_bytes(_allocates(sizes))
    assert sum(sizes) <= peak <= sum(sizes) + 64 * 1024  # plus the scalars a step allocates


def test_peak_bytes_counts_what_is_freed_before_the_next_allocation_once():
    def step():
        a = torch.ones(MB // 4)
        del a
        b = torch.ones(2 * MB // 4)  # a is gone: the peak is b's, not a + b
        return b
    assert 2 * MB <= peak_bytes(step) <= 2 * MB + 64 * 1024


def test_peak_bytes_of_in_place_work_on_existing_tensors_is_small():
    x = torch.ones(MB // 4)
    assert peak_bytes(lambda: x.mul_(2.0)) < 64 * 1024


def test_compare_costs_bookkeeping():
    calls = []
    steps = {"dense": lambda: calls.append("dense") or _allocates([2 * MB])(),
             "sparse": lambda: calls.append("sparse") or _allocates([4 * MB])()}
    costs = compare_costs(steps, "dense", rounds=3)
    # a warm-up round, three interleaved rounds, one untimed run each for the memory
    assert calls == ["dense", "sparse"] * 4 + ["dense", "sparse"]
    assert costs["dense"]["time_ratio"] == 1.0 and costs["dense"]["time_ratio_rounds"] == [1.0] * 3
    assert len(costs["sparse"]["time_ratio_rounds"]) == 3 and costs["sparse"]["time_ratio"] > 0
    assert costs["sparse"]["memory_ratio"] == pytest.approx(2.0, rel=0.05)
    assert costs["sparse"]["rounds"] == 3 and costs["sparse"]["time_s"] > 0


@pytest.mark.parametrize("kwargs,message", [(dict(base="nope", rounds=1), "not among the steps"),
                                            (dict(base="dense", rounds=0), "at least 1")])
def test_compare_costs_refuses_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        compare_costs({"dense": lambda: None}, **kwargs)


def test_peak_bytes_writes_nothing_to_the_console_and_leaves_stderr_working(capfd):
    import sys

    def step():
        print("from the step", file=sys.stderr, flush=True)  # what the step itself writes still shows
        return torch.ones(1000)

    assert peak_bytes(step) >= 4000
    print("after", file=sys.stderr, flush=True)
    err = capfd.readouterr().err
    assert err == "from the step\nafter\n"  # no profiler start/stop lines from the C++ side
