"""attnkit's C++ kernels say once that they are being built (seconds inside the first call that needs
one), and never when a build for this machine exists or the caller shows its own status."""

from __future__ import annotations

import warnings

import pytest
import torch

from attnkit.metrics import qk_stats
from attnkit.metrics.native import KernelBuildNotice, NativeKernel
from attnkit.seam.kernels import paged_cpu

KERNELS = {"paged decoding kernel": paged_cpu.KERNEL, "statistics kernel": qk_stats.KERNEL}


def _fresh(kernel: NativeKernel) -> NativeKernel:
    """The same kernel with nothing loaded or tried yet."""
    return NativeKernel(kernel.name, kernel.source, kernel.namespace, kernel.what, kernel.headers, kernel.build_seconds)


@pytest.mark.parametrize("what", KERNELS)
def test_a_build_is_announced_once(what, monkeypatch, tmp_path):
    from torch.utils import cpp_extension

    builds = []
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: builds.append(kw["name"]))  # a build that succeeds
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # a machine with no build yet
    kernel = _fresh(KERNELS[what])
    with pytest.warns(KernelBuildNotice, match=f"building the C\\+\\+ {what} for this CPU .once per machine"):
        assert kernel.load() is getattr(torch.ops, kernel.namespace)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernel.load()  # built: no second notice, no second build
        quiet = _fresh(KERNELS[what])
        quiet.load(announce=False)  # the caller shows a status of its own
    assert len(builds) == 2


def test_a_machine_with_a_build_loads_it_without_notice(monkeypatch):
    kernel = _fresh(qk_stats.KERNEL)
    if kernel.needs_build():
        pytest.skip("no build of the statistics kernel on this machine")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernel.load() is not None
