"""The paths experiment's pieces: the task, the statistics, the command's errors, and a tiny end-to-end run."""

from __future__ import annotations

import importlib.util
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parents[1] / "experiments" / "paths"


def load(name: str, file: str):
    sys.path.insert(0, str(HERE))
    try:
        spec = importlib.util.spec_from_file_location(name, HERE / file)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(HERE))


task = load("paths_addition_task", "addition_task.py")
run = load("paths_experiment_run", "run.py")


def test_every_solution_is_well_formed_and_rewarded():
    for a, b in task.ALL:
        s = task.solution(a, b)
        assert len(s) == task.COMPLETION_LEN and len(task.prompt(a, b)) == task.PROMPT_LEN
        assert task.reward(task.encode(s), a, b) == 1.0
        assert task.decode(task.encode(s)) == s
    assert task.solution(47, 85) == "7+5=12,4+8+1=13|132;"
    assert task.reward(task.encode("7+5=12,4+8+1=13|131;"), 47, 85) == 0.0
    assert task.reward(task.encode("7+5=12,4+8+1=13;;;;;"), 47, 85) == 0.0  # no marker, no answer


def test_split_is_fixed_and_disjoint():
    train, test = task.split()
    assert len(test) == 256 and len(train) + len(test) == 8100 and not set(train) & set(test)
    assert task.split()[1] == test


def test_sign_flip_test_is_exact():
    assert run.sign_flip_p(np.array([1.0, 1.0, 1.0])) == pytest.approx(0.25)  # 2 of 8 sign patterns as extreme
    d = np.array([0.3, -0.1, 0.2, 0.4])
    brute = np.mean([abs(np.mean(np.array(s) * d)) >= abs(d.mean()) - 1e-12
                     for s in itertools.product([-1, 1], repeat=4)])
    assert run.sign_flip_p(d) == pytest.approx(brute)
    big = np.r_[np.ones(40), np.zeros(60)]
    assert run.sign_flip_p(big) < 1e-3  # 40 of 100 pairs one way, none the other


def test_friedman_matches_textbook_example():
    # 3 blocks x 3 treatments, ranks (1,2,3) in every block: chi2 = 12/(3*3*4) * (3^2 + 6^2 + 9^2) - 3*3*4 = 6
    x = np.array([[1.0, 2.0, 3.0], [0.1, 0.5, 0.9], [5.0, 6.0, 7.0]])
    assert run.friedman_statistic(x) == pytest.approx(6.0)
    assert run.friedman_statistic(np.array([[1.0, 1.0, 2.0], [1.0, 1.0, 2.0]])) == pytest.approx(3.0)  # ties: 1.5,1.5,3
    stat, p = run.friedman_permutation(x, resamples=2000)
    assert stat == pytest.approx(6.0) and p == pytest.approx(1 / 36, abs=0.015)  # (3!)^3 layouts, 6 as extreme


def test_holm():
    adj = run.holm({"a": 0.01, "b": 0.04, "c": 0.03})
    assert adj == {"a": pytest.approx(0.03), "c": pytest.approx(0.06), "b": pytest.approx(0.06)}


@pytest.mark.parametrize("argv, match", [
    (["--variants", "grpo,nope"], "unknown variant"), (["--paths", "1"], "--paths"), (["--seeds", "0"], "--seeds"),
])
def test_bad_arguments_exit_2(argv, match, tmp_path, capsys):
    assert run.main(argv + ["--out", str(tmp_path)]) == 2
    assert match in capsys.readouterr().err


def test_report_only_without_results_exits_2(tmp_path, capsys):
    assert run.main(["--report-only", "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_tiny_end_to_end(tmp_path):
    argv = ["--out", str(tmp_path), "--seeds", "1", "--variants", "grpo,luong", "--warmup-steps", "2",
            "--rl-steps", "2", "--eval-every", "1", "--batch", "2", "--paths", "2"]
    assert run.main(argv) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    assert [r["variant"] for r in doc["runs"]] == ["grpo", "luong"]
    assert all(len(r["evals"]) == 3 and len(r["final_correct"]) == 256 for r in doc["runs"])
    luong = doc["runs"][1]
    assert luong["lam"] == 0.1 and doc["runs"][0]["lam"] == 0.0
    assert "| grpo |" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert run.main(["--report-only", "--out", str(tmp_path)]) == 0
