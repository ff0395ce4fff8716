"""On CUDA, block-sparse attention through FlexAttention (``BlockMask.from_kv_blocks``): equal to dense
attention restricted to the kept blocks, forward and backward, for MHA and GQA, ragged and aligned
lengths, block sizes 32 to 128 (``device_checks.sparse_flex_case``); chosen by ``auto`` on CUDA; and a
model under ``sparse_attention`` gives the portable kernel's logits."""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (bench/gpu_check.py runs the same checks where there is one)",
                allow_module_level=True)

from device_checks import SPARSE_SHAPES, moved, sparse_flex_case  # noqa: E402


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("density", [0.25, 1.0])
@pytest.mark.parametrize("shape", list(SPARSE_SHAPES))
def test_flex_block_kernel_equals_restricted_dense_on_cuda(shape, density, causal):
    sparse_flex_case(shape, density, causal, "cuda")


def test_auto_chooses_flex_on_cuda_for_a_plain_call():
    from attnkit.seam.kernels.block_kernels import BlockCall, choose_block_kernel
    from sparse_helpers import random_qkv, random_selection

    sel, _ = random_selection(1, 2, 256, 64, 0.25)
    sel = type(sel)(**{f: moved(getattr(sel, f), "cuda") for f in sel.__dataclass_fields__})
    q, k, v = (t.detach().cuda().float() for t in random_qkv(1, 4, 2, 256, 256, 64))
    assert choose_block_kernel(BlockCall(q, k, v, sel, 0.125)).name == "flex"


def test_model_under_sparse_attention_flex_equals_portable_on_cuda():
    from attnkit.sparse import SparseConfig
    from attnkit.sparse.attention import sparse_attention
    from conftest import _ids, llama

    model = llama().cuda()
    ids = _ids(2, 48).cuda()
    logits = {}
    for kernel in ("flex", "portable"):
        cfg = SparseConfig(pattern="sinks_window", density=0.5, block_size=16, kernel=kernel)
        with torch.no_grad(), sparse_attention(model, cfg):
            logits[kernel] = model(ids).logits
    torch.testing.assert_close(logits["flex"], logits["portable"], atol=1e-4, rtol=1e-4)
