"""On CUDA, ``test_flex_conformance``'s table of score and mask modifiers: PyTorch's own flex_attention
on the GPU agrees with the float64 reference, and attnkit's kernels (compiled FlexAttention, dense,
block-sparse at density 1) give its result, forward and backward (``device_checks.conformance_case``).
Every case with a KV cache (queries offset among the keys); a selection without one."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (bench/gpu_check.py runs the same checks where there is one)",
                allow_module_level=True)

from device_checks import conformance_table, conformance_case  # noqa: E402


@pytest.mark.parametrize("case,shape", conformance_table(quick=False))
def test_every_kernel_gives_flex_result_on_cuda(case, shape):
    result = conformance_case(case, shape, "cuda")
    assert set(result["kernels"]) == {"flex", "dense", "block_sparse"}
