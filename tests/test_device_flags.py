"""--device, --dtype and --device-map on every command that loads a model, through the real CLI.

This machine has no GPU: what is tested is the CPU path (default and explicit), Accelerate's
``device_map="auto"`` on the CPU, and the one-line errors (exit 2) for devices that are not there,
malformed specs and an out-of-memory. The CUDA and MPS branches themselves have not run here.
"""

from __future__ import annotations

import json

import pytest
import torch

from attnkit.cli.main import main
from attnkit.common.loading import device as device_mod
from attnkit.common.loading.device import resolve_device, resolve_dtype

T = ["--text", "In the beginning God created the heaven and the earth."]

# every command that loads a model, with arguments that make one short run on the built-in model
COMMANDS = {
    "analyze": ["analyze", "reference", *T],
    "validate": ["validate", "reference", *T],
    "perplexity": ["perplexity", "reference", "--max-blocks", "1", "--batch-size", "1"],
    "monitor trace": ["monitor", "trace", "reference", *T],
    "gate": ["gate", "reference", "--out", "{tmp}/gated"],  # {tmp}: the test's own directory
}
needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="tests the refusal where CUDA is absent")


def _run(argv, capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# --- the specs themselves (no model)
@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "cpu:0", "mps:1", "", "cuda:-1"])
def test_malformed_device_is_refused(spec):
    with pytest.raises(Exception, match="cannot read --device"):
        resolve_device(spec)


def test_auto_device_is_cpu_without_accelerators(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(device_mod, "_mps_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")


def test_cuda_index_beyond_count_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(Exception, match=r"has 2 CUDA devices \(cuda:0 to cuda:1\)"):
        resolve_device("cuda:7")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


@pytest.mark.parametrize("checkpoint", [torch.bfloat16, torch.float16, "bfloat16", None])
def test_auto_dtype_is_float32_on_cpu_and_the_checkpoints_elsewhere(checkpoint):
    assert resolve_dtype("auto", torch.device("cpu"), checkpoint) == torch.float32
    want = getattr(torch, checkpoint) if isinstance(checkpoint, str) else (checkpoint or torch.float32)
    assert resolve_dtype("auto", torch.device("mps"), checkpoint) == want


# --- through the CLI, by category of command
@needs_no_cuda
@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("spec,message", [
    ("cuda", "CUDA is not available on this machine; use --device cpu"),
    ("cuda:7", "CUDA is not available on this machine; use --device cpu"),
    ("accelerator", "cannot read --device 'accelerator'"),
])
def test_absent_or_malformed_device_is_one_line_exit_2(command, spec, message, tmp_path, capsys):
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in COMMANDS[command]]
    code, _, err = _run([*argv, "--device", spec], capsys)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@needs_no_cuda
def test_check_measure_refuses_an_absent_device(capsys):
    code, _, err = _run(["check", "reference", "--measure", "--device", "cuda"], capsys)
    assert code == 2 and "CUDA is not available" in err and len(err.strip().splitlines()) == 1


def test_check_device_without_measure_is_refused(capsys):
    code, _, err = _run(["check", "reference", "--device", "cpu:3"], capsys)
    assert code == 2 and "--device is for --measure" in err


def test_check_measure_on_explicit_cpu_equals_the_default(tmp_path, capsys):
    a, b = tmp_path / "default.json", tmp_path / "cpu.json"
    assert _run(["check", "reference", "--measure", "--seq-len", "64", "--json", str(a)], capsys)[0] == 0
    assert _run(["check", "reference", "--measure", "--seq-len", "64", "--device", "cpu", "--json", str(b)], capsys)[0] == 0
    assert json.loads(a.read_text()) == json.loads(b.read_text())


@pytest.mark.parametrize("command", ["sparse train", "sparse eval"])
@needs_no_cuda
def test_sparse_commands_refuse_an_absent_device(command, tmp_path, capsys):
    extra = (["--steps", "1"] if command == "sparse train" else []) + ["--out", str(tmp_path / "out")]
    code, _, err = _run([*command.split(), "reference", *extra, "--device", "cuda"], capsys)
    assert code == 2 and "CUDA is not available" in err and len(err.strip().splitlines()) == 1


def test_explicit_cpu_float32_equals_the_default(tmp_path, capsys):
    """The defaults are --device cpu --dtype auto: on the CPU that is float32, the report unchanged."""
    a, b = tmp_path / "default.json", tmp_path / "explicit.json"
    assert _run(["analyze", "reference", *T, "--json", str(a)], capsys)[0] == 0
    assert _run(["analyze", "reference", *T, "--device", "cpu", "--dtype", "float32", "--json", str(b)], capsys)[0] == 0
    assert json.loads(a.read_text()) == json.loads(b.read_text())


def test_gate_takes_the_device_and_dtype_of_every_model_command(tmp_path, capsys):
    """``gate`` converts and reads back on an explicit --device/--dtype, as the other model commands do."""
    out = tmp_path / "gated"
    code, printed, err = _run(["gate", "reference", "--out", str(out), "--device", "cpu", "--dtype", "float32"], capsys)
    assert code == 0, err
    assert "max |output change| at initialisation 0.00e+00" in printed
    code, printed, err = _run(["gate", str(out), "--stats", "--device", "cpu", "--dtype", "float32", *T], capsys)
    assert code == 0, err
    assert "mean gate" in printed


def test_device_map_auto_loads_and_runs_the_reference_model(tmp_path, capsys):
    """Accelerate places the model (all on the CPU here); the statistics equal a plain load's."""
    pytest.importorskip("accelerate")
    a, b = tmp_path / "plain.json", tmp_path / "mapped.json"
    assert _run(["analyze", "reference", *T, "--json", str(a)], capsys)[0] == 0
    assert _run(["analyze", "reference", *T, "--device-map", "auto", "--json", str(b)], capsys)[0] == 0
    plain, mapped = json.loads(a.read_text()), json.loads(b.read_text())
    assert mapped["heads"] == plain["heads"] if "heads" in plain else mapped == plain


def test_float16_runs_on_cpu(capsys):
    """torch computes float16 matmuls on the CPU, so --dtype float16 is accepted there, not refused."""
    code, out, err = _run(["perplexity", "reference", "--max-blocks", "1", "--batch-size", "1", "--dtype", "float16"],
                          capsys)
    assert code == 0, err


@pytest.mark.parametrize("where", ["load", "forward"])
def test_out_of_memory_is_one_line_naming_the_flags(where, monkeypatch, capsys):
    def oom(*_a, **_k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    if where == "load":
        from transformers import AutoModelForCausalLM

        monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", oom)
    else:  # the model loads, and its forward runs out of memory
        from transformers import GPT2LMHeadModel

        monkeypatch.setattr(GPT2LMHeadModel, "forward", oom)
    code, _, err = _run(["analyze", "reference", *T], capsys)
    assert code == 2, err
    assert "out of memory" in err and "--dtype bfloat16" in err and "--device-map auto" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
