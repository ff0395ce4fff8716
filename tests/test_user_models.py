"""Bring your own model: ``attnkit analyze|validate module.path:factory --checkpoint --config --tokenizer``.

A nanoGPT (``byo_models.GPT``, written as nanoGPT writes it, flash path on) is trained for 300 steps
on the KJV text in the test setup (about 6 s on one thread) and saved the way nanoGPT's train.py
saves it (``{"model": state_dict with torch.compile's _orig_mod. prefix, "model_args": ...}``).
Bad input exits 2 with one line and no traceback.
"""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from attnkit.cli.main import main
from attnkit.errors import UserError
from attnkit.common.loading.registry import load_model
from attnkit.common.loading.user_model import ConfigDict, UserModel
from attnkit.seam import MapCapture, Site, attach
from byo_models import build, build_mha

NANOGPT = {"n_layer": 2, "n_head": 4, "n_embd": 32, "block_size": 64, "vocab_size": 1024, "dropout": 0.0}
STEPS = 300


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A nanoGPT trained for a few hundred steps on KJV text, saved as nanoGPT saves it; and its config."""
    from attnkit.common.data import encode_documents, load_corpus
    from attnkit.common.loading.user_model import load_tokenizer

    tokenizer = load_tokenizer("reference")
    assert len(tokenizer) == NANOGPT["vocab_size"]
    ids = encode_documents(tokenizer, load_corpus("kjv").split("train")[:60])
    torch.manual_seed(0)
    model = build(NANOGPT)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    T = NANOGPT["block_size"]
    for _ in range(STEPS):
        starts = torch.randint(0, ids.numel() - T - 1, (8,), generator=g)
        x = torch.stack([ids[s:s + T] for s in starts])
        y = torch.stack([ids[s + 1:s + T + 1] for s in starts])
        _, loss = model(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    root = tmp_path_factory.mktemp("nanogpt")
    checkpoint, config = root / "ckpt.pt", root / "cfg.json"
    state = {"_orig_mod." + k: v for k, v in model.state_dict().items()}  # saved from a compiled model
    torch.save({"model": state, "model_args": NANOGPT, "iter_num": STEPS, "best_val_loss": float(loss.detach())}, checkpoint)
    config.write_text(json.dumps(NANOGPT))
    return model, checkpoint, config, root


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


# --------------------------------------------------------------------------- the route itself
def test_the_loaded_model_is_the_trained_one_and_the_seam_reaches_it(trained):
    model, checkpoint, config, _ = trained
    loaded = load_model("byo_models:build", checkpoint=str(checkpoint), config=str(config), tokenizer="reference")
    assert isinstance(loaded.model, UserModel) and loaded.kind == "causal-lm"
    assert loaded.model.config.n_positions == NANOGPT["block_size"]
    ids = torch.randint(0, 1024, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(loaded.model(input_ids=ids).logits, model(ids, ids)[0])
        capture = MapCapture()
        with attach(loaded.model, taps=[capture]):
            out = loaded.model(input_ids=ids, output_hidden_states=True)
    assert sorted(capture.maps) == [Site(0), Site(1)]
    assert len(out.hidden_states) == 2 and out.hidden_states[0].shape == (2, 16, 32)


def test_validate_runs_all_nine_sections_and_the_ablation(trained, tmp_path, capsys):
    _, checkpoint, config, _ = trained
    report = tmp_path / "report.json"
    code = main(["validate", "byo_models:build", "--checkpoint", str(checkpoint), "--config", str(config),
                 "--tokenizer", "reference", "--seq-len", "64", "--sequences", "2", "--ablation-blocks", "8",
                 "--json", str(report)])
    out = capsys.readouterr().out
    assert code in (0, 1), out
    data = json.loads(report.read_text())
    assert len(data["sections"]) == 9 and "Ablation" in out
    ablation = data["ablation"]
    assert set(ablation) == {"learned", "uniform", "local", "first_token"}
    assert all(math.isfinite(v["loss"]) for v in ablation.values())
    # 300 steps are enough for attention to matter: replacing it by uniform attention costs loss
    assert ablation["learned"]["loss"] < ablation["uniform"]["loss"]
    sanity = json.dumps(data["sections"][0])
    assert "Causal attention" in sanity  # the model is read as a causal LM, its rows see no future key


def test_analyze_runs_with_the_checkpoint_s_own_config(trained, tmp_path, capsys):
    _, checkpoint, _, _ = trained
    report = tmp_path / "analyze.json"
    code = main(["analyze", "byo_models:build", "--checkpoint", str(checkpoint), "--tokenizer", "reference",
                 "--text", "In the beginning God created the heaven and the earth.", "--json", str(report)])
    out = capsys.readouterr()
    assert code == 0, out.err
    data = json.loads(report.read_text())
    assert data["num_layers"] == 2 and len(data["heads"]) == 2 * 4
    # The commands it suggests next load the same model: they carry --checkpoint and --tokenizer.
    suggested = [line.strip() for line in out.out.splitlines() if line.strip().startswith(("attnkit analyze byo", "attnkit validate "))]
    assert suggested and all(f"--checkpoint {checkpoint}" in c and "--tokenizer reference" in c for c in suggested)


def test_perplexity_equals_the_model_s_own_loss_on_the_same_blocks(trained, tmp_path, capsys):
    import torch.nn.functional as F

    from attnkit.common.data import encode_documents, load_corpus, split_blocks
    from attnkit.common.loading.user_model import load_tokenizer

    model, checkpoint, _, _ = trained
    report = tmp_path / "ppl.json"
    code = main(["perplexity", "byo_models:build", "--checkpoint", str(checkpoint), "--tokenizer", "reference",
                 "--block-size", "64", "--max-blocks", "4", "--json", str(report)])
    assert code == 0, capsys.readouterr().err
    got = json.loads(report.read_text())
    blocks = split_blocks(encode_documents(load_tokenizer("reference"), load_corpus("kjv").split("test")), 64)[:4]
    with torch.no_grad():  # nanoGPT's own forward and cross-entropy, block by block
        nll = sum(float(F.cross_entropy(model(b[None, :-1], b[None, 1:])[0][0], b[1:], reduction="sum")) for b in blocks)
    tokens = sum(b.numel() - 1 for b in blocks)
    assert got["tokens"] == tokens
    assert math.isclose(got["perplexity"], math.exp(nll / tokens), rel_tol=1e-4)


def test_multihead_attention_model_from_a_saved_pt_with_token_ids(tmp_path, capsys):
    torch.manual_seed(0)
    model = build_mha().eval()
    checkpoint = tmp_path / "mha.pt"
    torch.save({"state_dict": {"module." + k: v for k, v in model.state_dict().items()}}, checkpoint)  # DDP-saved
    loaded = load_model("byo_models:build_mha", checkpoint=str(checkpoint), tokenizer="ids")
    ids = torch.arange(1, 11).unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(loaded.model(input_ids=ids).logits, model(ids))
    assert loaded.kind == "causal-lm"  # read from the model itself: earlier outputs ignore a later token
    # captured probabilities of the loaded model equal a float64 reference from its own projections
    attn = loaded.model.module.blocks[0].attn
    kept = {}

    def keep_input(_module, args) -> None:
        kept.setdefault("h", args[0].detach())

    hook = attn.register_forward_pre_hook(keep_input)
    capture = MapCapture()
    with torch.no_grad(), attach(loaded.model, taps=[capture]):
        loaded.model(input_ids=ids)
    hook.remove()
    q, k, _ = torch.nn.functional.linear(kept["h"].double(), attn.in_proj_weight.double(),
                                         attn.in_proj_bias.double()).split(attn.embed_dim, -1)
    q, k = (t.view(1, 10, attn.num_heads, -1).transpose(1, 2) for t in (q, k))
    logits = (q @ k.transpose(-1, -2)) / math.sqrt(attn.head_dim)
    want = logits.masked_fill(torch.ones(10, 10, dtype=torch.bool).triu(1), -math.inf).softmax(-1)
    torch.testing.assert_close(capture.maps[0].double(), want, atol=5e-6, rtol=0)
    report = tmp_path / "mha.json"
    code = main(["analyze", "byo_models:build_mha", "--checkpoint", str(checkpoint), "--tokenizer", "ids",
                 "--text", "5 9 12 3 3 40 7 7 1 2", "--json", str(report)])
    assert code == 0, capsys.readouterr().err
    assert json.loads(report.read_text())["num_layers"] == 2


def test_safetensors_yaml_and_python_configs(trained, tmp_path):
    from safetensors.torch import save_file

    model, _, _, _ = trained
    weights = tmp_path / "model.safetensors"
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied to wte
    save_file(state, str(weights))
    yaml_config = tmp_path / "cfg.yaml"
    yaml_config.write_text("".join(f"{k}: {v}\n" for k, v in NANOGPT.items()))
    python_config = tmp_path / "settings.py"
    python_config.write_text("from dataclasses import dataclass\n\n@dataclass\nclass Config:\n"
                             + "".join(f"    {k}: {type(v).__name__} = {v!r}\n" for k, v in NANOGPT.items()))
    ids = torch.randint(0, 1024, (1, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = model(ids, ids)[0]
        for config in (yaml_config, python_config, f"{python_config}:Config"):
            loaded = load_model("byo_models:build", checkpoint=str(weights), config=str(config), tokenizer="reference")
            assert torch.equal(loaded.model(input_ids=ids).logits, want), config
        # the class itself, written for a dataclass config, takes the JSON config (keys read as attributes)
        json_config = tmp_path / "cfg.json"
        json_config.write_text(json.dumps({**NANOGPT, "bias": True, "flash": True}))  # GPTConfig's defaults, spelled out
        loaded = load_model("byo_models:GPT", checkpoint=str(weights), config=str(json_config), tokenizer="reference")
        assert torch.equal(loaded.model(input_ids=ids).logits, want)
        json_config.write_text(json.dumps(NANOGPT))  # a raw dict has no dataclass defaults: named in one line
        with pytest.raises(UserError, match="byo_models:GPT raised AttributeError: the config has no 'bias'"):
            load_model("byo_models:GPT", checkpoint=str(weights), config=str(json_config), tokenizer="reference")


def test_json_config_reads_as_keys_and_as_attributes():
    config = ConfigDict.of({"n_embd": 32, "inner": {"depth": 2}})
    assert config["n_embd"] == config.n_embd == 32 and config.inner.depth == 2
    with pytest.raises(AttributeError):
        config.missing


# --------------------------------------------------------------------------- bad input: one line, exit 2
BROKEN_MODULE = '''
import torch
def build(config=None):
    raise ValueError("n_head must divide n_embd")
def not_a_model(config=None):
    return 42
'''


@pytest.mark.parametrize("case", [
    "factory missing", "module missing", "factory raises", "factory returns no module", "another model's checkpoint",
    "shape mismatch", "pickle refused", "config not JSON", "config not YAML", "config mapping missing",
    "checkpoint missing", "checkpoint garbage", "options with a built-in", "no tokenizer", "words for ids",
    "class needs a config",
])
def test_bad_input_is_one_line_and_exit_2(case, trained, tmp_path, capsys, monkeypatch):
    model, checkpoint, config, _ = trained
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the CLI puts the current directory on the path
    monkeypatch.setitem(sys.modules, "broken_models", None)  # imported afresh from this test's directory
    del sys.modules["broken_models"]
    (tmp_path / "broken_models.py").write_text(BROKEN_MODULE)
    spec, opts, text = "byo_models:build", ["--checkpoint", str(checkpoint), "--tokenizer", "reference"], ["--text", "and God said"]
    if case == "factory missing":
        spec, expected = "byo_models:biuld", "has no 'biuld' (it has build"
    elif case == "module missing":
        spec, expected = "no_such_models:build", "cannot import module 'no_such_models'"
    elif case == "factory raises":
        spec, expected = "broken_models:build", "raised ValueError: n_head must divide n_embd"
    elif case == "factory returns no module":
        spec, expected = "broken_models:not_a_model", "returned an object of type int, not a torch.nn.Module"
    elif case == "another model's checkpoint":
        other = tmp_path / "mha.pt"
        torch.save(build_mha().state_dict(), other)
        opts[1], expected = str(other), "does not fit the model byo_models:build builds:"
    elif case == "shape mismatch":
        wide = tmp_path / "wide.json"
        wide.write_text(json.dumps({**NANOGPT, "n_embd": 64}))
        opts += ["--config", str(wide)]
        expected = "shape mismatch"
    elif case == "pickle refused":
        pickled = tmp_path / "whole_model.pt"
        torch.save(model, pickled)  # the whole module: unpickling it would run code
        opts[1], expected = str(pickled), "needs byo_models.GPT to load, which torch.load(weights_only=True) refuses"
    elif case == "config not JSON":
        bad = tmp_path / "cfg.json"
        bad.write_text('{"n_layer": 2,, }')
        opts += ["--config", str(bad)]
        expected = "is not valid JSON"
    elif case == "config not YAML":
        bad = tmp_path / "cfg.yaml"
        bad.write_text("n_layer: [2\nn_head: 4\n")
        opts += ["--config", str(bad)]
        expected = "is not valid YAML"
    elif case == "config mapping missing":
        bad = tmp_path / "settings.py"
        bad.write_text("width = 3\n")
        opts += ["--config", str(bad)]
        expected = "defines none of config, CONFIG, cfg, Config"
    elif case == "checkpoint missing":
        opts[1], expected = str(tmp_path / "nope.pt"), "does not exist"
    elif case == "checkpoint garbage":
        garbage = tmp_path / "garbage.pt"
        garbage.write_bytes(b"not a checkpoint at all")
        opts[1], expected = str(garbage), "cannot read checkpoint"  # not "a pickle that needs ..."
    elif case == "options with a built-in":
        spec, expected = "reference", "go with a MODEL of your own"
    elif case == "no tokenizer":
        opts, expected = ["--checkpoint", str(checkpoint)], "needs --tokenizer"
    elif case == "words for ids":
        opts[-1], expected = "ids", "'and' is not one"
    elif case == "class needs a config":
        plain = tmp_path / "plain.pt"
        torch.save(model.state_dict(), plain)  # weights alone: no model_args to build from
        spec, opts[1], expected = "byo_models:GPT", str(plain), "byo_models:GPT needs a config (its parameter 'config')"
    code = main(["analyze", spec, *opts, *text])
    line = _one_line_error(capsys)
    assert code == 2, line
    assert expected in line, line


def test_pickle_refusal_says_how_to_save_weights_instead(trained, tmp_path, capsys):
    model, _, _, _ = trained
    pickled = tmp_path / "whole_model.pt"
    torch.save(model, pickled)
    assert main(["validate", "byo_models:build", "--checkpoint", str(pickled), "--tokenizer", "reference",
                 "--text", "and God said"]) == 2
    line = _one_line_error(capsys)
    assert "attnkit does not run pickled code" in line and "torch.save(model.state_dict()" in line


def test_help_says_user_code_is_imported_and_pickles_are_not_run(capsys):
    with pytest.raises(SystemExit):
        from attnkit.cli.main import build_parser

        build_parser().parse_args(["validate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "module.path:factory" in text and "runs its code" in text
    assert "weights_only=True" in text and "pickled code is never run" in text
