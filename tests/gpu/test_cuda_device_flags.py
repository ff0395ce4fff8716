"""On CUDA: ``--device cuda[:N]`` / ``auto``, ``--dtype auto`` (the checkpoint's dtype on a GPU) and
``--device-map auto`` (Accelerate places the model on the GPU), through ``load_model`` and the CLI;
the report on the GPU equals the report on the CPU."""

from __future__ import annotations

import json

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device (bench/gpu_check.py runs the same checks where there is one)",
                allow_module_level=True)

from attnkit.cli.main import main  # noqa: E402
from attnkit.common.loading.device import model_device, resolve_device, resolve_dtype  # noqa: E402
from attnkit.common.loading.registry import load_model  # noqa: E402

T = ["--text", "In the beginning God created the heaven and the earth."]


def test_cuda_specs_resolve():
    assert resolve_device("cuda").type == "cuda"
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert resolve_device("auto").type == "cuda"
    with pytest.raises(Exception, match="CUDA device"):
        resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_auto_dtype_on_cuda_is_the_checkpoints(tmp_path):
    want = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert resolve_dtype("auto", torch.device("cuda"), torch.bfloat16) == want
    reference = load_model("reference")  # saved again as a bfloat16 checkpoint, with its tokenizer
    reference.model.to(torch.bfloat16).save_pretrained(tmp_path)
    reference.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), device="cuda", dtype="auto")
    assert model_device(loaded.model).type == "cuda"
    assert next(loaded.model.parameters()).dtype == want


def test_device_map_auto_places_the_model_on_the_gpu():
    pytest.importorskip("accelerate")
    loaded = load_model("reference", device_map="auto")
    assert model_device(loaded.model).type == "cuda"


@pytest.mark.parametrize("flags", [["--device", "cuda"], ["--device", "auto"], ["--device-map", "auto"]],
                         ids=["cuda", "auto", "device-map"])
def test_analyze_on_the_gpu_equals_the_cpu(flags, tmp_path, capsys):
    if "--device-map" in flags:
        pytest.importorskip("accelerate")
    cpu, gpu = tmp_path / "cpu.json", tmp_path / "gpu.json"
    assert main(["analyze", "reference", *T, "--json", str(cpu)]) == 0
    assert main(["analyze", "reference", *T, *flags, "--json", str(gpu)]) == 0, capsys.readouterr().err
    want, got = json.loads(cpu.read_text())["heads"], json.loads(gpu.read_text())["heads"]
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        for key, value in w.items():
            if isinstance(value, float):
                assert g[key] == pytest.approx(value, rel=1e-4, abs=1e-5, nan_ok=True), key


def test_gate_converts_on_the_gpu(tmp_path, capsys):
    out = tmp_path / "gated"
    assert main(["gate", "reference", "--out", str(out), "--device", "cuda"]) == 0, capsys.readouterr().err
    assert main(["gate", str(out), "--stats", "--device", "cuda", *T]) == 0
    assert "mean gate" in capsys.readouterr().out
