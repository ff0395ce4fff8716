"""``attnkit check``'s fp16 verdict on the product the kernel really stores.

Eager attention (transformers' GPT-2 and Llama code) computes q·kᵀ in the compute dtype *before*
the softmax scale; SDPA scales q first (its fused CPU kernel accumulates in fp32). The independent
reference is the model's own forward in fp16: its logits turn non-finite exactly when the stored
product passes 65,504. A planted head whose W_q/W_k rows are scaled up overflows (check says unsafe
and names that layer and head); the same model unplanted does not (check says safe). A module
output past 65,504 is seen by the measured pass.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from conftest import _ids, gpt2, llama

import attnkit
from attnkit.check import estimate, read_shape
from attnkit.check.kernels import KERNEL_PRODUCTS
from attnkit.check.safety import judge

PLANTED = (1, 2)  # (layer, head)
T = 16


def _plant(model, factor: float) -> None:
    """Scale the planted head's query rows and its key head's rows by ``factor`` (logits × factor²)."""
    layer, head = PLANTED
    with torch.no_grad():
        if hasattr(model, "transformer"):  # GPT-2: c_attn is a Conv1D (in, 3 × width): q | k | v columns
            attn = model.transformer.h[layer].attn
            d, width = attn.head_dim, attn.embed_dim
            attn.c_attn.weight[:, head * d:(head + 1) * d] *= factor
            attn.c_attn.weight[:, width + head * d:width + (head + 1) * d] *= factor
        else:  # Llama: q_proj / k_proj rows, grouped-query key heads
            attn = model.model.layers[layer].self_attn
            d = attn.head_dim
            kv = head // attn.num_key_value_groups
            attn.q_proj.weight[head * d:(head + 1) * d] *= factor
            attn.k_proj.weight[kv * d:(kv + 1) * d] *= factor


def _fp16_forward_is_finite(model) -> bool:
    """The model's own forward under fp16 autocast (eager: q·kᵀ stored in fp16 before the scale)."""
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        return bool(torch.isfinite(model(input_ids=_ids(2, T)).logits).all())


@pytest.mark.parametrize("make", [gpt2, llama], ids=["gpt2", "llama"])
def test_a_planted_head_that_overflows_fp16_is_unsafe_and_named(make):
    model = make("eager")
    _plant(model, 300.0)
    assert not _fp16_forward_is_finite(model)  # the reference: the run's own fp16 forward breaks
    report = attnkit.check(model, seq_len=T, dtype="fp16", regions=False)
    (overflow,) = [f for c in report.primary for f in c.verdicts["fp16"].findings if f.type == "qk_overflow"]
    assert overflow.severity == "unsafe" and report.status == "unsafe"
    assert (overflow.layer, overflow.head) == PLANTED
    assert f"layer {PLANTED[0]} head {PLANTED[1]}" in overflow.message


@pytest.mark.parametrize("make", [gpt2, llama], ids=["gpt2", "llama"])
def test_the_same_model_unplanted_is_safe(make):
    model = make("eager")
    assert _fp16_forward_is_finite(model)
    report = attnkit.check(model, seq_len=T, dtype="fp16", regions=False)
    assert report.status == "safe"
    (overflow,) = [f for c in report.primary for f in c.verdicts["fp16"].findings if f.type == "qk_overflow"]
    assert overflow.value < 65504.0 / 100  # far from the line, not just under it


def test_the_kernel_decides_which_figure_meets_the_limit():
    """A raw product past 65,504 whose logit (× 1/√8) is not: eager's forward breaks, SDPA's does not,
    and check judges each kernel by the figure that kernel stores."""
    eager, sdpa = gpt2("eager").half(), gpt2("sdpa").half()
    sdpa.load_state_dict(eager.state_dict())
    layer, head = PLANTED
    attn = eager.transformer.h[layer].attn
    d, width = attn.head_dim, attn.embed_dim
    caught = {}
    hook = attn.c_attn.register_forward_hook(lambda _m, _i, out: caught.update(qkv=out.detach().double()))
    with torch.no_grad():
        eager(input_ids=_ids(2, T))
    hook.remove()
    q = caught["qkv"][..., head * d:(head + 1) * d]
    k = caught["qkv"][..., width + head * d:width + (head + 1) * d]
    raw = float((q @ k.transpose(-1, -2)).abs().amax())  # causal or not, the largest is on the diagonal's side too
    factor = (1.3e5 / raw) ** 0.5  # raw -> 130,000: past 65,504; logits 130,000 / √8 = 46,000: not
    for model in (eager, sdpa):
        _plant(model, factor)
    with torch.no_grad():
        eager_out = eager(input_ids=_ids(2, T)).logits
        sdpa_out = sdpa(input_ids=_ids(2, T)).logits
    assert not torch.isfinite(eager_out).all() and torch.isfinite(sdpa_out).all()

    shape = read_shape(eager.config)
    est = replace(estimate(shape, T), raw_absmax=1.3e5, raw_absmax_high=1.3e5, model_max=1.3e5 / d ** 0.5,
                  model_max_high=1.3e5 / d ** 0.5)
    status = {k: next(f.severity for f in judge(replace(est, kernel=k), "fp16").findings if f.type == "qk_overflow")
              for k in ("eager", "sdpa", None)}
    assert status == {"eager": "unsafe", "sdpa": "safe", None: "unsafe"}  # a kernel not named: judged as eager
    assert set(KERNEL_PRODUCTS) >= {"eager", "sdpa"}


def test_the_measured_pass_sees_an_mlp_past_fp16s_range():
    """An MLP whose output passes 65,504 breaks the fp16 forward outside attention; the measured pass
    reports the module and check --measure calls fp16 unsafe (bf16 has the range)."""
    from attnkit.check.measure import _LargestOutput
    from attnkit.common.distributed import DistEnv

    model = gpt2("eager")
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.mul_(300.0)
        model.transformer.h[0].mlp.c_proj.weight.mul_(300.0)
    assert not _fp16_forward_is_finite(model)
    caught = {}
    handle = model.transformer.h[0].mlp.c_proj.register_forward_hook(
        lambda _m, _i, out: caught.update(top=float(out.abs().amax())))
    with _LargestOutput(model) as largest, torch.no_grad():
        model(input_ids=_ids(2, T))
    handle.remove()
    top, module = largest.result(DistEnv())
    assert top >= caught["top"] > 65504.0 and module == "transformer.h.0.mlp.c_proj"
    est = estimate(read_shape(model.config), T)
    fp16 = judge(est, "fp16", activation=(top, module))
    bf16 = judge(est, "bf16", activation=(top, module))
    (finding,) = [f for f in fp16.findings if f.type == "activation_overflow"]
    assert fp16.status == "unsafe" and module in finding.message
    assert not [f for f in bf16.findings if f.type == "activation_overflow"]
