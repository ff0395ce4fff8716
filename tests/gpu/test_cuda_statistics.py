"""On CUDA, the fused statistics kernel, eager and compiled (Triton), in float32, float16 and bfloat16,
equals ``rows.py`` on a float64 softmax (``device_checks.statistics_case``); and an analysis of a model
on the GPU equals the same analysis on the CPU."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (bench/gpu_check.py runs the same checks where there is one)",
                allow_module_level=True)

from device_checks import statistics_case  # noqa: E402


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_statistics_kernel_equals_float64_rows_on_cuda(dtype, compiled):
    statistics_case(dtype, compiled, "cuda")


def test_analysis_on_cuda_equals_the_cpu():
    import attnkit
    from conftest import _ids, llama

    model = llama()
    ids = _ids(2, 24)
    on_cpu = attnkit.analyze(model, {"input_ids": ids}).to_json()
    on_gpu = attnkit.analyze(model.cuda(), {"input_ids": ids.cuda()}).to_json()
    assert len(on_gpu["heads"]) == len(on_cpu["heads"]) > 0
    for got, want in zip(on_gpu["heads"], on_cpu["heads"]):
        for key, value in want.items():
            if isinstance(value, float):
                assert got[key] == pytest.approx(value, rel=1e-4, abs=1e-5, nan_ok=True), key
            elif not isinstance(value, (list, dict)):
                assert got[key] == value, key
