"""On CUDA, the seam's attention maps equal the model's own eager maps, on five kinds of attention
(decoder, grouped-query, sliding window, soft-capped logits, a padded encoder), and the model's outputs
under ``attach`` are those without it (``device_checks.maps_vs_eager``)."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (bench/gpu_check.py runs the same checks where there is one)",
                allow_module_level=True)

from device_checks import MAP_ARCHS, maps_vs_eager  # noqa: E402


@pytest.mark.parametrize("arch", MAP_ARCHS)
def test_captured_maps_equal_eager_on_cuda(arch):
    result = maps_vs_eager(arch, "cuda")
    assert result["maps"] >= 2
