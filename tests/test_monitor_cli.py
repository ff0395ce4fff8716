"""``attnkit monitor report RUN_DIR``: figures from a run's JSONL; bad input exits 2."""

from __future__ import annotations

import json

import torch

from attnkit.cli.main import main
from attnkit.monitor.report import read_run
from monitor_helpers import monitored_run as _run


def test_report_writes_pngs_from_the_jsonl(tmp_path, capsys):
    _run(tmp_path / "run")
    run = read_run(tmp_path / "run")
    assert run.steps == [0, 2, 4, 6] and run.metrics["entropy"].shape == (4, 4)
    steps = [json.loads(line) for line in (tmp_path / "run" / "monitor.jsonl").read_text().splitlines()
             if '"type": "step"' in line]
    assert run.metrics["entropy"][2].tolist() == steps[2]["metrics"]["entropy"]
    assert {i["issue"] for i in run.issues} == {"entropy_collapse"} and run.interventions[0]["step"] == 4
    assert main(["monitor", "report", str(tmp_path / "run"), "--out", str(tmp_path / "figs")]) == 0
    for name in ("entropy_heatmap.png", "max_logit.png", "curvature.png"):
        assert (tmp_path / "figs" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "4 observed steps" in out and "entropy_collapse" in out and "reduce_lr" in out


def test_report_of_a_running_job_skips_a_half_written_last_line(tmp_path):
    _run(tmp_path)
    with open(tmp_path / "monitor.jsonl", "a") as f:
        f.write('{"type": "step", "step": 8, "metr')
    assert read_run(tmp_path).steps == [0, 2, 4, 6]


def test_bad_run_dirs_exit_2(tmp_path, capsys):
    assert main(["monitor", "report", str(tmp_path / "missing")]) == 2
    assert main(["monitor", "report", str(tmp_path)]) == 2  # no monitor.jsonl
    (tmp_path / "monitor.jsonl").write_text('{"type": "meta"}\nnot json\n{"type": "meta"}\n')
    assert main(["monitor", "report", str(tmp_path)]) == 2  # damaged in the middle
    (tmp_path / "monitor.jsonl").write_text('{"type": "meta"}\n')
    assert main(["monitor", "report", str(tmp_path)]) == 2  # no observed step yet
    assert main(["monitor"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "no monitor.jsonl" in err and "damaged" in err and "Traceback" not in err


def test_trace_names_the_first_nonfinite_layer_and_head_of_a_saved_model(tmp_path, capsys):
    from attnkit.common.loading.registry import load_model

    loaded = load_model("reference")
    attn = loaded.model.transformer.h[2].attn
    d, E = attn.head_dim, attn.embed_dim
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # layer 2 head 1: finite q and k whose dot product overflows
        attn.c_attn.weight[:, d:2 * d] = torch.randn(E, d, generator=g) * 1e19
        attn.c_attn.weight[:, E + d:E + 2 * d] = torch.randn(E, d, generator=g) * 1e19
    loaded.model.save_pretrained(tmp_path / "broken")
    loaded.tokenizer.save_pretrained(tmp_path / "broken")
    assert main(["monitor", "trace", str(tmp_path / "broken"), "--text", "In the beginning God created"]) == 1
    out = capsys.readouterr().out
    assert "NaN/Inf first in layer 2 head 1" in out and "overflow" in out
    assert main(["monitor", "trace", "reference", "--text", "In the beginning God created"]) == 0
    assert main(["monitor", "trace", str(tmp_path / "missing")]) == 2
