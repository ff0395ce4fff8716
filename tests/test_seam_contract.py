"""The seam's contract in training, for every adapter (Hugging Face, nn.MultiheadAttention, protocol).

- attached with taps and nothing modified: outputs and gradients equal the unattached model's bit for bit;
- with a score modifier: outputs and gradients equal an independent float64 implementation;
- after backward, no tap or accumulator holds autograd history;
- under gradient checkpointing (reentrant or not) every row is counted once;
- nested sessions both see every call; DDP-wrapped (gloo) and torch.compile'd models attach.
"""

from __future__ import annotations

import gc
import copy
import math
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from attnkit.seam.mods import soft_cap
from attnkit.seam import MapCapture, Site, StatsCollector, Tap, attach
from attnkit.seam.adapters.protocol import attention
from arch_zoo import enable_checkpointing
from conftest import _ids, gpt2, llama

CAP = 0.7  # small enough that soft-capping changes the logits of these peaked models a lot


# --------------------------------------------------------------------------- float64 references
def softcapped_attention64(q, k, v, allowed, scale, cap):
    """softmax(cap * tanh(q k^T * scale / cap)) v over allowed keys, in float64 (the test's own maths)."""
    logits = torch.matmul(q.double(), k.double().transpose(-1, -2)) * scale
    logits = cap * torch.tanh(logits / cap)
    if allowed is not None:
        logits = logits.masked_fill(~allowed, -math.inf)
    return torch.matmul(torch.softmax(logits, -1), v.double())


def _hf_reference_function(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    allowed = None if attention_mask is None else attention_mask > torch.finfo(attention_mask.dtype).min / 2
    out = softcapped_attention64(query, key, value, allowed, scaling, CAP)
    return out.transpose(1, 2).contiguous(), None


def _register_hf_reference() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register("softcap_reference64", _hf_reference_function)
    AttentionMaskInterface.register("softcap_reference64", eager_mask)
    return "softcap_reference64"


class ProtocolAttention(nn.Module):
    """nanoGPT-style causal self-attention that joins the seam through the protocol."""

    is_attnkit_attention = True

    def __init__(self, width: int = 16, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.reference_cap: float | None = None  # set on the float64 reference copy only

    def forward(self, x):  # (B, T, C)
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.heads, -1).transpose(1, 2) for t in self.qkv(x).split(C, 2))  # (B, nh, T, hs)
        if self.reference_cap is None:
            y = attention(self, q, k, v, is_causal=True)
        else:
            causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
            y = softcapped_attention64(q, k, v, causal, q.shape[-1] ** -0.5, self.reference_cap)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class ProtocolModel(nn.Module):
    def __init__(self, layers: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([ProtocolAttention() for _ in range(layers)])
        with torch.no_grad():
            for b in self.blocks:
                b.qkv.weight.mul_(3.0)
        self.checkpointed: bool | None = None  # None: no checkpoint; else use_reentrant

    def forward(self, x):
        if self.checkpointed:  # reentrant checkpoint needs an input that requires grad
            x = x.detach().requires_grad_()
        for blk in self.blocks:
            if self.checkpointed is None:
                x = x + blk(x)
            else:
                x = x + checkpoint(blk, x, use_reentrant=self.checkpointed)
        return x


class CheckpointedEncoder(nn.Module):
    """nn.TransformerEncoder layers, optionally each under torch.utils.checkpoint."""

    def __init__(self, layers: int = 2) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(
            [nn.TransformerEncoderLayer(16, 4, dim_feedforward=32, dropout=0.0, batch_first=True) for _ in range(layers)]
        )
        with torch.no_grad():
            for lyr in self.layers:
                lyr.self_attn.in_proj_weight.mul_(3.0)
        self.checkpointed: bool | None = None

    def forward(self, x):
        if self.checkpointed:
            x = x.detach().requires_grad_()
        for lyr in self.layers:
            x = lyr(x) if self.checkpointed is None else checkpoint(lyr, x, use_reentrant=self.checkpointed)
        return x


def _mha_reference_forward(mha: nn.MultiheadAttention):
    def forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        B, L, E = query.shape
        H = mha.num_heads
        q, k, v = F.linear(query, mha.in_proj_weight, mha.in_proj_bias).split(E, -1)
        q, k, v = (t.view(B, L, H, -1).transpose(1, 2) for t in (q, k, v))
        y = softcapped_attention64(q, k, v, None, q.shape[-1] ** -0.5, CAP)
        return mha.out_proj(y.transpose(1, 2).reshape(B, L, E)), None
    return forward


# --------------------------------------------------------------------------- cases
@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[], dict]
    loss: Callable[[object], torch.Tensor]
    reference64: Callable[[nn.Module], nn.Module]  # a float64 copy computing soft-capped attention itself
    checkpoint: Callable[[nn.Module, bool], None]  # switch gradient checkpointing on (use_reentrant)
    sites: int


def _lm_loss(out):
    logits = out.logits[:, :-1]
    return logits.square().mean()


def _hf_reference(model):
    ref = copy.deepcopy(model).double()
    ref.set_attn_implementation(_register_hf_reference())
    return ref


def _hf_checkpoint(model, reentrant):
    enable_checkpointing(model, reentrant)


def _mha_reference(model):
    ref = copy.deepcopy(model).double()
    for lyr in ref.layers:
        lyr.self_attn.forward = _mha_reference_forward(lyr.self_attn)
    return ref


def _protocol_reference(model):
    ref = copy.deepcopy(model).double()
    for blk in ref.blocks:
        blk.reference_cap = CAP
    return ref


def _set_checkpointed(model, reentrant):
    model.checkpointed = reentrant


def _x(seed: int = 1):
    return torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(seed))


CASES = [
    Case("hf-gpt2", lambda: gpt2().train(), lambda: {"input_ids": _ids(2, 9)}, _lm_loss, _hf_reference, _hf_checkpoint, 2),
    Case("hf-llama-gqa", lambda: llama().train(), lambda: {"input_ids": _ids(2, 9)}, _lm_loss, _hf_reference, _hf_checkpoint, 2),
    Case("multihead_attention", lambda: CheckpointedEncoder().train(), lambda: {"x": _x()},
         lambda out: out.square().mean(), _mha_reference, _set_checkpointed, 2),
    Case("protocol", lambda: ProtocolModel().train(), lambda: {"x": _x()},
         lambda out: out.square().mean(), _protocol_reference, _set_checkpointed, 2),
]


def _as64(inputs: dict) -> dict:
    return {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}


def _run(model, inputs):
    model.zero_grad(set_to_none=True)
    out = model(**inputs)
    loss = CASE_LOSS[id(model)](out)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, loss.detach(), grads


CASE_LOSS: dict[int, Callable] = {}


def _model(case: Case) -> nn.Module:
    model = case.build()
    CASE_LOSS[id(model)] = case.loss
    return model


def _output(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


class KeepOutputs(Tap):
    """A tap that keeps each call's output."""

    wants_chunks = False
    wants_output = True

    def __init__(self) -> None:
        self.outputs = []

    def on_output(self, call, out) -> None:
        self.outputs.append(out)


class KeepEverything(Tap):
    """A tap that keeps what it is shown: outputs, output gradients and chunks."""

    wants_output = True
    wants_grad_output = True

    def __init__(self) -> None:
        self.outputs, self.grads, self.chunk_logits = [], [], []

    def observe(self, chunk) -> None:
        self.chunk_logits.append(chunk.logits)
        _ = chunk.probs  # computed and cached on the chunk

    def on_output(self, call, out) -> None:
        self.outputs.append(out)

    def on_grad_output(self, call, grad) -> None:
        self.grads.append(grad)


# --------------------------------------------------------------------------- the contract
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_observing_a_training_step_changes_nothing_bit_for_bit(case):
    model, inputs = _model(case), case.inputs()
    out_plain, loss_plain, grads_plain = _run(model, inputs)
    stats, keep = StatsCollector(), KeepOutputs()
    with attach(model, taps=[stats, keep]):
        out_seam, loss_seam, grads_seam = _run(model, inputs)
    assert torch.equal(_output(out_seam), _output(out_plain))
    assert torch.equal(loss_seam, loss_plain)
    assert grads_seam.keys() == grads_plain.keys() and grads_plain
    for name in grads_plain:
        assert torch.equal(grads_seam[name], grads_plain[name]), name
    assert len(stats.layers) == case.sites and len(keep.outputs) == case.sites


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_gradient_tap_sees_the_gradient_of_each_attention_output(case):
    model, inputs = _model(case), case.inputs()
    out_plain, _, grads_plain = _run(model, inputs)
    keep = KeepEverything()
    with attach(model, taps=[keep]):
        out_seam, _, grads_seam = _run(model, inputs)
    assert len(keep.grads) == case.sites and len(keep.outputs) == case.sites
    for out, grad in zip(keep.outputs, reversed(keep.grads)):  # backward runs the last layer first
        assert grad.shape == out.shape and float(grad.abs().amax()) > 0
    torch.testing.assert_close(_output(out_seam), _output(out_plain), atol=1e-6, rtol=1e-6)
    for name, g in grads_plain.items():
        torch.testing.assert_close(grads_seam[name], g, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_soft_cap_through_the_seam_equals_a_float64_reference(case):
    model, inputs = _model(case), case.inputs()
    reference = case.reference64(model)
    CASE_LOSS[id(reference)] = case.loss
    out_ref, loss_ref, grads_ref = _run(reference, _as64(inputs))
    out_plain, _, _ = _run(model, inputs)
    with attach(model, score_mods=[soft_cap(CAP)]):
        out_cap, loss_cap, grads_cap = _run(model, inputs)
    got, want = _output(out_cap), _output(out_ref)
    # the cap really changes the model, and the seam computes exactly the capped model
    assert (_output(out_plain) - want.float()).abs().amax() > 1e-3
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(loss_cap.double(), loss_ref, atol=1e-6, rtol=1e-5)
    for name, g in grads_ref.items():
        torch.testing.assert_close(grads_cap[name].double(), g, atol=2e-5, rtol=1e-3, msg=name)


def _holds_history(t: torch.Tensor) -> bool:
    return t.requires_grad or t.grad_fn is not None


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_no_tap_or_accumulator_keeps_autograd_history(case):
    model, inputs = _model(case), case.inputs()
    stats, maps, keep = StatsCollector(), MapCapture(keep_logits=True), KeepEverything()
    with attach(model, taps=[stats, maps, keep], score_mods=[soft_cap(CAP)]):
        _run(model, inputs)
    kept = [*keep.outputs, *keep.grads, *keep.chunk_logits, *maps.maps.values(), *maps.logits.values()]
    for acc in stats.layers.values():
        kept += [*acc.sums.values(), acc.rows, acc.logit_max, acc.qk_absmax]
    assert kept and not any(_holds_history(t) for t in kept)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_gradient_checkpoint_recomputes_are_counted_once(case, reentrant):
    model, inputs = _model(case), case.inputs()
    plain = StatsCollector()
    with attach(model, taps=[plain], score_mods=[soft_cap(CAP)]):
        _, loss_plain, grads_plain = _run(model, inputs)
    case.checkpoint(model, reentrant)
    counted = StatsCollector()
    with attach(model, taps=[counted], score_mods=[soft_cap(CAP)]):
        _, loss_ckpt, grads_ckpt = _run(model, inputs)
    assert [h["rows"] for h in counted.heads()] == [h["rows"] for h in plain.heads()]
    assert all(h["rows"] > 0 for h in plain.heads())
    # the recompute applied the same modifier: gradients of the checkpointed model are the capped ones
    torch.testing.assert_close(loss_ckpt, loss_plain, atol=1e-6, rtol=0)
    for name, g in grads_plain.items():
        torch.testing.assert_close(grads_ckpt[name], g, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_nested_sessions_each_see_every_call_and_leave_in_any_order(case):
    model, inputs = _model(case), case.inputs()
    outer, inner = StatsCollector(), MapCapture()
    with torch.no_grad():
        with attach(model, taps=[outer]):
            with attach(model, taps=[inner]):
                model(**inputs)
            model(**inputs)  # the inner session has left: the outer one still sees this forward
    assert len(outer.layers) == case.sites and len(inner.maps) == case.sites
    rows = [h["rows"] for h in outer.heads()]
    first = StatsCollector()
    with torch.no_grad(), attach(model, taps=[first]):
        model(**inputs)
    assert rows == [2 * h["rows"] for h in first.heads()]
    # sessions that leave out of order (not nested): the model is restored only when both have left
    a, b = attach(model, taps=[StatsCollector()]), attach(model, taps=[MapCapture()])
    sa, sb = a.__enter__(), b.__enter__()
    a.__exit__(None, None, None)
    with torch.no_grad():
        model(**inputs)
    assert len(sb.taps[0].maps) == case.sites
    b.__exit__(None, None, None)
    if hasattr(model, "config"):
        assert model.config._attn_implementation == "eager"


def test_nested_session_modifiers_are_seen_by_the_outer_taps():
    model, ids = gpt2(), _ids(2, 9)
    outer = MapCapture()
    with torch.no_grad(), attach(model, taps=[outer]):
        with attach(model, score_mods=[soft_cap(CAP)]):
            model(ids)
    assert outer.maps[0].shape == (2, 4, 9, 9)
    capped = MapCapture(keep_logits=True)
    with torch.no_grad(), attach(model, taps=[capped], score_mods=[soft_cap(CAP)]):
        model(ids)
    assert torch.equal(outer.maps[0], capped.maps[0])
    assert float(capped.logits[0].nan_to_num(neginf=0).abs().amax()) <= CAP


def test_ddp_wrapped_model_attaches(tmp_path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    ddp = None
    try:
        model = gpt2().train()
        ddp = DDP(model)
        ids = _ids(2, 9)
        plain = ddp(ids).logits
        stats = StatsCollector()
        with attach(ddp, taps=[stats]):
            out = ddp(ids).logits
            out.square().mean().backward()
        assert torch.equal(out, plain)
        assert sorted(stats.layers) == [Site(0), Site(1)]
        stats.all_reduce()  # one process: the reduction leaves the sums as they are
        assert stats.heads()[0]["rows"] == 2 * 8
        assert model.config._attn_implementation == "eager"
    finally:
        # The wrapper goes first: a DDP Reducer collected after its process group is gone joins gloo's
        # loop thread while holding the GIL that thread waits for (a hang seen once in a clean-clone run).
        del ddp
        gc.collect()
        dist.destroy_process_group()


def test_compiled_model_attaches():
    model = gpt2(attn="sdpa")
    ids = _ids(2, 9)
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        plain = compiled(ids).logits
        stats = StatsCollector()
        with attach(compiled, taps=[stats]):
            out = compiled(ids).logits
    assert torch.equal(out, plain)
    assert sorted(stats.layers) == [Site(0), Site(1)] and stats.heads()[0]["rows"] == 2 * 8


def test_inactive_session_observes_nothing_and_every_n_forwards():
    model, ids = gpt2(), _ids(2, 9)
    stats = StatsCollector()
    with torch.no_grad(), attach(model, taps=[stats], every=3) as session:
        for _ in range(7):  # forwards 0, 3, 6 are observed
            model(ids)
        session.active = False
        model(ids)
    once = StatsCollector()
    with torch.no_grad(), attach(model, taps=[once]):
        model(ids)
    assert [h["rows"] for h in stats.heads()] == [3 * h["rows"] for h in once.heads()]


def test_session_state_stays_bounded_over_many_steps():
    model, ids = gpt2(), _ids(2, 9)
    stats = StatsCollector()
    with torch.no_grad(), attach(model, taps=[stats]) as session:
        for _ in range(20):
            model(ids)
    assert session.sites_seen == {Site(0), Site(1)} and session.forwards == 20
    assert len(stats.call_order) == 2 and len(stats.layers) == 2


def test_fsdp_sharded_model_attaches(tmp_path):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        model, ids = gpt2().train(), _ids(2, 9)
        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
        plain = model(ids).logits
        stats = StatsCollector()
        with attach(model, taps=[stats]):
            out = model(ids).logits
            out.square().mean().backward()
        assert torch.equal(out, plain)
        assert sorted(stats.layers) == [Site(0), Site(1)] and stats.heads()[0]["rows"] == 2 * 8
    finally:
        dist.destroy_process_group()


class KeepCalls(Tap):
    """A tap that asks for the live call and records each one's site and query."""

    wants_chunks = False
    wants_call = True

    def __init__(self) -> None:
        self.calls = []

    def on_call(self, call) -> None:
        self.calls.append((call.site, call.query))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_call_taps_see_every_live_call(case):
    model, inputs = _model(case), case.inputs()
    keep = KeepCalls()
    with attach(model, taps=[keep]):
        loss = case.loss(model(**inputs))
    assert sorted(site.layer for site, _ in keep.calls) == list(range(case.sites))
    # live: the queries are in the graph of the loss (validate's gradient section relies on it)
    grads = torch.autograd.grad(loss, [q for _, q in keep.calls], allow_unused=True)
    assert all(g is not None for g in grads)
