"""The checks of attnkit's accelerator branches, written once for any device.

``tests/gpu`` runs them on CUDA and asserts; ``bench/gpu_check.py`` runs them on CUDA (or on the CPU,
in its ``--device cpu`` mode, to test the script itself) and records what they measured. Each check
raises ``AssertionError`` naming what differs and returns its measurements as a dict.

Every check compares against a reference attnkit does not compute:

- ``maps_vs_eager``: the model's own eager attention (transformers' softmax, ``output_attentions``),
  with ``test_architectures``' comparison (every site, every layer, outputs unchanged);
- ``conformance_case``: PyTorch's ``flex_attention`` on the device and the float64 reference of
  ``test_flex_conformance``, on that file's table of modifiers (forward, and gradients where the
  kernel has a backward on the device);
- ``training_contract``: the unattached model's gradients (taps, nothing modified), and a model whose
  attention is the float64 soft-capped reference of ``test_seam_contract`` (a score modifier);
- ``sparse_flex_case``: dense attention restricted to the kept blocks (``dense_reference``);
- ``statistics_case``: ``metrics/rows.py`` on a float64 softmax (``test_metrics_fused``' chunks).
"""

from __future__ import annotations

import contextlib
import copy
import sys
import warnings
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:  # the tests' helpers, also when bench/gpu_check.py imports this
    sys.path.insert(0, str(TESTS))

# One per kind of attention the seam must get right: plain decoder, grouped-query, sliding window,
# soft-capped logits, bidirectional encoder with padding.
MAP_ARCHS = ("gpt2", "llama", "mistral", "gemma2", "bert")
# The conformance table's cases a quick run keeps: a score modifier, captured-tensor lookups (single,
# chained, data-dependent), rows a modifier empties, a document mask, both kinds composed.
QUICK_CASES = ("alibi", "bias_chained", "bucket_lookup", "rows_to_neg_inf", "document_mask",
               "chained+rows_to_neg_inf+window")
CONFORMANCE_HEAD_DIM = 16  # the smallest head dim FlexAttention's compiled kernel is tuned for
# (B, H, Hkv, T, head dim, block size) of the block-sparse FlexAttention checks: MHA and GQA, a partial last block
SPARSE_SHAPES = {
    "mha-ragged": (2, 4, 4, 200, 32, 32),
    "gqa-aligned": (1, 8, 2, 256, 64, 64),
    "gqa-ragged-128": (1, 4, 2, 300, 64, 128),
}


def moved(value, device, dtype: torch.dtype | None = None):
    """``value`` (a tensor, or a dict of them) on ``device``; floating tensors in ``dtype`` when given."""
    if isinstance(value, dict):
        return {k: moved(v, device, dtype) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return value.to(device, dtype) if dtype is not None and value.is_floating_point() else value.to(device)
    return value


def _fp(device) -> tuple[torch.dtype, dict, dict]:
    """The dtype the checks run in on ``device`` and the (forward, gradient) tolerances against float64.

    CUDA: float32 (FlexAttention's compiled kernel, like PyTorch's tests of it); the CPU: float64 (its
    eager kernels take it), held to ``test_flex_conformance``'s tolerances: attnkit's kernels compute
    logits in float32 whatever the inputs."""
    if torch.device(device).type == "cpu":
        return torch.float64, dict(atol=2e-5, rtol=1e-5), dict(atol=5e-5, rtol=1e-4)
    return torch.float32, dict(atol=2e-5, rtol=1e-4), dict(atol=2e-4, rtol=1e-3)


@contextlib.contextmanager
def recompiles_allowed(limit: int = 1024):
    """Each modifier is new code to torch.compile: a table of them recompiles once per case, past
    dynamo's default limit of 8 (beyond which it would fall back to eager without failing). The limit
    counts per compiled function, and attnkit's two FlexAttention kernels compile the same one."""
    import torch._dynamo

    with torch._dynamo.config.patch(recompile_limit=limit, accumulated_recompile_limit=limit):
        yield


# --------------------------------------------------------------------------- maps vs eager
def maps_vs_eager(name: str, device) -> dict:
    """The seam's captured maps on ``device`` equal the model's own eager maps there, the model's outputs
    unchanged under ``attach`` (``test_architectures.check_against_reference``); float32."""
    from arch_zoo import by_name
    from test_architectures import capture_through_seam, check_against_reference, eager_reference, reference_maps

    arch = by_name(name)
    model, inputs = arch.build()
    model.to(device)
    inputs = moved(inputs, device)
    reference, plain = eager_reference(model, inputs)
    check_against_reference(arch, model, inputs, reference, plain)
    # The largest difference, for the record (check_against_reference asserts it within 1e-5).
    captured, _, _ = capture_through_seam(model, inputs)
    largest, compared = 0.0, 0
    for (stack, kind), maps in reference_maps(arch, reference).items():
        got = [m for (s, k, _), m in captured.items() if (s, k) == (stack, kind)]
        for g, w in zip(got, maps):
            largest = max(largest, float((g.float() - w.float()).abs().max()))
            compared += 1
    return {"arch": name, "category": arch.category, "maps": compared, "max_abs_diff": largest}


# --------------------------------------------------------------------------- modifier conformance
@contextlib.contextmanager
def captured_tensors_on(module, device):
    """The tensors ``module``'s modifiers close over (module globals) moved to ``device`` for the block:
    FlexAttention reads captured tensors on the device of the scores."""
    saved = {k: v for k, v in vars(module).items() if isinstance(v, torch.Tensor)}
    try:
        for k, v in saved.items():
            setattr(module, k, v.to(device))
        yield
    finally:
        for k, v in saved.items():
            setattr(module, k, v)


def conformance_kernels(device) -> dict[str, bool]:
    """attnkit kernel -> whether it is checked with gradients on ``device`` (flex: forward only on the CPU)."""
    cpu = torch.device(device).type == "cpu"
    return {"flex": not cpu, "dense": True, "block_sparse": True}


def conformance_case(case: str, shape_name: str, device) -> dict:
    """One row of ``test_flex_conformance``'s table on ``device``: PyTorch's flex_attention (eager, on the
    device) and the float64 reference agree, and so does every attnkit kernel, forward and backward."""
    import test_flex_conformance as conf

    score_mods, mask_mods = conf.CASES[case]
    Q, K, causal = conf.SHAPES[shape_name]
    scale = conf.D ** -0.5  # the table's scale, whatever the head dim
    dtype, fwd_tol, grad_tol = _fp(device)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(conf.B, conf.H, n, CONFORMANCE_HEAD_DIM, generator=g, dtype=torch.float64).requires_grad_()
               for n in (Q, K, K))
    allowed = conf._causal(Q, K) if causal else None
    ref = conf.reference_attention(q, k, v, score_mods, mask_mods, scale=scale, allowed=allowed)
    weight = v[:, :, :Q].detach().cos()  # a loss whose gradient differs per element
    ref_grads = torch.autograd.grad((ref * weight).sum(), (q, k, v))
    ref = ref.detach()
    result = {"case": case, "shape": shape_name, "dtype": str(dtype).removeprefix("torch."), "kernels": {}}
    with captured_tensors_on(conf, device), recompiles_allowed(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex warns about speed
        qd, kd, vd = (t.detach().to(device, dtype) for t in (q, k, v))
        oracle = conf._flex_oracle(qd, kd, vd, score_mods, mask_mods, causal)
        torch.testing.assert_close(oracle.double().cpu(), ref, **fwd_tol, msg=lambda m: f"{case}: torch flex vs float64: {m}")
        result["torch_flex_vs_float64"] = float((oracle.double().cpu() - ref).abs().max())
        for name, with_grad in conformance_kernels(device).items():
            leaves = [t.detach().to(device, dtype).requires_grad_(with_grad) for t in (q, k, v)]
            with torch.set_grad_enabled(with_grad):
                out = conf._run_kernel(name, *leaves, score_mods, mask_mods, causal)
            torch.testing.assert_close(out.detach(), oracle, **fwd_tol, msg=lambda m: f"{case}: {name} vs torch flex: {m}")
            row = {"forward_vs_torch_flex": float((out.detach() - oracle).abs().max())}
            if with_grad:
                grads = torch.autograd.grad((out * weight.to(device, dtype)).sum(), leaves)
                for which, got, want in zip("qkv", grads, ref_grads):
                    torch.testing.assert_close(got.double().cpu(), want, **grad_tol,
                                               msg=lambda m: f"{case}: {name} d{which} vs float64: {m}")
                row["grad_vs_float64"] = max(float((got.double().cpu() - want).abs().max())
                                             for got, want in zip(grads, ref_grads))
            result["kernels"][name] = row
    return result


def conformance_table(quick: bool) -> list[tuple[str, str]]:
    """(case, shape) pairs in the order a budgeted run takes them: every case with a KV cache first."""
    import test_flex_conformance as conf

    cases = QUICK_CASES if quick else tuple(conf.CASES)
    shapes = ("kv_cache",) if quick else ("kv_cache", "no_cache")
    return [(c, s) for s in shapes for c in cases]


# --------------------------------------------------------------------------- the training contract
def training_contract(device) -> dict:
    """Training through the seam on ``device`` (a GQA Llama, float32 on CUDA, float64 on the CPU):

    1. attached with a statistics tap, nothing modified: loss and every gradient equal the unattached
       model's (the model's own kernel runs);
    2. with a score modifier (soft-cap): they equal a copy whose attention is ``test_seam_contract``'s
       float64 soft-capped reference (registered with transformers, no attnkit in it), and on CUDA the
       modifier ran on the flex kernel (FlexAttention's backward), elsewhere on the dense kernel.
    """
    from attnkit.seam import StatsCollector, attach
    from attnkit.seam import kernels
    from attnkit.seam.mods import soft_cap
    from conftest import _ids, llama
    from test_seam_contract import CAP, _register_hf_reference

    dtype, _, grad_tol = _fp(device)
    model = llama().to(device, dtype)
    ids = _ids(2, 12).to(device)

    def lm_loss(m, x):  # in the model's own dtype (transformers' loss would upcast to float32)
        logits = m(x).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())

    def loss_and_grads(m):
        m.zero_grad(set_to_none=True)
        loss = lm_loss(m, ids)
        loss.backward()
        return loss.detach(), {n: p.grad.detach().clone() for n, p in m.named_parameters() if p.grad is not None}

    plain_loss, plain = loss_and_grads(model)
    stats = StatsCollector()
    with attach(model, taps=[stats]):
        tapped_loss, tapped = loss_and_grads(model)
    exact = dict(atol=0.0, rtol=0.0) if torch.device(device).type == "cpu" else dict(atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(tapped_loss, plain_loss, **exact)
    assert tapped.keys() == plain.keys()
    for n in plain:
        torch.testing.assert_close(tapped[n], plain[n], **exact, msg=lambda m, n=n: f"tapped gradient {n}: {m}")
    assert stats.heads(), "the tap saw no attention call"

    reference = copy.deepcopy(model).cpu().double()
    reference.set_attn_implementation(_register_hf_reference())
    ids_cpu = ids.cpu()
    reference.zero_grad(set_to_none=True)
    ref_loss = lm_loss(reference, ids_cpu)
    ref_loss.backward()
    ref_grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}

    ran: list[str] = []  # which kernel ran each modified call
    saved = dict(kernels.KERNELS)
    try:
        for name, kernel in saved.items():
            kernels.KERNELS[name] = kernels.Kernel(name, kernel.supports,
                                                  lambda call, mods, chunk, k=kernel: (ran.append(k.name), k.run(call, mods, chunk))[1])
        with recompiles_allowed(), attach(model, score_mods=[soft_cap(CAP)]):
            capped_loss, capped = loss_and_grads(model)
    finally:
        kernels.KERNELS.clear()
        kernels.KERNELS.update(saved)
    want_kernel = "dense" if torch.device(device).type == "cpu" else "flex"
    assert ran and set(ran) == {want_kernel}, f"soft-capped calls ran on {sorted(set(ran))}, expected {want_kernel}"
    torch.testing.assert_close(capped_loss.double().cpu(), ref_loss.detach(), **grad_tol)
    assert capped.keys() == ref_grads.keys()
    worst = 0.0
    for n, want in ref_grads.items():
        got = capped[n].double().cpu()
        torch.testing.assert_close(got, want, **grad_tol, msg=lambda m, n=n: f"soft-capped gradient {n}: {m}")
        worst = max(worst, float((got - want).abs().max()))
    return {"dtype": str(dtype).removeprefix("torch."), "tapped_equals_plain": True, "modified_kernel": want_kernel,
            "loss_vs_float64": abs(float(capped_loss) - float(ref_loss.detach())), "max_grad_diff_vs_float64": worst,
            "parameters": len(ref_grads)}


# --------------------------------------------------------------------------- block-sparse FlexAttention
def sparse_flex_case(shape: str, density: float, causal: bool, device) -> dict:
    """The block-sparse ``flex`` kernel (``BlockMask.from_kv_blocks``) on ``device`` equals dense attention
    restricted to the kept blocks, forward and (where FlexAttention has a backward: CUDA) backward."""
    from attnkit.seam.kernels.block_kernels import BlockCall, choose_block_kernel
    from attnkit.sparse import dense_reference
    from sparse_helpers import random_qkv, random_selection

    B, H, Hk, T, D, bs = SPARSE_SHAPES[shape]
    sel, geo = random_selection(B, Hk, T, bs, density, causal=causal)
    q, k, v = random_qkv(B, H, Hk, T, T, D)  # float64 leaves
    ref = dense_reference(q, k, v, sel.block_mask(), geo, scale=D ** -0.5)
    weight = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    with_grad = torch.device(device).type != "cpu"
    ref_grads = torch.autograd.grad((ref * weight).sum(), (q, k, v)) if with_grad else None
    dtype = torch.float32  # compiled FlexAttention takes no float64 on the CPU
    tol = dict(atol=2e-5, rtol=1e-4)
    leaves = [t.detach().to(device, dtype).requires_grad_(with_grad) for t in (q, k, v)]
    sel_d = type(sel)(**{f: moved(getattr(sel, f), device) for f in sel.__dataclass_fields__})
    call = BlockCall(*leaves, sel_d, D ** -0.5)
    kernel = choose_block_kernel(call, "flex")
    with torch.set_grad_enabled(with_grad), recompiles_allowed():  # one compiled flex_attention for every case
        out = kernel.run(call)
    torch.testing.assert_close(out.detach().double().cpu(), ref.detach(), **tol, msg=lambda m: f"{shape} forward: {m}")
    row = {"shape": shape, "density": density, "causal": causal, "kept": sel.kept_blocks() / sel.candidate_blocks(),
           "forward_max_diff": float((out.detach().double().cpu() - ref.detach()).abs().max())}
    if with_grad:
        with recompiles_allowed():
            grads = torch.autograd.grad((out * weight.to(device, dtype)).sum(), leaves)
        for which, got, want in zip("qkv", grads, ref_grads):
            torch.testing.assert_close(got.double().cpu(), want, atol=2e-4, rtol=1e-3, msg=lambda m: f"{shape} d{which}: {m}")
        row["grad_max_diff"] = max(float((g.double().cpu() - w).abs().max()) for g, w in zip(grads, ref_grads))
    return row


# --------------------------------------------------------------------------- the statistics kernel
def statistics_case(dtype: torch.dtype, compiled: bool, device, seed: int = 0) -> dict:
    """``fused.row_stats`` on ``device`` (eager, or compiled: Triton on CUDA, C++ on the CPU) on
    ``test_metrics_fused``' planted chunks (causal, padded, windowed, blind and one-key rows, NaN/inf),
    against ``rows.py`` on a float64 softmax of the same scores."""
    import os

    from attnkit.metrics import fused
    from test_metrics_fused import _check, _chunk, _reference

    raw, scale, lo, hi, pos = _chunk(seed, Rn=16, K=40, dtype=dtype)
    ref, finite, _, _ = _reference(raw, scale, lo, hi, pos)
    before = os.environ.get("ATTNKIT_COMPILE")
    os.environ["ATTNKIT_COMPILE"] = "1" if compiled else "0"
    try:
        got = fused.row_stats(raw.to(device), scale, lo.to(device), hi.to(device), pos.to(device))
        kernel = fused._kernel(raw.reshape(-1, raw.shape[-1]).to(device), 1 << 30)
    finally:
        if before is None:
            os.environ.pop("ATTNKIT_COMPILE")
        else:
            os.environ["ATTNKIT_COMPILE"] = before
    if compiled:
        assert fused._compile_failed is None, fused._compile_failed
        assert kernel is not fused._row_sums, "the compiled kernel did not run"
    got = fused.RowStats(**{f: moved(getattr(got, f), "cpu") for f in fused.RowStats.__dataclass_fields__})
    _check(got, ref, finite)
    return {"dtype": str(dtype).removeprefix("torch."), "compiled": compiled, "rows": int(finite.sum())}
