"""[8/9] Gradient flow: a real backward pass, and the attention parameters found through the seam.

Which parameters are "attention parameters" is asked of the seam, never read from module names:

1. One forward with an observer on the seam that keeps each layer's query, key and value (the
   tensors of the attention call, still in the autograd graph).
2. For each layer l, a vector-Jacobian product with random directions gives every parameter
   element that feeds q_l or k_l, and another every element that feeds v_l. Elements that feed
   q_l/k_l but not v_l are layer l's query/key parameters (in GPT-2's fused c_attn: the query
   and key columns; upstream parameters feed q, k and v alike and drop out).
3. The loss (mean next-token NLL for a language model; for an encoder, the mean square of the
   final hidden states, a plain scalar of the outputs) is differentiated once with learned
   attention: the report gives the gradient norm of each group's query/key elements.
4. The same with attention replaced by uniform through the seam: these elements must then get
   exactly zero gradient, confirming they act only through the attention weights.

The model is left exactly as found: gradients come from ``torch.autograd.grad`` (no ``.grad``
is written), ``requires_grad`` flags are switched on only for the pass and restored, and so is
training mode (the pass runs in eval mode, no dropout).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from attnkit.seam.mods import PATTERNS
from attnkit.seam import AttentionCall, AttentionSession, Tap, attach
from attnkit.validate.context import Context
from attnkit.validate.types import CRITICAL, INFO, OK, WARN, Section

ZERO = 1e-12
GRAD_SEQUENCES = 1
NEGLIGIBLE = 1e-6  # a gradient norm below this fraction of the whole model's counts as none


class _QKV(Tap):
    """Keeps each site's live query, key and value (still in the autograd graph, on purpose)."""

    wants_chunks = False
    wants_call = True

    def __init__(self) -> None:
        self.calls: dict = {}

    def on_call(self, call: AttentionCall) -> None:
        self.calls.setdefault(call.site, (call.query, call.key, call.value))


def _loss(model, ids: torch.Tensor, causal_lm: bool) -> torch.Tensor:
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    if causal_lm and getattr(out, "logits", None) is not None:
        logits = out.logits[:, :-1].float()
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        hidden = out[0]
    return hidden.float().square().mean()


def _grads(loss, params, **kw):
    return torch.autograd.grad(loss, params, allow_unused=True, **kw)


def gradients(ctx: Context) -> Section:
    sec = Section("gradients", "Gradient Flow Check")
    model = ctx.model
    named = [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]
    names, params = [n for n, _ in named], [p for _, p in named]
    flags = [p.requires_grad for p in params]
    was_training = model.training
    device = params[0].device if params else torch.device("cpu")
    ids = ctx.captured.input_ids[:GRAD_SEQUENCES].to(device)
    g = torch.Generator(device="cpu").manual_seed(ctx.options.seed)
    groups: list[dict] = []
    total_norm = 0.0
    try:
        for p in params:
            p.requires_grad_(True)
        model.eval()
        with torch.enable_grad():
            qkv = _QKV()
            with attach(model, AttentionSession(taps=[qkv])):
                loss = _loss(model, ids, ctx.causal_lm)
            g_learned = _grads(loss, params, retain_graph=True)
            masks: list[torch.Tensor | None] = [None] * len(params)
            layer_of: list[int | None] = [None] * len(params)
            for layer in sorted(qkv.calls):
                q, k, v = qkv.calls[layer]
                rq = torch.randn(q.shape, generator=g).to(q)
                rk = torch.randn(k.shape, generator=g).to(k)
                rv = torch.randn(v.shape, generator=g).to(v)
                s_qk = _grads([q, k], params, grad_outputs=[rq, rk], retain_graph=True)
                s_v = _grads([v], params, grad_outputs=[rv], retain_graph=True)
                for idx, (a, b) in enumerate(zip(s_qk, s_v)):
                    if a is None:
                        continue
                    feeds = a != 0
                    m = feeds if b is None else feeds & (b == 0)
                    # Query/key parameters are all-or-nothing: a projection's elements all feed q/k only.
                    # An element whose value-side product merely rounded to zero is isolated: drop it.
                    if m.any() and m.sum() * 2 >= feeds.sum():
                        masks[idx] = m if masks[idx] is None else masks[idx] | m
                        layer_of[idx] = layer.layer if layer_of[idx] is None else layer_of[idx]
                del s_qk, s_v
            del loss, qkv
            with attach(model, **PATTERNS["uniform"]):
                loss_u = _loss(model, ids, ctx.causal_lm)
            g_uniform = _grads(loss_u, params)
            del loss_u
        total_norm = math.sqrt(sum(float(x.double().square().sum()) for x in g_learned if x is not None))
        for idx, m in enumerate(masks):
            if m is None:
                continue
            gl = g_learned[idx]
            gu = g_uniform[idx]
            norm_l = float(gl[m].double().norm()) if gl is not None else 0.0
            norm_u = float(gu[m].double().norm()) if gu is not None else 0.0
            groups.append({"name": names[idx], "layer": layer_of[idx], "elements": int(m.sum()),
                           "of": params[idx].numel(), "grad_norm": norm_l, "grad_norm_uniform": norm_u})
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        model.train(was_training)

    frozen = sum(1 for grp in groups if not flags[names.index(grp["name"])])
    total = sum(grp["elements"] for grp in groups)
    sec.figures.update(groups=groups, parameters=total, frozen_groups=frozen,
                       method="elements that feed a layer's query/key but not its value (autograd through the seam)")
    if not groups:
        sec.add("found", CRITICAL, "No attention (query/key) parameters found: nothing in the model shapes the attention weights",
                groups=0, parameters=0)
        return sec
    sec.notes.append(f"Found {len(groups)} attention parameter groups ({total:,} params total): "
                     "elements that feed a layer's queries/keys but not its values")
    per_layer: dict[int, list[dict]] = {}
    for grp in groups:
        per_layer.setdefault(grp["layer"], []).append(grp)
    for layer, grps in sorted(per_layer.items()):
        norm = math.sqrt(sum(x["grad_norm"] ** 2 for x in grps))
        names_l = ", ".join(x["name"] for x in grps[:4]) + (" …" if len(grps) > 4 else "")
        sec.notes.append(f"  L{layer}: {len(grps)} groups, {sum(x['elements'] for x in grps):,} params, "
                         f"‖grad‖={norm:.3e} ({names_l})")
    sec.add("found", OK, "Attention parameters found", groups=len(groups), parameters=total)
    if frozen:
        sec.add("frozen", INFO, f"{frozen} attention parameter groups are frozen (requires_grad=False); "
                "gradients were computed as if they were not")
    floor = NEGLIGIBLE * total_norm
    layers: dict[int, float] = {}
    for grp in groups:
        layers[grp["layer"]] = math.hypot(layers.get(grp["layer"], 0.0), grp["grad_norm"])
    sec.figures.update(total_grad_norm=total_norm, layer_grad_norm=layers)
    bad = [grp for grp in groups if not math.isfinite(grp["grad_norm"])]
    dead = [layer for layer, n in layers.items() if math.isfinite(n) and n <= floor]
    if bad:
        sec.add("gradient", CRITICAL, f"{len(bad)} attention parameter groups get NaN/Inf gradients "
                f"(first: {bad[0]['name']})", nonfinite_groups=len(bad))
    elif len(dead) == len(layers):
        sec.add("gradient", CRITICAL, f"No layer's attention parameters receive gradient (‖grad‖ ≤ {NEGLIGIBLE:g} × the "
                f"model's {total_norm:.2e}): the attention weights cannot learn", dead_layers=dead)
    elif dead:
        sec.add("gradient", WARN, f"The attention parameters of layers {dead} receive no gradient "
                f"(‖grad‖ ≤ {NEGLIGIBLE:g} × the model's {total_norm:.2e})", dead_layers=dead)
    else:
        finite = sorted(layers.values())
        sec.add("gradient", OK, f"Gradients flow to the attention parameters of all {len(layers)} layers "
                f"(‖grad‖ per layer min {finite[0]:.2e}, max {finite[-1]:.2e}; whole model {total_norm:.2e})",
                dead_layers=[], min_layer_norm=finite[0], max_layer_norm=finite[-1])
    quiet = [grp for grp in groups if math.isfinite(grp["grad_norm"]) and grp["grad_norm"] <= floor
             and grp["layer"] not in dead]
    if quiet:
        sec.notes.append(f"{len(quiet)} groups in otherwise healthy layers get (almost) no gradient, e.g. "
                         f"{quiet[0]['name']}: expected for a key bias, which softmax ignores (a shift common to a row)")
    leak = max(grp["grad_norm_uniform"] for grp in groups)
    if leak == 0.0:
        sec.add("uniform_check", INFO, "With attention replaced by uniform their gradient is exactly 0: "
                "they act only through the attention weights", max_norm_uniform=leak)
    else:
        sec.add("uniform_check", WARN, f"With attention replaced by uniform they still get gradient ({leak:.2e}): "
                "some also act outside the attention weights", max_norm_uniform=leak)
    return sec
