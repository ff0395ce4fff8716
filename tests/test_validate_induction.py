"""Section 3's copying (induction) check on planted attention: it names the head that attends to
the token after an earlier occurrence of the current one, and no other."""

from __future__ import annotations

import torch

from attnkit.validate.capture import Captured, LayerView
from attnkit.validate.context import Context
from attnkit.validate.tokens import tokens


def planted(ids: torch.Tensor, induction_at: tuple[int, int], duplicate_at: tuple[int, int]) -> Captured:
    """Two layers of 3 causal heads: uniform, except one exact induction head and one duplicate-token head."""
    B, T = ids.shape
    causal = torch.ones(T, T).tril().bool()
    allowed = causal.expand(B, 3, T, T).clone()
    layers = []
    for layer in range(2):
        p = allowed.float() / allowed.sum(-1, keepdim=True)
        for b in range(B):
            for i in range(T):
                earlier = [j for j in range(i) if ids[b, j] == ids[b, i]]
                if not earlier:
                    continue
                if layer == induction_at[0] and earlier[-1] + 1 < i:  # (right after itself: that is self)
                    h = induction_at[1]
                    p[b, h, i] = 0.0
                    p[b, h, i, earlier[-1] + 1] = 1.0  # the token that followed the last occurrence
                if layer == duplicate_at[0]:
                    h = duplicate_at[1]
                    p[b, h, i] = 0.0
                    p[b, h, i, earlier[-1]] = 1.0  # the earlier occurrence itself
        layers.append(LayerView(layer=layer, probs=p, allowed=allowed))
    return Captured(input_ids=ids, tokens=[[str(t) for t in row] for row in ids.tolist()], layers=layers, hidden_states=[])


def run(captured: Captured):
    ctx = Context(model=torch.nn.Identity(), tokenizer=None, name="planted", kind="causal-lm", captured=captured,
                  ablation_ids=captured.input_ids)
    return tokens(ctx)


def test_the_planted_induction_head_is_found_and_the_duplicate_head_is_not():
    g = torch.Generator().manual_seed(0)
    r = torch.randint(0, 50, (2, 20), generator=g)
    ids = torch.cat([r, r], dim=1)  # a random sequence repeated: every second-half token occurred before
    section = run(planted(ids, induction_at=(1, 1), duplicate_at=(0, 2)))
    check = next(c for c in section.checks if c.name == "induction_heads")
    assert check.status == "ok"
    found = section.figures["induction_heads"]
    assert [(h["layer"], h["head"]) for h in found] == [(1, 1)]
    assert found[0]["mass"] > 0.9  # (rows whose earlier occurrence is right before them stay uniform)
    mass = {(h["layer"], h["head"]): h["mass"] for h in section.figures["head_induction_mass"]}
    assert mass[(0, 2)] < 0.3 and mass[(0, 0)] < 0.3  # duplicate-token and uniform heads are not copying


def test_no_repeats_means_the_check_is_skipped_not_failed():
    ids = torch.arange(30)[None]  # no token occurs twice
    section = run(planted(ids, induction_at=(1, 1), duplicate_at=(0, 2)))
    check = next(c for c in section.checks if c.name == "induction_heads")
    assert check.status == "info" and "skipped" in check.message
