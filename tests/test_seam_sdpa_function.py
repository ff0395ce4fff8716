"""The SDPA-function adapter: models that call ``F.scaled_dot_product_attention`` join the seam unedited.

Every reference here is the test's own float64 maths from the q, k, v and mask the module computed
(read back from its own weights), never attnkit's kernels.
"""

from __future__ import annotations

import contextlib
import copy
import math
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from attnkit.errors import UserError
from attnkit.seam.mods import soft_cap
from attnkit.seam import MapCapture, NoAttentionError, Site, StatsCollector, Tap, attach
from attnkit.seam.adapters import sdpa_function
from byo_models import GQAAttention, build, build_mha, build_vit
from conftest import gpt2

CAP = 0.7


# --------------------------------------------------------------------------- float64 references
def attention64(q, k, v, allowed=None, bias=None, scale=None, cap=None):
    """(probabilities, output) of softmax(q k^T * scale [+ bias]) v over allowed keys, in float64."""
    q, k, v = q.double(), k.double(), v.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = q @ k.transpose(-1, -2) * scale
    if cap is not None:
        logits = cap * torch.tanh(logits / cap)
    if bias is not None:
        logits = logits + bias.double()
    if allowed is not None:
        logits = logits.masked_fill(~allowed, -math.inf)
    probs = torch.softmax(logits, -1)
    return probs, probs @ v


def nanogpt_qkv(attn, x):
    """q, k, v (B, nh, T, hs) that a nanoGPT CausalSelfAttention computes from its input x."""
    B, T, C = x.shape
    q, k, v = attn.c_attn(x).split(attn.n_embd, dim=2)
    return [t.view(B, T, attn.n_head, C // attn.n_head).transpose(1, 2) for t in (q, k, v)]


def vit_qkv(attn, x):
    B, N, C = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    return list(qkv.unbind(0))


def inputs_of(modules):
    """A forward pre-hook on each module that keeps its first input; returns (store, remove)."""
    store: dict[int, torch.Tensor] = {}
    handles = [m.register_forward_pre_hook(lambda mod, args, i=i: store.__setitem__(i, args[0].detach()))
               for i, m in enumerate(modules)]
    return store, lambda: [h.remove() for h in handles]


def causal(T):
    return torch.ones(T, T, dtype=torch.bool).tril()


def nanogpt(seed=0, **config):
    torch.manual_seed(seed)
    model = build({"n_layer": 2, "n_head": 4, "n_embd": 32, "block_size": 32, "vocab_size": 64, **config})
    with torch.no_grad():  # peaked attention, so that a wrong mask or scale shows
        for block in model.transformer.h:
            block.attn.c_attn.weight.mul_(20.0)
    return model


def ids(B=2, T=9, seed=1):
    return torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- what is found
def test_finds_the_attention_modules_and_leaves_other_adapters_their_own():
    model = nanogpt()
    assert sdpa_function.find(model) == [b.attn for b in model.transformer.h]
    vit = build_vit()
    assert sdpa_function.find(vit) == [b.attn for b in vit.blocks]
    assert sdpa_function.find(build_mha()) == []  # nn.MultiheadAttention: the MHA adapter's
    assert sdpa_function.find(gpt2("sdpa")) == []  # transformers: the HF adapter's


class Wrapper(nn.Module):
    """A parameter-less wrapper that calls SDPA (torchtitan's ScaledDotProductAttention)."""

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _helper_attention(q, k, v):  # a module-level helper, as research code writes it
    return F.scaled_dot_product_attention(q, k, v)


class WrappedAttention(nn.Module):
    def __init__(self, helper: bool = False):
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.sdpa = Wrapper()
        self.helper = helper

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, 2, 8).transpose(1, 2) for t in self.qkv(x).split(C, 2))
        y = _helper_attention(q, k, v) if self.helper else self.sdpa(q, k, v)
        return y.transpose(1, 2).reshape(B, T, C)


def test_a_parameterless_wrapper_stands_for_the_module_that_owns_the_projections():
    model = nn.Sequential(WrappedAttention(), WrappedAttention())
    assert sdpa_function.find(model) == [model[0], model[1]]
    capture = MapCapture()
    x = torch.randn(2, 5, 16)
    with torch.no_grad(), attach(model, taps=[capture]):
        model(x)
    assert sorted(capture.maps) == [Site(0), Site(1)]
    q, k, v = (t.view(2, 5, 2, 8).transpose(1, 2) for t in model[0].qkv(x).split(16, 2))
    want, _ = attention64(q, k, v, causal(5))
    torch.testing.assert_close(capture.maps[0].double(), want, atol=5e-6, rtol=0)


# A helper in another module of the user's code, called as ``ops.attention(q, k, v)``.
attention_ops = types.ModuleType("attention_ops")
exec("import torch.nn.functional as F\n"
     "def attention(q, k, v):\n"
     "    return F.scaled_dot_product_attention(q, k, v, is_causal=True)\n", attention_ops.__dict__)


class OpsAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x):
        q, k, v = self.qkv(x).unsqueeze(1).split(8, -1)
        return attention_ops.attention(q, k, v)


def test_an_sdpa_call_in_another_user_module_s_function_is_found():
    m = OpsAttention()
    assert sdpa_function.find(m) == [m]
    x = torch.randn(2, 5, 8)
    capture = MapCapture()
    with torch.no_grad(), attach(m, taps=[capture]):
        m(x)
    with torch.no_grad():
        q, k, v = m.qkv(x).unsqueeze(1).split(8, -1)
    torch.testing.assert_close(capture.maps[0].double(), attention64(q, k, v, causal(5))[0], atol=5e-6, rtol=0)


def test_an_sdpa_call_in_a_module_level_helper_is_found():
    model = nn.Sequential(WrappedAttention(helper=True))
    assert sdpa_function.find(model) == [model[0]]
    capture = MapCapture()
    x = torch.randn(1, 4, 16)
    with torch.no_grad(), attach(model, taps=[capture]):
        model(x)
    q, k, v = (t.view(1, 4, 2, 8).transpose(1, 2) for t in model[0].qkv(x).split(16, 2))
    torch.testing.assert_close(capture.maps[0].double(), attention64(q, k, v)[0], atol=5e-6, rtol=0)


# --------------------------------------------------------------------------- probabilities
def test_nanogpt_probabilities_equal_a_float64_reference():
    model, x = nanogpt().eval(), ids()
    attns = [b.attn for b in model.transformer.h]
    store, remove = inputs_of(attns)
    capture = MapCapture()
    with torch.no_grad(), attach(model, taps=[capture]):
        model(x)
    remove()
    assert sorted(capture.maps) == [Site(0), Site(1)]
    for i, attn in enumerate(attns):
        with torch.no_grad():
            q, k, v = nanogpt_qkv(attn, store[i])
        want, _ = attention64(q, k, v, causal(9))
        got = capture.maps[i].double()
        assert float(want.amax(-1).mean()) > 0.6  # peaked: a wrong mask would show
        torch.testing.assert_close(got, want, atol=5e-6, rtol=0)


def test_vit_probabilities_equal_a_float64_reference_without_a_mask():
    torch.manual_seed(0)
    vit = build_vit().eval()
    with torch.no_grad():
        for b in vit.blocks:
            b.attn.qkv.weight.mul_(10.0)
    attns = [b.attn for b in vit.blocks]
    store, remove = inputs_of(attns)
    capture = MapCapture()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad(), attach(vit, taps=[capture]):
        vit(images)
    remove()
    for i, attn in enumerate(attns):
        with torch.no_grad():
            q, k, v = vit_qkv(attn, store[i])
        want, _ = attention64(q, k, v)
        assert capture.maps[i].shape == (2, 4, 17, 17)
        torch.testing.assert_close(capture.maps[i].double(), want, atol=5e-6, rtol=0)


def _gqa_qkv(m, x):
    B, T, _ = x.shape
    q = m.wq(x).view(B, T, m.heads, m.head_dim).transpose(1, 2)
    k = m.wk(x).view(B, T, m.kv_heads, m.head_dim).transpose(1, 2).repeat_interleave(m.heads // m.kv_heads, 1)
    v = m.wv(x).view(B, T, m.kv_heads, m.head_dim).transpose(1, 2).repeat_interleave(m.heads // m.kv_heads, 1)
    return q, k, v


@pytest.mark.parametrize("mask_kind", ["none", "causal", "bool", "additive"])
def test_gqa_custom_scale_and_masks_equal_a_float64_reference(mask_kind):
    torch.manual_seed(0)
    m = GQAAttention(scale=0.9).eval()  # 0.9, not 1/sqrt(8): a scale ignored would show
    x = torch.randn(2, 6, 32)
    allowed, bias, mask, is_causal = None, None, None, False
    if mask_kind == "causal":
        allowed, is_causal = causal(6), True
    elif mask_kind == "bool":  # a padding mask: the last two keys of the second sequence hidden
        allowed = torch.ones(2, 1, 6, 6, dtype=torch.bool)
        allowed[1, :, :, 4:] = False
        mask = allowed
    elif mask_kind == "additive":  # ALiBi-like slopes plus -inf where hidden
        distance = (torch.arange(6)[:, None] - torch.arange(6)[None, :]).abs().float()
        bias = (-0.5 * distance).expand(1, 4, 6, 6).clone()
        allowed = causal(6)
        mask = bias.masked_fill(~allowed, -math.inf)
    plain = m(x, mask, is_causal)
    capture = MapCapture()
    with torch.no_grad(), attach(m, taps=[capture]):
        out = m(x, mask, is_causal)
    assert torch.equal(out, plain)
    with torch.no_grad():
        q, k, v = _gqa_qkv(m, x)
    want, _ = attention64(q, k, v, allowed, bias, scale=0.9)
    torch.testing.assert_close(capture.maps[0].double(), want, atol=5e-6, rtol=0)


class CrossAttention(nn.Module):
    """Fewer queries than keys with is_causal=True: SDPA's mask is the top-left triangle."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(8, 8)

    def forward(self, x, memory):
        q = self.q(x).view(1, 1, x.shape[1], 8)
        kv = memory.view(1, 1, memory.shape[1], 8)
        return F.scaled_dot_product_attention(q, kv, kv, is_causal=True)


def test_is_causal_with_fewer_queries_than_keys_is_sdpa_s_top_left_triangle():
    m = CrossAttention()
    x, memory = torch.randn(1, 3, 8), torch.randn(1, 5, 8)
    capture = MapCapture()
    with torch.no_grad(), attach(m, taps=[capture], score_mods=[soft_cap(100.0)]):  # forces attnkit's kernel
        out = m(x, memory)
    with torch.no_grad():
        q = m.q(x).view(1, 1, 3, 8)
    kv = memory.view(1, 1, 5, 8)
    top_left = torch.ones(3, 5, dtype=torch.bool).tril()
    want_probs, want_out = attention64(q, kv, kv, top_left, cap=100.0)
    torch.testing.assert_close(capture.maps[0].double(), want_probs, atol=5e-6, rtol=0)
    torch.testing.assert_close(out.double(), want_out, atol=1e-5, rtol=1e-5)


class FoldedHeads(nn.Module):
    """(B*H, T, D) inputs: heads folded into the batch, as older code writes it."""

    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x):
        q, k, v = self.qkv(x).split(8, -1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_three_dimensional_inputs_are_one_head_per_batch_row():
    m = FoldedHeads()
    x = torch.randn(3, 5, 8)
    plain = m(x)
    capture = MapCapture()
    with torch.no_grad(), attach(m, taps=[capture]):
        out = m(x)
    assert torch.equal(out, plain) and capture.maps[0].shape == (3, 1, 5, 5)
    with torch.no_grad():
        q, k, v = m.qkv(x).split(8, -1)
    torch.testing.assert_close(capture.maps[0][:, 0].double(), attention64(q, k, v, causal(5))[0], atol=5e-6, rtol=0)


# --------------------------------------------------------------------------- training
class KeepOutputs(Tap):
    wants_chunks = False
    wants_output = True
    wants_grad_output = True

    def __init__(self):
        self.outputs, self.grads = [], []

    def on_output(self, call, out):
        self.outputs.append(out)

    def on_grad_output(self, call, grad):
        self.grads.append(grad)


def _step(model, x, seed=0):
    """A training step's logits, loss and gradients (dropout drawn from a fixed seed)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    logits, _ = model(x, x)  # with targets nanoGPT returns every position's logits
    loss = logits[:, :-1].square().mean()
    loss.backward()
    return logits.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["no-dropout", "dropout"])
def test_observing_a_training_step_changes_nothing_bit_for_bit(dropout):
    model, x = nanogpt(dropout=dropout).train(), ids()
    logits_plain, loss_plain, grads_plain = _step(model, x)
    stats, keep = StatsCollector(), KeepOutputs()
    with attach(model, taps=[stats, keep]):
        logits_seam, loss_seam, grads_seam = _step(model, x)
    assert torch.equal(logits_seam, logits_plain) and torch.equal(loss_seam, loss_plain)
    assert grads_seam.keys() == grads_plain.keys()
    for name in grads_plain:
        assert torch.equal(grads_seam[name], grads_plain[name]), name
    assert sorted(stats.layers) == [Site(0), Site(1)] and len(keep.outputs) == 2 and len(keep.grads) == 2
    assert not any(t.requires_grad or t.grad_fn is not None for t in keep.outputs + keep.grads)


def test_vit_training_step_is_bit_for_bit_with_taps_attached():
    torch.manual_seed(0)
    vit = build_vit().train()
    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))

    def step():
        vit.zero_grad(set_to_none=True)
        out = vit(images)
        out.square().mean().backward()
        return out.detach(), {n: p.grad.clone() for n, p in vit.named_parameters()}

    out_plain, grads_plain = step()
    stats = StatsCollector()
    with attach(vit, taps=[stats]):
        out_seam, grads_seam = step()
    assert torch.equal(out_seam, out_plain) and sorted(stats.layers) == [Site(0), Site(1)]
    assert all(torch.equal(grads_seam[n], g) for n, g in grads_plain.items())


def _softcapped_reference_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                               enable_gqa=False):
    assert attn_mask is None and dropout_p == 0.0
    allowed = causal(query.shape[-2]) if is_causal else None
    return attention64(query, key, value, allowed, scale=scale, cap=CAP)[1]


def test_soft_cap_equals_a_float64_reference_in_outputs_loss_and_gradients(monkeypatch):
    model, x = nanogpt().train(), ids()
    reference = copy.deepcopy(model).double()
    with monkeypatch.context() as patch:  # the reference model computes soft-capped attention itself
        patch.setattr(F, "scaled_dot_product_attention", _softcapped_reference_sdpa)
        logits_ref, loss_ref, grads_ref = _step(reference, x)
    logits_plain, _, _ = _step(model, x)
    with attach(model, score_mods=[soft_cap(CAP)]):
        logits_cap, loss_cap, grads_cap = _step(model, x)
    assert (logits_plain.double() - logits_ref).abs().amax() > 1e-3  # the cap changes the model
    torch.testing.assert_close(logits_cap.double(), logits_ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(loss_cap.double(), loss_ref, atol=1e-6, rtol=1e-5)
    for name, g in grads_ref.items():
        torch.testing.assert_close(grads_cap[name].double(), g, atol=2e-5, rtol=1e-3, msg=name)


class CheckpointedGPT(nn.Module):
    """nanoGPT with each block under torch.utils.checkpoint (as training scripts add it)."""

    def __init__(self, gpt, reentrant):
        super().__init__()
        self.gpt, self.reentrant = gpt, reentrant

    def forward(self, idx, targets=None):
        t = self.gpt.transformer
        x = t.wte(idx) + t.wpe(torch.arange(idx.shape[1]))
        for block in t.h:
            x = checkpoint(block, x, use_reentrant=self.reentrant)
        return self.gpt.lm_head(t.ln_f(x)), None


@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
def test_checkpoint_recomputes_get_the_modifier_and_are_counted_once(reentrant):
    model, x = nanogpt().train(), ids()
    plain = StatsCollector()
    with attach(model, taps=[plain], score_mods=[soft_cap(CAP)]):
        _, loss_plain, grads_plain = _step(model, x)
    wrapped = CheckpointedGPT(model, reentrant)
    counted = StatsCollector()
    with attach(wrapped, taps=[counted], score_mods=[soft_cap(CAP)]):
        _, loss_ckpt, grads_ckpt = _step(wrapped, x)
    assert [h["rows"] for h in counted.heads()] == [h["rows"] for h in plain.heads()]
    torch.testing.assert_close(loss_ckpt, loss_plain, atol=5e-6, rtol=0)
    for name, g in grads_plain.items():
        torch.testing.assert_close(grads_ckpt["gpt." + name], g, atol=1e-6, rtol=1e-5, msg=name)


def test_nested_sessions_each_see_every_call_and_restore_in_any_order():
    model, x = nanogpt().eval(), ids()
    outer, inner = StatsCollector(), MapCapture()
    with torch.no_grad():
        with attach(model, taps=[outer]):
            with attach(model, taps=[inner]):
                model(x)
            assert all(b.attn.__dict__["forward"].__wrapped__ is not None for b in model.transformer.h)
            model(x)
    assert len(inner.maps) == 2
    assert [h["rows"] for h in outer.heads()] == [2 * 2 * 8] * 8  # two forwards, 2 x 8 rows that see 2+ keys
    a, b = attach(model, taps=[StatsCollector()]), attach(model, taps=[MapCapture()])
    a.__enter__()
    sb = b.__enter__()
    a.__exit__(None, None, None)
    with torch.no_grad():
        model(x)
    assert len(sb.taps[0].maps) == 2
    b.__exit__(None, None, None)
    assert all("forward" not in b.attn.__dict__ for b in model.transformer.h)  # the class forward again
    assert not model._forward_hooks and not model._forward_pre_hooks


# --------------------------------------------------------------------------- no double counting
class MixedModel(nn.Module):
    """A user module with an nn.MultiheadAttention child and its own SDPA call, beside a GPT-2."""

    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)
        self.qkv = nn.Linear(16, 48)

    def forward(self, x):
        h = self.mha(x, x, x, need_weights=False)[0]
        B, T, C = h.shape
        q, k, v = (t.view(B, T, 2, 8).transpose(1, 2) for t in self.qkv(h).split(C, 2))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, C)


def test_calls_routed_by_another_adapter_are_not_counted_twice():
    model = MixedModel().eval()
    x = torch.randn(2, 5, 16)
    plain = model(x)
    stats = StatsCollector()
    with torch.no_grad(), attach(model, taps=[stats]):
        out = model(x)
    assert torch.equal(out, plain)
    assert len(stats.layers) == 2  # one call of the MHA adapter, one of this one: not three
    # transformers' own SDPA path calls F.sdpa from inside its attention function: the HF
    # adapter's call, not a second one
    hf = gpt2("sdpa")
    hf_stats = StatsCollector()
    with torch.no_grad(), attach(hf, taps=[hf_stats]):
        hf(torch.randint(3, 64, (1, 6)))
    assert sorted(hf_stats.layers) == [Site(0), Site(1)]


# --------------------------------------------------------------------------- hand-written attention
def test_nanogpt_hand_written_path_is_named_with_the_one_line_change():
    model = nanogpt(flash=False).eval()
    with pytest.raises(NoAttentionError) as info:
        with torch.no_grad(), attach(model, taps=[StatsCollector()]):
            model(ids())
    message = str(info.value)
    assert isinstance(info.value, UserError)
    assert "transformer.h.0.attn (CausalSelfAttention" in message and "and 1 more" in message
    assert "att = F.softmax(att, dim=-1)" in message  # the model's own line
    assert "F.scaled_dot_product_attention(q, k, v, is_causal=True)" in message
    assert "`flash = True`" in message
    assert not any("forward" in b.attn.__dict__ for b in model.transformer.h)  # the model is left as found
    assert not torch.overrides._get_current_function_mode_stack()


def test_timm_s_unfused_path_is_named_with_its_own_switch():
    vit = build_vit().eval()
    for block in vit.blocks:
        block.attn.fused_attn = False
    with pytest.raises(NoAttentionError) as info:
        with torch.no_grad(), attach(vit, taps=[StatsCollector()]):
            vit(torch.randn(1, 3, 16, 16))
    message = str(info.value)
    assert "blocks.0.attn (Attention" in message and "attn = attn.softmax(dim=-1)" in message
    assert "`fused_attn = True`" in message


class HandWrittenOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x):
        q, k, v = self.qkv(x).split(8, -1)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
        return weights @ v


def test_a_model_with_only_hand_written_attention_is_refused_at_attach():
    model = nn.Sequential(HandWrittenOnly(), HandWrittenOnly())
    with pytest.raises(NoAttentionError) as info:
        with attach(model, taps=[MapCapture()]):
            pass
    message = str(info.value)
    assert "has no attention attnkit can reach" in message
    assert "0 (HandWrittenOnly" in message and "weights = torch.softmax(" in message
    assert "F.scaled_dot_product_attention(q, k, v, is_causal=True)" in message


class PartlyHandWritten(nn.Module):
    def __init__(self):
        super().__init__()
        self.reached = WrappedAttention()
        self.flash_off = nanogpt(flash=False).transformer.h[0].attn

    def forward(self, x):
        return self.reached(x) + self.flash_off(torch.cat([x, x], -1))[..., :16]


def test_a_model_partly_hand_written_warns_and_observes_the_rest():
    model = PartlyHandWritten().eval()
    stats = StatsCollector()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad(), attach(model, taps=[stats]):
        warnings.simplefilter("always")
        model(torch.randn(1, 4, 16))
    assert [str(w.message) for w in caught if "flash_off" in str(w.message)]
    assert sorted(stats.layers) == [Site(0)]


# --------------------------------------------------------------------------- restore
def test_the_model_is_left_as_found_also_when_its_forward_raises():
    model = nanogpt().eval()
    with pytest.raises(AssertionError):
        with attach(model, taps=[StatsCollector()]):
            model(torch.randint(0, 64, (1, 40)))  # past block_size: nanoGPT's own assert
    assert not torch.overrides._get_current_function_mode_stack()
    attn = model.transformer.h[0].attn
    boom = attn.c_proj.register_forward_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        with torch.no_grad(), attach(model, taps=[StatsCollector()]):
            model(ids())
    boom.remove()
    assert not torch.overrides._get_current_function_mode_stack()  # popped by the always-called hook
    assert "forward" not in attn.__dict__ and not model._forward_hooks and not model._forward_pre_hooks
    with torch.no_grad():
        torch.testing.assert_close(model(ids())[0], nanogpt().eval()(ids())[0], atol=0, rtol=0)  # as before


def test_compiled_model_attaches():
    model, x = nanogpt().eval(), ids()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        plain = compiled(x)[0]
        stats = StatsCollector()
        with attach(compiled, taps=[stats]):
            out = compiled(x)[0]
    assert torch.equal(out, plain)
    assert sorted(stats.layers) == [Site(0), Site(1)] and stats.heads()[0]["rows"] == 2 * 8


# --------------------------------------------------------------------------- features on such models
def test_the_training_monitor_observes_nanogpt_and_changes_nothing(tmp_path):
    from attnkit.monitor.monitor import AttentionMonitor

    def train(monitored: bool):
        model = nanogpt().train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        monitor = AttentionMonitor(model, every=1, log_dir=tmp_path / "run", optimizer=optimizer) if monitored else None
        with monitor if monitor is not None else contextlib.nullcontext():
            for step in range(3):
                x = ids(seed=step)
                _, loss = model(x, x)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                if monitor is not None:
                    assert monitor.on_step(step, loss=loss) is not None
        return model, monitor

    plain, _ = train(False)
    watched, monitor = train(True)
    assert sorted(monitor.modules()) == [Site(0), Site(1)]
    assert 0.0 < monitor.last_value("normalized_entropy", Site(0), 0) <= 1.0
    for (name, p), q in zip(plain.named_parameters(), watched.parameters()):
        assert torch.equal(p, q), name  # three monitored steps train exactly as unmonitored ones
