"""``attnkit analyze --dataset`` over several processes (torch.distributed, gloo on the CPU): each
rank analyses its share of the texts, the statistics are pooled, and rank 0 writes the one report,
which equals one process's on the whole dataset: the same head statistics (up to float rounding),
the same sequence and row counts, the same findings. A rank with no text, and an error on one rank,
neither hang nor change that."""

from __future__ import annotations

import contextlib
import io
import json
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from attnkit.cli.main import main
from attnkit.common.distributed import DistEnv, agree, rank_share
from attnkit.common.training.distributed import leave_group
from attnkit.errors import UserError
from torchrun_helpers import needs_torchrun, torchrun_attnkit

WORLD = 2
# Clearly different lengths (batches are padded), and an odd count: the two shares differ in size.
TEXTS = ["In the beginning God created the heaven and the earth.",
         "Jesus wept.",
         "And the earth was without form, and void; and darkness was upon the face of the deep.",
         "And God said, Let there be light: and there was light.",
         "And God saw the light, that it was good: and God divided the light from the darkness.",
         "And the evening and the morning were the first day.",
         "Amen."]


def _report(tmp_path, name: str, texts: list[str], run) -> dict:
    data = tmp_path / f"{name}.txt"
    data.write_text("\n".join(texts) + "\n")
    out = tmp_path / f"{name}.json"
    code = run(["analyze", "reference", "--dataset", str(data), "--batch-size", "2", "--json", str(out)])
    assert code == 0
    return json.loads(out.read_text())


def assert_same_report(pooled: dict, whole: dict, processes: int) -> None:
    """The pooled report is the one-process report: every field, the heads' numbers up to rounding (the
    ranks pad their own batches, so the float32 forwards round differently; the pooling is float64)."""
    assert pooled.pop("processes") == processes and "processes" not in whole
    heads, want_heads = pooled.pop("heads"), whole.pop("heads")
    assert pooled == whole  # sequences, rows, longest, truncated, layers, issues (the findings), ...
    assert len(heads) == len(want_heads) == 16
    for got, want in zip(heads, want_heads):
        assert got.keys() == want.keys()
        for key, value in want.items():
            if isinstance(value, float):
                assert math.isclose(got[key], value, rel_tol=1e-5, abs_tol=1e-6), (got["layer"], got["head"], key)
            elif key == "entropy_ci95" and value is not None:
                assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6)  # rests on every rank's sequences
            else:
                assert got[key] == value, (got["layer"], got["head"], key)


@needs_torchrun
def test_torchrun_two_processes_report_what_one_process_reports_on_the_whole_dataset(tmp_path):
    data = tmp_path / "texts.txt"
    data.write_text("\n".join(TEXTS) + "\n")
    out = tmp_path / "pooled.json"
    proc = torchrun_attnkit(["analyze", "reference", "--dataset", str(data), "--batch-size", "2", "--json", str(out)])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("attnkit analyze") == 1  # one console report, from rank 0
    assert f"{len(TEXTS)} sequences over 2 processes" in proc.stdout
    whole = _report(tmp_path, "whole", TEXTS, main)
    pooled = json.loads(out.read_text())
    assert pooled["sequences"] == len(TEXTS) and whole["sequences"] == len(TEXTS)  # not one rank's share
    assert_same_report(pooled, whole, processes=2)


# ------------------------------------------------------------------ every command that reads a dataset
# Two ranks in one process group (as torchrun would start them), each calling the command line
# several times: what each call returned and printed on stderr is written per rank, and rank 0's
# reports are compared with one process's on the same data.

DATASET_COMMANDS = {  # a command that shares a dataset among the ranks -> its arguments (the data appended)
    "analyze": ["analyze", "reference", "--batch-size", "2", "--dataset"],
    "check_measure": ["check", "reference", "--measure", "--seq-len", "16", "--samples", "5", "--batch-size", "2",
                      "--dataset"],
    "validate_ablation": ["validate", "reference", "--seq-len", "16", "--sequences", "2", "--ablation-blocks", "5",
                          "--batch-size", "2", "--dataset"],
}
NOT_COMPARED = ("seconds", "processes")  # wall-clock times; how many processes pooled


def _quiet_main(argv: list[str]) -> tuple[int, str]:
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = main(argv)
    return code, err.getvalue()


def _dataset_runs(base: str, rank: int) -> dict:
    texts, one_text, missing = f"{base}/texts.txt", f"{base}/one.txt", f"{base}/missing.txt"
    runs = {name: _quiet_main([*args, texts, "--json", f"{base}/{name}_pooled.json"])
            for name, args in DATASET_COMMANDS.items()}
    # a dataset smaller than the world: rank 1's share is empty
    runs["one_text"] = _quiet_main([*DATASET_COMMANDS["analyze"], one_text, "--json", f"{base}/one_text_pooled.json"])
    # the same bad path on every rank
    runs["bad_everywhere"] = _quiet_main(["analyze", "reference", "--dataset", missing])
    # a bad path on rank 1 only: rank 0 has loaded its model and waits for the others' word
    runs["bad_on_rank_1"] = _quiet_main(["analyze", "reference", "--dataset", missing if rank == 1 else one_text,
                                         "--json", f"{base}/never.json"])
    return runs


def _gated_analysis(env: DistEnv) -> dict:
    """``Analyzer`` in a loop of one's own on a model with attnkit gates: this rank's share of three
    forwards, then ``all_reduce`` (one process: all three)."""
    from attnkit.analyze import Analyzer
    from attnkit.gate.gating import add_gates
    from conftest import _ids, gpt2

    model = gpt2()
    add_gates(model, "headwise", init_bias=0.5)
    with Analyzer(model) as a:
        for ids in rank_share(list(_ids(3, 12, seed=3)), env):
            model(input_ids=ids[None])
    if env.distributed:
        a.all_reduce()
    return a.result().to_json()


def _worker(rank: int, rendezvous: str, base: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=WORLD)
    try:
        runs = _dataset_runs(base, rank)
        runs["gated_api"] = _gated_analysis(DistEnv(rank, WORLD))
        with open(f"{base}/rank{rank}.json", "w") as f:
            json.dump(runs, f)
    finally:
        leave_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    base = tmp_path_factory.mktemp("ranks")
    (base / "texts.txt").write_text("\n".join(TEXTS) + "\n")
    (base / "one.txt").write_text(TEXTS[0] + "\n")
    mp.spawn(_worker, args=(str(base / "rendezvous"), str(base)), nprocs=WORLD, join=True)
    return base, [json.loads((base / f"rank{r}.json").read_text()) for r in range(WORLD)]


def assert_same(got, want, where: str = "report") -> None:
    """Equal JSON, numbers up to the rounding of float32 forwards on other batch shapes."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) - set(NOT_COMPARED) == set(want) - set(NOT_COMPARED), where
        for key in want:
            if key not in NOT_COMPARED:
                assert_same(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}[{i}]")
    elif isinstance(want, float) and not isinstance(want, bool):
        assert math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-6), (where, got, want)
    else:
        assert got == want, (where, got, want)


@pytest.mark.parametrize("name", [*DATASET_COMMANDS, "one_text"])
def test_two_ranks_report_once_what_one_process_reports(two_ranks, tmp_path, name):
    base, ranks = two_ranks
    assert [r[name][0] for r in ranks] == [0, 0], [r[name][1] for r in ranks]
    args = DATASET_COMMANDS["analyze" if name == "one_text" else name]
    data = base / ("one.txt" if name == "one_text" else "texts.txt")
    assert main([*args, str(data), "--json", str(tmp_path / "whole.json")]) == 0
    pooled = json.loads((base / f"{name}_pooled.json").read_text())
    whole = json.loads((tmp_path / "whole.json").read_text())
    assert_same(pooled, whole, name)
    if name in ("analyze", "one_text"):
        assert pooled["processes"] == 2 and "processes" not in whole
        assert pooled["sequences"] == whole["sequences"] == (1 if name == "one_text" else len(TEXTS))


def test_analyzer_all_reduce_pools_a_loop_of_ones_own_gates_included(two_ranks):
    _, ranks = two_ranks
    whole = _gated_analysis(DistEnv())
    assert whole["gates"] and whole["sequences"] == 3
    for rank in ranks:  # every rank holds the pooled analysis
        assert_same(rank["gated_api"], whole, "gated_api")
        assert rank["gated_api"]["processes"] == 2


@pytest.mark.parametrize("case", ["bad_everywhere", "bad_on_rank_1"])
def test_an_error_on_any_rank_stops_every_rank_with_one_line(two_ranks, case):
    base, ranks = two_ranks
    for rank, (code, err) in enumerate(r[case] for r in ranks):
        assert code == 2, (case, rank, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (case, rank, err)
        assert "missing.txt" in err, (case, rank, err)
    if case == "bad_on_rank_1":
        assert "rank 1 stopped" in ranks[0][case][1]
        assert not (base / "never.json").exists()  # nothing written when a rank failed


# ----------------------------------------------------------------------------------- in one process

@pytest.mark.parametrize("count", [0, 1, 2, 7])
def test_rank_shares_are_disjoint_and_cover_the_dataset(count):
    items = list(range(count))
    shares = [list(rank_share(items, DistEnv(rank, 3))) for rank in range(3)]
    assert sorted(sum(shares, [])) == items
    assert max(map(len, shares)) - min(map(len, shares)) <= 1  # as even as the count allows
    tensor = torch.arange(count)
    assert [rank_share(tensor, DistEnv(r, 3)).tolist() for r in range(3)] == shares
    assert list(rank_share(items, DistEnv())) == items


def test_agree_alone_is_the_work_itself():
    assert agree(DistEnv(), lambda: 42) == 42
    with pytest.raises(ZeroDivisionError):
        agree(DistEnv(), lambda: 1 / 0)


@pytest.mark.parametrize("argv, message", [
    (["analyze", "reference"], "share a --dataset"),
    (["analyze", "reference", "--dataset", "x.txt", "--device-map", "auto"], "--device-map"),
])
def test_what_torchrun_cannot_run_is_one_line_before_the_group_forms(monkeypatch, capsys, argv, message):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; no group is ever joined
    monkeypatch.setenv("RANK", "1")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("spec", ["auto", "cuda"])
def test_device_under_torchrun_is_this_processs_own_gpu(monkeypatch, spec):
    from attnkit.common.loading.device import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert resolve_device(spec) == torch.device("cuda", 2)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)  # an explicit index is kept
    monkeypatch.setenv("LOCAL_RANK", "5")  # more processes than GPUs on the machine: NCCL would refuse two on one GPU
    with pytest.raises(UserError, match="--nproc-per-node 4 or fewer"):
        resolve_device(spec)
    monkeypatch.delenv("WORLD_SIZE")
    assert resolve_device(spec) == torch.device("cuda")
