"""Gated attention (attnkit.edits): identity at init for every kind x family, the gate equals a
hand-computed G1 on the output projection's input, training moves the gates, save/reload is exact,
and a broken gate checkpoint is one line and exit 2."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import _ids, bert, gpt2, llama, mistral

from attnkit.edits import GATE_KINDS, GateStats, add_gates, find_gates, load_gates, remove_gates, save_gates
from attnkit.edits.layouts import gate_layouts
from attnkit.errors import UserError


def qwen2(seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, max_position_embeddings=64, initializer_range=0.2)
    return Qwen2ForCausalLM._from_config(cfg, attn_implementation="eager").eval()


def ae(seed: int = 0):
    from attnkit.models.transformer_ae import TransformerAE

    torch.manual_seed(seed)
    return TransformerAE(d_model=32, n_head=4, n_layer=2, d_ff=64).eval()


FAMILIES = {"gpt2": gpt2, "llama": llama, "mistral": mistral, "qwen2": qwen2, "bert": bert, "transformer_ae": ae}


def _input(name: str):
    if name == "transformer_ae":
        return {"x": torch.randn(2, 2464, generator=torch.Generator().manual_seed(0)) * 0.3}
    return {"input_ids": _ids(2, 12)}


def _out(model, inputs) -> torch.Tensor:
    o = model(**inputs)
    if isinstance(o, torch.Tensor):
        return o
    return o.logits if getattr(o, "logits", None) is not None else o.last_hidden_state


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("kind", list(GATE_KINDS))
def test_converted_model_equals_original_at_init(family, kind):
    model, inputs = FAMILIES[family](), _input(family)
    with torch.no_grad():
        ref = _out(model, inputs)
        gates = add_gates(model, kind)
        got = _out(model, inputs)
    assert len(gates) == 2 and len(find_gates(model)) == 2
    assert (got - ref).abs().max().item() <= 1e-5
    # a non-zero bias is identity too (the constant 1/sigmoid(b) undoes sigmoid(b))
    remove_gates(model)
    add_gates(model, kind, init_bias=-2.0)
    with torch.no_grad():
        assert (_out(model, inputs) - ref).abs().max().item() <= 1e-5
    remove_gates(model)
    assert not any("attnkit_gate" in k for k in model.state_dict())
    with torch.no_grad():
        assert torch.equal(_out(model, inputs), ref)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
@pytest.mark.parametrize("kind", ["headwise", "elementwise"])
def test_gate_is_g1_on_the_output_projection_input(family, kind):
    """Reference computed by hand from an ungated model's layer-0 tensors: Y' = Y * sigmoid(X W + b) / sigmoid(b0)."""
    model, inputs = FAMILIES[family](), _input(family)
    layout = gate_layouts(model)[0]
    seen = {}
    hx = layout.x_module.register_forward_pre_hook(
        lambda m, a, kw: seen.__setitem__("x", kw.get("hidden_states", a[0] if a else None)), with_kwargs=True)
    hy = layout.out_proj.register_forward_pre_hook(lambda m, a: seen.__setitem__("y", a[0]))
    with torch.no_grad():
        model(**inputs)
    hx.remove(), hy.remove()
    gate = add_gates(model, kind, init_bias=0.5, layers=[0])[0]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        gate.net.out.weight.copy_(torch.randn(gate.net.out.weight.shape, generator=g))
        gate.net.out.bias.copy_(torch.randn(gate.net.out.bias.shape, generator=g))
    out = {}
    h = layout.out_proj.register_forward_hook(lambda m, a, o: out.__setitem__("o", o))
    with torch.no_grad():
        model(**inputs)
    h.remove()
    x, y = seen["x"].double(), seen["y"].double()
    w, b = gate.net.out.weight.double(), gate.net.out.bias.double()
    sig = torch.sigmoid(x @ w.T + b) / (1 / (1 + math.exp(-0.5)))  # (B, T, H) or (B, T, H*d)
    H = layout.num_heads
    y_gated = (y.view(*y.shape[:2], H, -1) * sig.view(*y.shape[:2], H, -1)).view(y.shape)
    proj = layout.out_proj
    weight = proj.weight.double().T if isinstance(proj, torch.nn.Linear) else proj.weight.double()  # Conv1D: (in, out)
    ref = y_gated @ weight + (proj.bias.double() if proj.bias is not None else 0.0)
    assert torch.allclose(out["o"].double(), ref, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert", "transformer_ae"])
@pytest.mark.parametrize("kind", list(GATE_KINDS))
def test_training_moves_gates_and_reload_is_exact(family, kind, tmp_path):
    model, inputs = FAMILIES[family](), _input(family)
    gates = add_gates(model, kind)
    model.train()
    opt = torch.optim.Adam([p for g in gates for p in g.parameters()], lr=1e-2)
    for _ in range(3):
        _out(model, inputs).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    assert all(g.net.out.weight.abs().max() > 1e-3 for g in gates)
    with torch.no_grad(), GateStats(model) as stats:
        expected = _out(model, inputs)
    heads = stats.heads()
    assert len(heads) == sum(g.num_heads for g in gates)
    assert any(abs(h["mean_gate"] - 0.5) > 1e-4 for h in heads)
    assert all(0.0 <= h["share_below_0_1"] <= 1.0 for h in heads)
    save_gates(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gate_config.json", "gates.safetensors"]
    fresh = FAMILIES[family]()  # same seed: the original weights
    load_gates(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(_out(fresh, inputs), expected)


def test_gate_stats_against_hand_count():
    model, inputs = gpt2(), _input("gpt2")
    gate = add_gates(model, "elementwise", layers=[1])[0]
    with torch.no_grad():
        gate.net.out.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(3))
    seen = {}
    layout = gate_layouts(model)[1]
    h = layout.x_module.register_forward_pre_hook(lambda m, a, kw: seen.__setitem__("x", a[0] if a else kw["hidden_states"]),
                                                  with_kwargs=True)
    with torch.no_grad(), GateStats(model) as stats:
        model(**inputs)
    h.remove()
    with torch.no_grad():
        g = torch.sigmoid(gate.net(seen["x"])).view(-1, 4, 8)  # (B*T, H, d)
    for row in stats.heads():
        assert row["layer"] == 1
        assert row["mean_gate"] == pytest.approx(float(g[:, row["head"]].mean()), abs=1e-6)
        assert row["share_below_0_1"] == pytest.approx(float((g[:, row["head"]] < 0.1).double().mean()), abs=1e-9)


def test_refusals():
    model = gpt2()
    with pytest.raises(UserError, match="unknown gate kind"):
        add_gates(model, "nope")
    add_gates(model, "headwise")
    with pytest.raises(UserError, match="already"):
        add_gates(model, "headwise")
    with pytest.raises(UserError, match="output projection"):
        add_gates(torch.nn.Sequential(torch.nn.Linear(3, 3)), "headwise")


def test_load_refuses_another_architecture(tmp_path):
    model = gpt2()
    add_gates(model, "headwise")
    save_gates(model, tmp_path)
    other = gpt2(width=64)
    with pytest.raises(UserError, match="shape"):
        load_gates(other, tmp_path)
    assert not find_gates(other)  # nothing half-loaded


@pytest.fixture(scope="module")
def _gated_once(tmp_path_factory):
    """A directory `attnkit gate` wrote, from the reference model saved as a local HF model directory."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from attnkit.cli.main import main
    from attnkit.models.registry import load_model

    ref = load_model("reference")
    src = tmp_path_factory.mktemp("src")
    ref.model.save_pretrained(src)
    ref.tokenizer.save_pretrained(src)
    out = tmp_path_factory.mktemp("gated") / "out"
    assert main(["gate", str(src), "--kind", "mlp", "--out", str(out)]) == 0
    return out


@pytest.fixture
def gated_dir(_gated_once, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return Path(shutil.copytree(_gated_once, tmp_path / "gated"))


def test_cli_gate_writes_a_loadable_model(gated_dir, capsys):
    from attnkit.edits.io import load_gated
    from attnkit.models.registry import load_model

    capsys.readouterr()
    loaded = load_gated(gated_dir)
    plain = load_model(str(gated_dir))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        assert (loaded.model(ids).logits - plain.model(ids).logits).abs().max() <= 1e-5
    assert len(find_gates(loaded.model)) == 4
    from attnkit.cli.main import main

    assert main(["gate", str(gated_dir), "--stats", "--text", "In the beginning God created"]) == 0
    assert "mean 0.500" in capsys.readouterr().out


@pytest.mark.parametrize("damage", ["truncate", "garbage", "json"])
def test_broken_gate_checkpoint_is_one_line_exit_2(gated_dir, damage, capsys):
    from attnkit.cli.main import main

    if damage == "truncate":
        f = gated_dir / "gates.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage == "garbage":
        (gated_dir / "gates.safetensors").write_bytes(b"\x00\x01not a safetensors file" * 10)
    else:
        (gated_dir / "gate_config.json").write_text('{"format": "attnkit-gates/1", "kind": "mlp", "lay')
    capsys.readouterr()
    assert main(["gate", str(gated_dir), "--stats"]) == 2
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert ("truncated or corrupted" in lines[0]) and ("gates.safetensors" in lines[0] or "gate_config.json" in lines[0])


def test_analyze_reports_gate_statistics():
    from io import StringIO

    from rich.console import Console

    from attnkit.analyze.run import analyze
    from attnkit.report.console import render_analysis

    model, inputs = gpt2(), _input("gpt2")
    plain = analyze(model, inputs)
    assert "gates" not in plain.to_json()
    add_gates(model, "headwise", init_bias=-1.0)
    result = analyze(model, inputs)
    doc = result.to_json()
    assert len(doc["gates"]) == 8
    assert all(g["mean_gate"] == pytest.approx(1 / (1 + math.exp(1.0)), abs=1e-6) for g in doc["gates"])
    assert [h["normalized_entropy"] for h in doc["heads"]] == [h["normalized_entropy"] for h in plain.to_json()["heads"]]
    buf = StringIO()
    render_analysis(result, Console(file=buf, width=100))
    assert "output gates (headwise, 8 heads): mean gate 0.269" in buf.getvalue()


def test_every_command_loads_a_gated_directory_with_its_trained_gates(gated_dir, capsys):
    import json

    from attnkit.cli.main import main
    from attnkit.models.registry import load_model

    trained = load_model(str(gated_dir))
    gates = find_gates(trained.model)
    assert len(gates) == 4  # the registry adds the directory's gates itself
    with torch.no_grad():
        for g in gates:  # "train" the gates: move them away from their identity start
            g.net.out.weight.normal_(0, 0.5)
    save_gates(trained.model, gated_dir)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    again = load_model(str(gated_dir))
    with torch.no_grad():
        assert torch.equal(again.model(ids).logits, trained.model(ids).logits)
    capsys.readouterr()
    assert main(["analyze", str(gated_dir), "--text", "In the beginning God created the heaven", "--json", "-"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["gates"] and all(0.0 < g["mean_gate"] < 1.0 for g in doc["gates"])
    assert any(abs(g["mean_gate"] - 0.5) > 1e-3 for g in doc["gates"])
