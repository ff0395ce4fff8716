"""Every architecture in the zoo: what the seam captures is what the model computes.

For each tiny architecture of ``arch_zoo.ZOO`` (decoder, GQA, sliding window, soft-capping, MoE,
learned sinks, hybrid, encoder, encoder-decoder, vision, audio):

- the reference is the model's own ``eager`` forward with ``output_attentions=True``: its
  softmax over its own masks, biases and sinks, computed by transformers and not by attnkit;
- the probabilities captured through the seam must equal every reference map (encoder,
  decoder and cross-attention each under their own site) to 1e-5;
- the model's outputs under ``attach`` must equal its outputs without, bit for bit (attach
  must never change what a model computes);
- the same again on the models built for SDPA.

Architectures that reach ``AttentionInterface`` only in some transformers releases are checked the
same way where the installed release dispatches them, and must be refused with a message that
says so where it does not; hand-written attention inside a model that otherwise dispatches must
be named in a warning (and the outputs stay unchanged). Focused tests: Swin's -100 masks in the statistics, SigLIP's
``nn.MultiheadAttention`` head as a site of its own.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from arch_zoo import VERSION_DEPENDENT, ZOO, Arch, dispatches
from attnkit.errors import UserError
from attnkit.seam import NoAttentionError, attach
from attnkit.seam.taps import MapCapture, StatsCollector

PROB_ATOL = 1e-5
# Outputs: with nothing modified the seam runs each call on the model's own kernel (its eager
# function here), so outputs under attach are bit for bit the outputs without.
OUT_RTOL, OUT_ATOL = 0.0, 0.0

# eager output field -> (stack, kind) of the sites the seam must report it under
DEFAULT_SITES = {
    "attentions": ("", "self"),
    "encoder_attentions": ("encoder", "self"),
    "decoder_attentions": ("decoder", "self"),
    "cross_attentions": ("decoder", "cross"),
}


def capture_through_seam(model, inputs: dict, sink: str = "share") -> tuple[dict, object, list[str]]:
    """One forward under attach with a map capture: (maps keyed by (stack, kind, layer) in the
    order of the calls, model output, warnings attach gave). ``sink``: MapCapture's convention
    for learned sinks.

    The one place that spells the seam's API, so that a rename is a one-line change.
    """
    capture = MapCapture(sink=sink)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad(), attach(model, taps=[capture]):
            output = model(**inputs)
    maps = {(site.stack, site.kind, site.layer): m for site, m in capture.maps.items()}
    return maps, output, [str(w.message) for w in caught]


def eager_reference(model, inputs: dict):
    with torch.no_grad():
        return model(**inputs, output_attentions=True), model(**inputs)


def reference_maps(arch: Arch, output) -> dict[tuple[str, str], list[torch.Tensor]]:
    """The eager maps, grouped by the (stack, kind) they must be captured under, in layer order."""
    if arch.in_call_order:
        return {("*", "*"): [m for m in output.attentions if m is not None]}
    sites = {**DEFAULT_SITES, **arch.sites}
    groups: dict[tuple[str, str], list[torch.Tensor]] = {}
    for field_name, site in sites.items():
        maps = getattr(output, field_name, None)
        if maps and site is not None:
            # Hybrid stacks report only their attention layers, in call order.
            groups.setdefault(site, []).extend(m for m in maps if m is not None)
    return groups


def _tensors(value, path: str = "out"):
    """(path, tensor) for every floating tensor in a model output (nested tuples, ModelOutputs)."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            yield path, value
    elif hasattr(value, "to_tuple"):
        for key in value.keys():
            yield from _tensors(value[key], f"{path}.{key}")
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            yield from _tensors(item, f"{path}[{i}]")


def _reported_layers(arch: Arch, stack: str, kind: str) -> list[int] | None:
    sites = {**DEFAULT_SITES, **arch.sites}
    for field_name, layers in arch.reported_layers.items():
        if sites[field_name] == (stack, kind):
            return layers
    return None


def installed(archs: list[Arch]) -> list:
    """``archs`` as test parameters; one the installed transformers release lacks is skipped, saying so."""
    return [pytest.param(a, id=a.name, marks=[pytest.mark.skip(reason=a.missing())] if a.missing() else [])
            for a in archs]


@pytest.mark.parametrize("arch", installed(ZOO))
def test_captured_probabilities_equal_eager_and_outputs_unchanged(arch: Arch):
    model, inputs = arch.build()
    if refused_where_not_dispatched(model, inputs):
        return
    reference, plain = eager_reference(model, inputs)
    check_against_reference(arch, model, inputs, reference, plain)


def refused_where_not_dispatched(model, inputs: dict) -> bool:
    """Whether a model reaches AttentionInterface depends on the transformers release installed
    (GPT-J's and CodeGen's attention dispatch from 5.24 on, Falcon's from 5.25): where the
    installed release does not dispatch it, attach must refuse it and say why (True: checked)."""
    if dispatches(model, inputs):
        return False
    with pytest.raises(NoAttentionError, match="no attention attnkit can reach"):
        with attach(model, taps=[MapCapture()]):
            model(**inputs)
    return True


def _supports_sdpa(arch: Arch) -> bool:
    import transformers

    return bool(getattr(getattr(transformers, arch.model_class), "_supports_sdpa", False))


SDPA_ZOO = [a for a in ZOO if not a.missing() and _supports_sdpa(a)]


@pytest.mark.parametrize("arch", SDPA_ZOO, ids=[a.name for a in SDPA_ZOO])
def test_sdpa_models_captured_exactly_and_outputs_unchanged(arch: Arch):
    """The same on a model that runs SDPA: its mask function answers with SDPA's (boolean, or
    none where ``is_causal`` covers it) and its kernel is SDPA. The reference maps come from the
    same weights switched to eager for one forward. Rows of padding queries are left out: a
    padding token whose row sees no key (Llama 4's chunks) gets another value from SDPA than from
    eager, which flows into its later layers; the eager test above checks those rows."""
    model, inputs = arch.build(attn_implementation="sdpa")
    if refused_where_not_dispatched(model, inputs):
        return
    with torch.no_grad():
        plain = model(**inputs)
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            reference = model(**inputs, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    check_against_reference(arch, model, inputs, reference, plain, real_queries_only=True)


def check_against_reference(arch: Arch, model, inputs: dict, reference, plain, real_queries_only: bool = False) -> None:
    """Captured maps equal ``reference``'s eager maps; outputs under attach equal ``plain``.
    ``real_queries_only``: compare only the rows of non-padding queries."""
    expected = reference_maps(arch, reference)
    assert expected, f"{arch.name}: eager output_attentions returned no maps"
    # The comparison must be able to tell attention apart from uniform: some head is peaked.
    peak = max(float(m.max()) for maps in expected.values() for m in maps)
    assert peak > 0.5, f"{arch.name}: attention near uniform (largest weight {peak:.2f}): raise the init"

    # the map in the model's own convention for a learned sink (MapCapture's ``sink`` option)
    sink = "excluded" if arch.eager_weights_exclude_sink else "share"
    captured, attached, warned = capture_through_seam(model, inputs, sink)
    unseen = [w for w in warned if "without transformers' AttentionInterface" in w]
    if None in arch.sites.values():  # attention the seam cannot see must be named, not skipped silently
        assert unseen, f"{arch.name}: attach did not say which attention it does not see"
    else:
        assert not unseen, f"{arch.name}: {unseen}"

    for (stack, kind), maps in expected.items():
        # Eager lists its maps in call order, as the capture does (hybrid stacks skip layers).
        layers = [layer for s, k, layer in captured if (s, k) == (stack, kind)]
        if arch.in_call_order:  # every captured site, each pass its own, in call order
            layers = list(captured)
        reported_only = _reported_layers(arch, stack, kind)
        if reported_only is not None:
            layers = [layer for layer in layers if layer in reported_only]
        assert len(layers) == len(maps), (
            f"{arch.name}: {len(maps)} {stack or 'model'} {kind}-attention maps in eager, captured "
            f"{len(layers)} under that site; captured sites: {sorted(captured)}"
        )
        for layer, want in zip(layers, maps):
            got = captured[layer if arch.in_call_order else (stack, kind, layer)]
            assert got.shape == want.shape, f"{arch.name} {stack} {kind} layer {layer}: shape"
            want = want.float()
            # A row that sees no key at all (a padding query whose only keys are padding, in
            # chunked attention) has no attention: the seam gives it zeros, eager a softmax over
            # min-valued logits, i.e. exactly uniform over every key. Only such rows may differ.
            empty = got.sum(-1) == 0
            if bool(empty.any()):
                uniform = torch.full_like(want[empty], 1.0 / want.shape[-1])
                torch.testing.assert_close(want[empty], uniform, atol=1e-7, rtol=0)
                want = torch.where(empty[..., None], 0.0, want)
            padding = inputs.get("attention_mask")
            if real_queries_only and padding is not None and padding.shape == want.shape[::2]:
                real = padding.bool()[:, None, :, None]  # (B, 1, Q, 1)
                got, want = torch.where(real, got, 0.0), torch.where(real, want, 0.0)
            torch.testing.assert_close(
                got, want, atol=PROB_ATOL, rtol=0,
                msg=lambda m, s=stack, k=kind, lyr=layer: f"{arch.name} {s} {k} layer {lyr}: {m}",
            )
    reported = sum(len(m) for m in expected.values())
    assert len(captured) == reported + arch.extra_sites, (
        f"{arch.name}: captured {len(captured)} sites, eager reports {reported} (+{arch.extra_sites} expected "
        f"extra): {sorted(captured)}"
    )

    want = dict(_tensors(plain))
    got = dict(_tensors(attached))
    assert want.keys() == got.keys()
    for path, value in want.items():
        torch.testing.assert_close(
            got[path], value, rtol=OUT_RTOL, atol=OUT_ATOL,
            msg=lambda m, p=path: f"{arch.name}: output {p} changed under attach: {m}",
        )


@pytest.mark.parametrize("arch", installed(VERSION_DEPENDENT))
def test_version_dependent_dispatch_is_captured_exactly_or_refused(arch: Arch):
    """Whether these reach AttentionInterface depends on the transformers release installed: where
    the model dispatches, the capture must equal its eager maps and leave its outputs unchanged;
    where it does not, attach must refuse it and say why."""
    model, inputs = arch.build()
    if not refused_where_not_dispatched(model, inputs):
        reference, plain = eager_reference(model, inputs)
        check_against_reference(arch, model, inputs, reference, plain)


def test_large_finite_negative_mask_counts_as_masked_in_statistics():
    """Swin's shifted-window block masks keys of other windows with -100 (MarkupLM and older
    models use -10000): their weight is exp(-100) ~ 1e-44, nothing. Statistics must treat them
    as masked, as they treat -inf: visible-key counts (normalised entropy) and logit extremes."""
    from arch_zoo import by_name

    arch = by_name("swin")
    model, inputs = arch.build()
    with torch.no_grad():
        weights = model(**inputs, output_attentions=True).attentions[0].double()  # the shifted block's
    stats = StatsCollector()
    with torch.no_grad(), attach(model, taps=[stats]):
        model(**inputs)
    shifted = [h for h in stats.heads() if h["layer"] == 1]
    assert len(shifted) == weights.shape[1]

    visible = weights > 1e-30  # exp(-100) relative weights are ~1e-44: not seen
    assert not bool(visible.all()), "the shifted block must mask some keys, or this test shows nothing"
    n = visible.sum(-1)
    entropy = -(torch.where(visible, weights * weights.clamp_min(1e-300).log(), 0.0)).sum(-1)
    normalized = torch.where(n >= 2, entropy / n.double().log(), torch.nan)
    for head in shifted:
        want = float(normalized[:, head["head"]].nanmean())
        assert head["normalized_entropy"] == pytest.approx(want, abs=1e-5)
        # the -100 keys' logits (about -100 + the relative bias) are not a visible key's logit
        assert head["logit_min"] > -50


@pytest.mark.parametrize("name", ["git_text", "sam_vision", "longt5_transient_global", "bigbird_pegasus_block_sparse"])
def test_hand_written_attention_is_named_and_outputs_unchanged(name: str):
    """Models whose attention is (partly) hand-written: attach says which classes it does not see,
    and the model computes exactly what it computed before (GIT's text layers add the mask to
    their own scores: they must get the float mask of their original eager implementation)."""
    from arch_zoo import PARTLY_DISPATCHED

    builder, unseen_class = PARTLY_DISPATCHED[name]
    model, inputs = builder()
    with torch.no_grad():
        plain = model(**inputs)
    with pytest.warns(UserWarning, match=unseen_class):
        with torch.no_grad(), attach(model, taps=[MapCapture()]):
            attached = model(**inputs)
    for path, value in dict(_tensors(plain)).items():
        torch.testing.assert_close(dict(_tensors(attached))[path], value, rtol=OUT_RTOL, atol=OUT_ATOL)


def test_multihead_attention_beside_hf_layers_is_its_own_site():
    """SigLIP's pooling head is an nn.MultiheadAttention beside the HF encoder layers: its map is
    captured under its own site (not over layer 0) and equals the module's own weights."""
    from arch_zoo import by_name

    model, inputs = by_name("siglip_vision_model").build()
    head = model.head
    seen = {}
    handle = head.attention.register_forward_pre_hook(lambda m, args: seen.setdefault("args", args))
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    query, key, value = seen["args"]
    with torch.no_grad():
        _, want = head.attention(query, key, value, need_weights=True, average_attn_weights=False)

    captured, _, _ = capture_through_seam(model, inputs)
    head_sites = [site for site in captured if site[0] != "encoder"]
    assert len(head_sites) == 1, sorted(captured)
    assert sorted(layer for stack, _, layer in captured if stack == "encoder") == [0, 1]
    torch.testing.assert_close(captured[head_sites[0]], want, atol=PROB_ATOL, rtol=0)


def test_repeated_calls_are_passes_only_inside_the_models_forward():
    """A second call of a layer within one forward of the attached model is a pass of its own;
    a sub-module called on its own, twice, keeps its plain sites (no forward brackets it)."""
    from arch_zoo import by_name

    model, inputs = by_name("bart").build()
    encoder = model.get_encoder()
    capture = MapCapture()
    with torch.no_grad(), attach(model, taps=[capture]):
        encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        encoder(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    assert sorted((s.stack, s.layer) for s in capture.maps) == [("encoder", 0), ("encoder", 1)]

    class Twice(torch.nn.Module):  # a wrapper that runs the encoder twice in one forward
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kw):
            return self.inner(**kw), self.inner(**kw)

    twice = Twice(encoder)
    capture = MapCapture()
    with torch.no_grad(), attach(twice, taps=[capture]):
        twice(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    assert [(s.stack, s.layer) for s in capture.maps] == [("", 0), ("", 1), ("pass 2", 0), ("pass 2", 1)]


def test_sink_model_row_spread_is_measured_around_what_the_sink_leaves():
    """gpt-oss: each row's weights over the keys sum below one (a learned sink takes the rest).
    The statistics' row_std must be the population std of the captured weights over the visible
    keys, computed here directly from MapCapture's maps — not one around 1/n."""
    from arch_zoo import by_name

    from attnkit.seam import MapCapture, StatsCollector, attach

    model, inputs = by_name("gpt_oss").build()
    stats, maps = StatsCollector(), MapCapture(keep_allowed=True)
    with torch.no_grad(), attach(model, taps=[stats, maps]):
        model(**inputs)
    checked = 0
    for head in stats.heads():
        site = next(s for s in maps.maps if s.layer == head["layer"] and s.stack == head["stack"])
        p, allowed = maps.maps[site][:, head["head"]], maps.allowed[site][:, head["head"]]  # (B, Q, K)
        n = allowed.sum(-1)
        use = n >= 2
        mass = p.sum(-1)
        assert bool((mass[use] < 1 - 1e-3).any()), "the sink must take a visible share of some rows"
        mean = mass / n
        var = (torch.where(allowed, p, 0.0).square().sum(-1) / n - mean.square()).clamp_min(0)
        want = float(var.sqrt()[use].double().mean())
        assert head["row_std"] == pytest.approx(want, rel=1e-4, abs=1e-6)
        checked += 1
    assert checked > 0


# One sink logit per head, a parameter of the attention module (Inkling2's per-row sinks are
# computed inside the forward: the zoo test covers it against its eager maps).
HEAD_SINK_ZOO = [a for a in ZOO if a.category == "sinks" and a.name != "inkling2_text"]


@pytest.mark.parametrize("arch", installed(HEAD_SINK_ZOO))
def test_sink_conventions_are_the_weights_applied_and_the_keys_alone(arch: Arch):
    """MapCapture's default map of a learned-sink model is the weights its values are summed with:
    the eager softmax over keys and sink, computed here from the captured logits and the model's
    sink parameters, so rows sum below one; ``sink="excluded"`` is the softmax over the keys
    alone, Granite SWA's own ``output_attentions``."""
    model, inputs = arch.build()
    shared, excluded = MapCapture(keep_logits=True), MapCapture(sink="excluded")
    with torch.no_grad(), attach(model, taps=[shared, excluded]):
        model(**inputs)
    sinks = {}
    for name, p in model.named_parameters():
        if name.endswith("sinks"):
            sinks[int(name.split("layers.")[1].split(".")[0])] = p.detach().float()  # (H,) per layer
    checked = 0
    for site, got in shared.maps.items():
        if site.layer not in sinks or sinks[site.layer].dim() != 1 or site.stack:
            continue  # a layer without a sink (MiMo-V2's full-attention layers)
        logits = shared.logits[site].double()  # (B, H, Q, K), masked keys -inf
        sink = sinks[site.layer].double().view(1, -1, 1, 1).expand(*logits.shape[:-1], 1)
        want = torch.softmax(torch.cat([logits, sink], -1), -1)[..., :-1]
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=0)
        assert float(got.sum(-1).amin()) < 0.99, f"{arch.name} {site}: the sink took no mass"
        keys_alone = torch.softmax(logits, -1)
        torch.testing.assert_close(excluded.maps[site].double(), keys_alone, atol=1e-5, rtol=0)
        checked += 1
    assert checked > 0
    with pytest.raises(UserError, match="sink convention"):
        MapCapture(sink="renormalised")
