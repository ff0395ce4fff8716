"""``bench/gpu_check.py`` itself, on the CPU: its plan keeps within the 8 minutes it promises, bad
arguments are refused, and a run of two parts (``--device cpu --quick``: the same checks ``tests/gpu``
asserts on CUDA) writes its JSON and markdown whole, a failing check recorded rather than raised."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_plan_keeps_within_eight_minutes(gpu_check, capsys):
    assert gpu_check.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in gpu_check.PARTS)
    for quick in (False, True):
        budgets = [p.quick_budget_s if quick else p.budget_s for p in gpu_check.PARTS.values()]
        assert sum(budgets) <= gpu_check.TOTAL_BUDGET_S


@pytest.mark.parametrize("argv", [["--parts", "maps,nothing"], ["--device", "tpu"],
                                  ["--device", "cpu", "--write-benchmarks"]])
def test_bad_arguments_are_refused(gpu_check, argv, capsys):
    with pytest.raises(SystemExit) as info:
        gpu_check.main([*argv, "--dry-run"])
    assert info.value.code == 2


def test_cpu_run_writes_json_and_markdown(gpu_check, tmp_path, monkeypatch):
    import device_checks

    js, md = tmp_path / "out.json", tmp_path / "out.md"
    argv = ["--device", "cpu", "--quick", "--parts", "statistics,training", "--json", str(js), "--markdown", str(md)]
    assert gpu_check.main(argv) == 0
    doc = json.loads(js.read_text())
    assert list(doc["parts"]) == ["statistics", "training"]
    assert doc["parts"]["statistics"]["passed"] == 3 and doc["parts"]["statistics"]["failed"] == 0
    (training,) = doc["parts"]["training"]["items"].values()
    assert training["ok"] and training["modified_kernel"] == "dense"
    start, end = gpu_check.markers(gpu_check.BLOCK)
    text = md.read_text()
    assert text.startswith(start) and text.rstrip().endswith(end) and "soft-capped through the dense kernel" in text

    def broken(*_args, **_kwargs):
        raise AssertionError("planted difference")

    monkeypatch.setattr(device_checks, "statistics_case", broken)
    assert gpu_check.main([*argv[:4], "statistics", *argv[5:]]) == 1
    doc = json.loads(js.read_text())
    assert doc["parts"]["statistics"]["failed"] == 3
    assert "planted difference" in md.read_text()
