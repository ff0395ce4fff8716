"""TransformerAE (seed 000) and its CNN zoo: shapes against hand chunking, the seam sees its attention
(maps equal a float64 softmax reference), the merging objective trains, and analyze flags a collapsed
AE (uniform 1/50 attention)."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from attnkit.models.transformer_ae import (CNN_PARAMS, N_TOKENS, AEConfig, EmbedderNeuronGroup, TransformerAE, ZooCNN,
                                           flatten_cnn, unflatten_cnn)
from attnkit.seam import Site, attach
from attnkit.seam.taps import MapCapture


def _x(n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 2 * CNN_PARAMS, generator=torch.Generator().manual_seed(seed)) * 0.3


def test_cnn_has_1232_parameters_and_flattening_round_trips():
    torch.manual_seed(0)
    cnn = ZooCNN()
    assert sum(p.numel() for p in cnn.parameters()) == 1232
    flat = flatten_cnn(cnn)
    assert flat.shape == (1232,)
    assert flat[:192].equal(cnn.conv1.weight.detach().reshape(-1))  # the 12 short chunks are conv1
    img = torch.rand(5, 1, 8, 8)
    assert torch.equal(functional_call(ZooCNN(), unflatten_cnn(flat), (img,)), cnn(img))


def test_embedder_makes_50_tokens_from_24_short_and_26_long_chunks():
    torch.manual_seed(0)
    emb = EmbedderNeuronGroup(8)
    x = _x(2)
    tokens = emb(x)
    assert tokens.shape == (2, N_TOKENS, 8) and N_TOKENS == 50
    a, b = x[:, :1232], x[:, 1232:]
    ref_short = [a[:, i * 16:(i + 1) * 16] for i in range(12)] + [b[:, i * 16:(i + 1) * 16] for i in range(12)]
    ref_long = [a[:, 192 + i * 80:192 + (i + 1) * 80] for i in range(13)] + [b[:, 192 + i * 80:192 + (i + 1) * 80] for i in range(13)]
    for t, chunk in enumerate(ref_short):
        assert torch.allclose(tokens[:, t], emb.neuron_l1(chunk), atol=1e-6)
    for t, chunk in enumerate(ref_long):
        assert torch.allclose(tokens[:, 24 + t], emb.neuron_l2(chunk), atol=1e-6)


def test_seam_sees_every_layer_and_maps_equal_a_float64_reference():
    torch.manual_seed(0)
    model = TransformerAE(AEConfig(d_model=32, n_head=4, n_layer=3, d_ff=64, dropout=0.0)).eval()
    x = _x()
    inputs = {}
    hooks = [b.attn.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0])) for i, b in enumerate(model.blocks)]
    capture = MapCapture()
    with torch.no_grad():
        plain = model(x)
        with attach(model, taps=[capture]):
            seen = model(x)
    for h in hooks:
        h.remove()
    assert torch.equal(plain, seen)  # observing changes nothing
    assert sorted(capture.maps) == [Site(0), Site(1), Site(2)]
    for i, block in enumerate(model.blocks):
        qkv = inputs[i].double() @ block.attn.qkv_proj.weight.double().T + block.attn.qkv_proj.bias.double()
        q, k, _ = qkv.split(32, -1)
        q, k = (t.view(3, 50, 4, 8).transpose(1, 2) for t in (q, k))
        ref = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, -1)
        assert torch.allclose(capture.maps[Site(i)].double(), ref, atol=1e-5)


def collapsed_ae() -> TransformerAE:
    """What collapse is in the attention: q.k = 0 for every pair, so every weight is exactly 1/50."""
    torch.manual_seed(0)
    model = TransformerAE(AEConfig(d_model=32, n_head=4, n_layer=2, d_ff=64)).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv_proj.weight[:64].zero_()
            block.attn.qkv_proj.bias[:64].zero_()
    return model


def test_analyze_flags_a_collapsed_ae_as_uniform():
    from attnkit.analyze.run import analyze

    result = analyze(collapsed_ae(), {"x": _x()}, name="collapsed-ae")
    assert len(result.heads) == 8
    for h in result.heads:
        assert h["normalized_entropy"] == pytest.approx(1.0, abs=1e-6)
        assert h["max_attention"] == pytest.approx(1 / 50, abs=1e-7)
    flagged = {(i.layer, i.head) for i in result.issues if i.type == "uniform_attention"}
    assert flagged == {(h["layer"], h["head"]) for h in result.heads}
    healthy = analyze(TransformerAE(AEConfig(d_model=32, n_head=4, n_layer=2, d_ff=64)).eval(), {"x": _x() * 30})
    assert not any(i.type == "uniform_attention" for i in healthy.issues)  # sharp attention is not flagged


def test_merging_objective_trains_and_beats_its_start():
    pytest.importorskip("sklearn")
    from attnkit.models.cnn_zoo import build_zoo, digits
    from attnkit.models.merging import merge_loss, pair_accuracy, sample_pairs, uniqueness

    torch.manual_seed(0)
    data = digits(num_clients=4)
    zoo = build_zoo(data, seeds=2, steps=60)  # 8 CNNs
    assert zoo.weights.shape == (8, 1232) and zoo.test_acc.mean() > 0.8
    model = TransformerAE(AEConfig(d_model=32, n_head=4, n_layer=1, d_ff=64, dropout=0.0))
    gen = torch.Generator().manual_seed(0)
    pairs = sample_pairs(zoo, torch.arange(8), 8, gen)
    assert (zoo.client[pairs.a] != zoo.client[pairs.b]).all()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        batch = sample_pairs(zoo, torch.arange(8), 8, gen)
        loss = merge_loss(model(batch.inputs(zoo)), batch, zoo, data, 16, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3
    with torch.no_grad():
        pred = model(pairs.inputs(zoo))
    acc = pair_accuracy(pred, pairs, zoo, data)
    assert acc.shape == (8,) and acc.mean() > 0.3  # chance on five classes of ten is 0.1
    assert uniqueness(torch.stack([pred[0]] * 4)) == 0.0 and uniqueness(zoo.weights) == 1.0


def test_attnkit_analyze_cli_flags_a_collapsed_checkpoint(tmp_path, capsys, monkeypatch):
    """The command line on a checkpoint the collapse experiment writes (its save_checkpoint)."""
    pytest.importorskip("attnkit.common.loading.user_model")
    import importlib.util
    import json
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("collapse_run", Path(__file__).parents[1] / "experiments/collapse/run.py")
    run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run)
    run.save_checkpoint(collapsed_ae(), tmp_path, _x(4))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from attnkit.cli.main import main

    report = tmp_path / "report.json"
    assert main(["analyze", "attnkit.models.transformer_ae:probe", "--checkpoint", str(tmp_path / "analyzable.safetensors"),
                 "--config", str(tmp_path / "probe_config.json"), "--tokenizer", "ids", "--text", "0 1 2 3",
                 "--json", str(report)]) == 0
    doc = json.loads(report.read_text())
    assert {(i["layer"], i["head"]) for i in doc["issues"] if i["type"] == "uniform_attention"} == \
        {(layer, head) for layer in range(2) for head in range(4)}
