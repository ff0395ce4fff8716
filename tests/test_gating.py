"""Gated attention (attnkit.gate): identity at init for every kind x family, the gate equals a
hand-computed G1 on the output projection's input, training moves the gates, save/reload is exact,
and a broken gate checkpoint is one line and exit 2."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import _ids, bert, gpt2, llama, mistral

from attnkit.gate import GATE_KINDS, GateStats, add_gates, find_gates, gate_layouts, load_gates, remove_gates, save_gates
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
    from attnkit.common.loading.registry import load_model

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
    from attnkit.gate import load_gated
    from attnkit.common.loading.registry import load_model

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
    from attnkit.analyze.render import render_analysis

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
    from attnkit.common.loading.registry import load_model

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


def _sharpen(gates, seed: int = 3) -> None:
    """Gate weights that make gates vary with the input, some below 0.1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in gates:
            gate.net.out.weight.normal_(0, 3.0, generator=g)


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert", "transformer_ae"])
@pytest.mark.parametrize("kind", list(GATE_KINDS))
def test_gate_tap_through_the_seam_equals_gate_stats(family, kind):
    """Every call observed: the seam tap's per-head statistics are GateStats' (which records every
    forward directly), under each call's own site."""
    from attnkit.gate import GateTap
    from attnkit.seam import attach

    model, inputs = FAMILIES[family](), _input(family)
    _sharpen(add_gates(model, kind))
    tap = GateTap(model)
    with torch.no_grad(), tap, attach(model, taps=[tap]), GateStats(model) as stats:
        model(**inputs)
    want = {(r["layer"], r["head"]): r for r in stats.heads()}
    got = tap.heads()
    assert len(got) == len(want) > 0
    assert any(r["share_below_0_1"] > 0 for r in got)  # the check sees sparse gates too
    for r in got:
        w = want[(r["layer"], r["head"])]
        assert r["mean_gate"] == pytest.approx(w["mean_gate"], abs=1e-12)
        assert r["share_below_0_1"] == pytest.approx(w["share_below_0_1"], abs=1e-12)
        assert r["gate_kind"] == kind and r["gates"] == w["gates"]


def test_gate_tap_follows_the_session_plan():
    """Only what the seam observes counts: every=2 sees the first of two forwards; layers=[1] only
    layer 1; an inactive session nothing."""
    from attnkit.gate import GateTap
    from attnkit.seam import AttentionSession, attach

    model = gpt2()
    _sharpen(add_gates(model, "headwise"))
    first, second = {"input_ids": _ids(2, 12)}, {"input_ids": _ids(2, 12, seed=1)}
    tap = GateTap(model)
    with torch.no_grad(), tap, attach(model, taps=[tap], every=2), GateStats(model) as stats:
        model(**first)
        alone = {(r["layer"], r["head"]): r["mean_gate"] for r in stats.heads()}
        model(**second)
    assert {(r["layer"], r["head"]): r["mean_gate"] for r in tap.heads()} == pytest.approx(alone, abs=1e-12)
    tap = GateTap(model)
    with torch.no_grad(), tap, attach(model, taps=[tap], layers=[1]):
        model(**first)
    assert {r["layer"] for r in tap.heads()} == {1}
    tap = GateTap(model)
    session = AttentionSession(taps=[tap])
    session.active = False
    with torch.no_grad(), tap, attach(model, session):
        model(**first)
    assert tap.heads() == []
    assert not any(tap in g.recorders for g in find_gates(model))  # removed on exit


def test_monitor_reports_gate_statistics_and_how_they_moved(tmp_path):
    import json

    from attnkit.monitor import AttentionMonitor

    model = gpt2().train()
    add_gates(model, "headwise")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    with AttentionMonitor(model, every=2, log_dir=tmp_path, emit=("csv",), optimizer=opt) as monitor:
        for step in range(10):
            x = _ids(2, 12, seed=step)
            loss = model(input_ids=x, labels=x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            monitor.on_step(step, loss=loss)
        change = monitor.gate_change()
    steps = [json.loads(line) for line in (tmp_path / "monitor.jsonl").read_text().splitlines() if '"step"' in line
             and '"type": "step"' in line]
    assert len(steps) == 5 and all(len(s["metrics"]["mean_gate"]) == 8 for s in steps)
    assert steps[0]["metrics"]["mean_gate"] == [0.5] * 8  # identity at init: sigma(0) everywhere
    assert steps[-1]["metrics"]["mean_gate"] != [0.5] * 8
    assert len(change) == 8 and change[0]["first_step"] == 0 and change[0]["step"] == 8
    assert any(abs(c["mean_gate_change"]) > 1e-3 for c in change)
    for c, last in zip(change, steps[-1]["metrics"]["mean_gate"]):
        assert c["mean_gate"] == last and c["mean_gate_change"] == pytest.approx(last - 0.5)
    assert ",mean_gate,L1H3," in (tmp_path / "monitor.csv").read_text()  # the scalars every sink gets


def test_monitor_report_of_a_gated_run_draws_and_summarises_the_gates(tmp_path):
    from attnkit.monitor import AttentionMonitor
    from attnkit.monitor.report import gate_summary, read_run, save_figures

    model = gpt2().train()
    add_gates(model, "elementwise")
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    with AttentionMonitor(model, every=2, log_dir=tmp_path, emit=(), optimizer=opt) as monitor:
        for step in range(6):
            x = _ids(2, 12, seed=step)
            model(input_ids=x, labels=x).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            monitor.on_step(step)
    run = read_run(tmp_path)
    assert {p.name for p in save_figures(run, tmp_path / "fig")} >= {"gates.png", "max_logit.png"}
    assert gate_summary(run).startswith("gates: mean 0.500 at step 0 → ")
