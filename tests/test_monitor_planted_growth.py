"""A head whose W_q grows every step: the monitor warns about that head while its logits are still
far below 1e4, an unwatched run passes 1e4, and the default policy keeps it below.

The head's logits are measured independently of the monitor and the seam: the layer's input hidden
states are caught by a forward pre-hook on the attention module, and q·k/√d is computed from the
module's own c_attn weights in float64 (causal pairs only), the way GPT-2's eager attention does.
Two numbers per step: the largest logit (signed, what the monitor's ``logit_max`` records) and the
largest magnitude (what overflows a float16, and what logit growth and QK-clip's S follow).

Two categories of head: one whose largest logit is positive (the usual case: its logits grow up
towards softmax saturation), and one whose logits on this text are all negative, so its largest
logit falls while their magnitude grows. Both must be warned about early and held by the policy.
"""

from __future__ import annotations

import math

import pytest
import torch

import attnkit
from attnkit.monitor import AttentionMonitor, Policy
from attnkit.monitor.detectors import logit_magnitude
from attnkit.seam.layouts import qk_layout

GROWTH = 1.5  # W_q of the planted head × this after every step
STEPS = 24  # 1.5^24 ≈ 1.7e4: enough for a head starting near 1–2 to pass 1e4
DANGER = 1e4
TEXT = "In the beginning God created the heaven and the earth. " * 4


def head_logits(attn: torch.nn.Module, hidden: torch.Tensor, head: int) -> tuple[float, float]:
    """(largest, largest magnitude) over causal (query, key) pairs of head ``head``'s q·k/√d,
    from GPT-2's c_attn in float64."""
    H, d, E = attn.num_heads, attn.head_dim, attn.embed_dim
    w, b = attn.c_attn.weight.double(), attn.c_attn.bias.double()  # Conv1D: (E, 3E), columns [q | k | v]
    x = hidden.double()  # (B, T, E)
    q = x @ w[:, head * d:(head + 1) * d] + b[head * d:(head + 1) * d]  # (B, T, d)
    k = x @ w[:, E + head * d:E + (head + 1) * d] + b[E + head * d:E + (head + 1) * d]  # (B, T, d)
    logits = q @ k.transpose(1, 2) / math.sqrt(d)  # (B, T, T)
    T = logits.shape[-1]
    causal = logits[:, torch.ones(T, T, dtype=torch.bool).tril()]  # (B, T·(T+1)/2)
    return causal.amax().item(), causal.abs().amax().item()


def planted_run(layer: int, head: int, policy, tmp_path):
    """Step the reference model STEPS times, W_q of (layer, head) growing. Returns the head's
    measured (largest, largest magnitude) logit at every step, every new warning the monitor raised
    (with its step) and the monitor's own (``logit_max``, largest |logit|) history of that head."""
    model, tokenizer = attnkit.load_model("reference")
    model.eval()
    attn = model.transformer.h[layer].attn
    batch = tokenizer(TEXT, return_tensors="pt")["input_ids"][:, :32]  # (1, 32)
    caught = {}
    hook = attn.register_forward_pre_hook(lambda _m, args, kwargs: caught.update(x=args[0] if args else kwargs["hidden_states"]),
                                          with_kwargs=True)
    measured, warnings = [], []
    try:
        with AttentionMonitor(model, every=1, log_dir=tmp_path / ("policy" if policy else "plain"), emit=(),
                              policy=policy) as monitor:
            for step in range(STEPS):
                with torch.no_grad():
                    loss = model(input_ids=batch, labels=batch).loss
                    measured.append(head_logits(attn, caught["x"], head))
                diagnosis = monitor.on_step(step, loss=loss)
                warnings += diagnosis.new
                qk_layout(attn).scale_query(head, GROWTH)  # the planted growth, after the step as an optimizer would
            column = monitor.series.index(next(k for k in monitor.series if k[0].layer == layer and k[1] == head))
            recorded = {m: r.last()[1] for m, r in monitor.rings.items()}
            monitor_history = (recorded["logit_max"][:, column].tolist(),
                               logit_magnitude(recorded)[:, column].tolist())
    finally:
        hook.remove()
    return measured, warnings, monitor_history


def check_planted_growth(layer: int, head: int, tmp_path) -> None:
    measured, warnings, monitor_history = planted_run(layer, head, None, tmp_path)
    largest = [m for m, _ in measured]
    magnitude = [a for _, a in measured]
    # the monitor sees what the weights give, both the signed largest logit and the largest magnitude
    assert monitor_history[0] == pytest.approx(largest, rel=1e-3)
    assert monitor_history[1] == pytest.approx(magnitude, rel=1e-3)
    first_danger = next((s for s, v in enumerate(magnitude) if v > DANGER), None)
    assert first_danger is not None, f"unwatched run never passed {DANGER:g}: max |logit| {max(magnitude):.3g}"

    growth = [w for w in warnings if w.type == "logit_growth"]
    assert growth, f"no logit_growth warning: {[(w.type, w.where, w.step) for w in warnings]}"
    first = growth[0]
    # every growth warning names the planted head, and only it
    assert {(w.site.layer, w.head) for w in growth} == {(layer, head)}
    assert first.step < first_danger
    assert magnitude[first.step] < DANGER / 10  # warned while its logits were still an order of magnitude below

    protected, _, _ = planted_run(layer, head, Policy(), tmp_path)
    assert max(a for _, a in protected) < DANGER, \
        f"default policy let |logit| reach {max(a for _, a in protected):.3g}"
    # the same growth was planted: the two runs agree until the policy acts
    agree = [x for pair in protected[:first.step + 1] for x in pair]  # (largest, largest |.|) per step
    assert agree == pytest.approx([x for pair in measured[:first.step + 1] for x in pair], rel=1e-5)


@pytest.mark.parametrize("layer, head", [(0, 1), (3, 2)])
def test_growing_positive_logits_warned_early_and_held_by_default_policy(layer, head, tmp_path):
    check_planted_growth(layer, head, tmp_path)


def test_growing_negative_logits_warned_early_and_held_by_default_policy(tmp_path):
    # layer 1 head 2: every causal logit on TEXT is negative (largest -1.4, smallest -9.5)
    check_planted_growth(1, 2, tmp_path)
