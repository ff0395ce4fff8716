"""On CUDA, the training contract through the seam (``device_checks.training_contract``): with a tap and
nothing modified, gradients equal the unattached model's; with a score modifier, they equal a float64
reference attention's, and the modifier runs on the flex kernel (FlexAttention's backward)."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (bench/gpu_check.py runs the same checks where there is one)",
                allow_module_level=True)

from device_checks import training_contract  # noqa: E402


def test_training_through_the_seam_on_cuda():
    result = training_contract("cuda")
    assert result["modified_kernel"] == "flex"
