"""``attnkit analyze --dataset`` under torchrun on GPUs: ``--device auto`` puts each process on its own
GPU (cuda:LOCAL_RANK), the statistics are pooled with NCCL (gloo beside it for Python objects),
and the report equals one process's on the whole dataset on one GPU. Needs two CUDA devices."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' shared helpers

from attnkit.cli.main import main  # noqa: E402
from test_analyze_torchrun import TEXTS, assert_same  # noqa: E402
from torchrun_helpers import needs_torchrun, torchrun_attnkit  # noqa: E402

pytestmark = [needs_torchrun, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")]


def test_two_gpus_report_what_one_gpu_reports_on_the_whole_dataset(tmp_path):
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(TEXTS * 4) + "\n")
    args = ["analyze", "reference", "--dataset", str(data), "--batch-size", "4", "--dtype", "float32"]
    proc = torchrun_attnkit([*args, "--device", "auto", "--json", str(tmp_path / "pooled.json")])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert main([*args, "--device", "cuda:0", "--json", str(tmp_path / "whole.json")]) == 0
    pooled = json.loads((tmp_path / "pooled.json").read_text())
    whole = json.loads((tmp_path / "whole.json").read_text())
    assert pooled["processes"] == 2 and pooled["sequences"] == len(TEXTS) * 4
    assert_same(pooled, whole, "report")
