"""The commands that read a dataset, under a real ``torchrun --nproc_per_node 2`` (gloo on the CPU):
each rank runs its share of the texts or blocks, the statistics are pooled, and rank 0 alone prints
and writes the one report, which equals one process's on the whole dataset: the same head
statistics (up to float rounding), the same sequence and row counts, the same findings. A rank with
no text and an error on one rank neither hang nor change that.

One launch serves every case (starting processes is most of the cost): torchrun runs this file as
a script; each rank joins torchrun's group from its environment (``init_from_env``, as the
commands do) and calls the command line once per case, recording what each call returned and
printed; the tests compare rank 0's reports with one process's.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import sys

import pytest
import torch

from attnkit.cli.main import main
from attnkit.common.distributed import DistEnv, agree, init_from_env, leave_group, rank_share
from attnkit.errors import UserError
from torchrun_helpers import needs_torchrun, torchrun_python

WORLD = 2
# Clearly different lengths (batches are padded), and an odd count: the two shares differ in size.
TEXTS = ["In the beginning God created the heaven and the earth.",
         "Jesus wept.",
         "And the earth was without form, and void; and darkness was upon the face of the deep.",
         "And God said, Let there be light: and there was light.",
         "And God saw the light, that it was good: and God divided the light from the darkness.",
         "And the evening and the morning were the first day.",
         "Amen."]
DATASET_COMMANDS = {  # a command that shares a dataset among the ranks -> its arguments (the data appended)
    "analyze": ["analyze", "reference", "--batch-size", "2", "--dataset"],
    "check_measure": ["check", "reference", "--measure", "--seq-len", "16", "--samples", "5", "--batch-size", "2",
                      "--dataset"],
    "validate_ablation": ["validate", "reference", "--seq-len", "16", "--sequences", "2", "--ablation-blocks", "5",
                          "--batch-size", "2", "--dataset"],
}
NOT_COMPARED = ("seconds", "processes")  # wall-clock times; how many processes pooled


# ----------------------------------------------------------------------- what each rank runs (torchrun)

def _quiet_main(argv: list[str]) -> tuple[int, str, str]:
    """main(argv): its exit code, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


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
    a.all_reduce()  # one process: nothing to pool
    return a.result().to_json()


class _PoisonedTokenizer:
    """The reference tokenizer, failing (as a bad input would) on a text holding "poison"."""

    def __init__(self, tokenizer):
        self.tokenizer, self.pad_token_id = tokenizer, tokenizer.pad_token_id

    def __call__(self, texts, **kw):
        if any("poison" in t for t in texts):
            raise UserError("a text this tokenizer cannot read")
        return self.tokenizer(texts, **kw)


def _fails_while_working(env: DistEnv) -> tuple[str, str]:
    """``analyze_texts`` where only rank 1's share (texts 1, 3, ...) holds a text that fails: what each rank raised."""
    from attnkit.analyze.dataset import analyze_texts
    from attnkit.common.loading.registry import load_model

    loaded = load_model("reference")
    texts = [TEXTS[0], "poison", *TEXTS[2:]]
    try:
        analyze_texts(loaded.model, _PoisonedTokenizer(loaded.tokenizer), texts, batch_size=2, env=env)
    except UserError as e:
        return type(e).__name__, str(e)
    return "nothing", ""


def _rank_main(base: str) -> None:
    torch.set_num_threads(1)
    env = init_from_env()  # torchrun's group, from RANK / WORLD_SIZE / MASTER_ADDR
    try:
        texts, one_text, missing = f"{base}/texts.txt", f"{base}/one.txt", f"{base}/missing.txt"
        runs = {name: _quiet_main([*args, texts, "--json", f"{base}/{name}_pooled.json"])
                for name, args in DATASET_COMMANDS.items()}
        # a dataset smaller than the world: rank 1's share is empty
        runs["one_text"] = _quiet_main([*DATASET_COMMANDS["analyze"], one_text, "--json", f"{base}/one_text_pooled.json"])
        # the same bad path on every rank
        runs["bad_everywhere"] = _quiet_main(["analyze", "reference", "--dataset", missing])
        # a bad path on rank 1 only: rank 0 has loaded its model and waits for the others' word
        runs["bad_on_rank_1"] = _quiet_main(["analyze", "reference", "--dataset", missing if env.rank == 1 else one_text,
                                             "--json", f"{base}/never.json"])
        runs["gated_api"] = _gated_analysis(env)
        runs["fails_while_working"] = _fails_while_working(env)
        with open(f"{base}/rank{env.rank}.json", "w") as f:
            json.dump(runs, f)
    finally:
        leave_group()


# ----------------------------------------------------------------------------------------- the tests

@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """torchrun, two processes: each rank's record of every case (and the files rank 0 wrote)."""
    base = tmp_path_factory.mktemp("ranks")
    (base / "texts.txt").write_text("\n".join(TEXTS) + "\n")
    (base / "one.txt").write_text(TEXTS[0] + "\n")
    proc = torchrun_python(__file__, [str(base)], nproc=WORLD)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return base, [json.loads((base / f"rank{r}.json").read_text()) for r in range(WORLD)]


def assert_same(got, want, where: str = "report") -> None:
    """Equal JSON, numbers up to rounding: the ranks pad their own batches, so their float32 forwards
    round differently (the pooling itself is float64)."""
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


@needs_torchrun
@pytest.mark.parametrize("name", [*DATASET_COMMANDS, "one_text"])
def test_torchrun_two_processes_report_once_what_one_process_reports(ranks, tmp_path, name):
    base, by_rank = ranks
    assert [r[name][0] for r in by_rank] == [0, 0], [r[name][2] for r in by_rank]
    assert by_rank[0][name][1].strip() and not by_rank[1][name][1].strip()  # one console report, from rank 0
    args = DATASET_COMMANDS["analyze" if name == "one_text" else name]
    data = base / ("one.txt" if name == "one_text" else "texts.txt")
    assert main([*args, str(data), "--json", str(tmp_path / "whole.json")]) == 0
    pooled = (base / f"{name}_pooled.json").read_text()
    if name == "validate_ablation":  # the ablation's note says the blocks were shared
        assert pooled.count(", shared among 2 processes") == 1
        pooled = pooled.replace(", shared among 2 processes", "")
    pooled = json.loads(pooled)
    whole = json.loads((tmp_path / "whole.json").read_text())
    assert_same(pooled, whole, name)  # heads, sequences, rows, issues (the findings), ...
    if name == "check_measure":
        assert pooled["measured"]["processes"] == 2 and "processes" not in whole["measured"]
        assert "5 blocks of 16 tokens over 2 processes" in " ".join(by_rank[0][name][1].split())
    if name in ("analyze", "one_text"):
        sequences = 1 if name == "one_text" else len(TEXTS)
        assert pooled["processes"] == 2 and "processes" not in whole
        assert pooled["sequences"] == whole["sequences"] == sequences  # every rank's, not rank 0's share
        assert f"{sequences} sequence{'s' if sequences > 1 else ''} over 2 processes" in " ".join(by_rank[0][name][1].split())


@needs_torchrun
def test_analyzer_all_reduce_pools_a_loop_of_ones_own_gates_included(ranks):
    _, by_rank = ranks
    whole = _gated_analysis(DistEnv())
    assert whole["gates"] and whole["sequences"] == 3
    for rank in by_rank:  # every rank holds the pooled analysis
        assert_same(rank["gated_api"], whole, "gated_api")
        assert rank["gated_api"]["processes"] == 2


@needs_torchrun
def test_a_failure_in_one_ranks_share_stops_every_rank(ranks):
    _, by_rank = ranks
    assert by_rank[1]["fails_while_working"] == ["UserError", "a text this tokenizer cannot read"]
    assert by_rank[0]["fails_while_working"] == ["RankFailed", "rank 1 stopped: a text this tokenizer cannot read"]


@needs_torchrun
@pytest.mark.parametrize("case", ["bad_everywhere", "bad_on_rank_1"])
def test_an_error_on_any_rank_stops_every_rank_with_one_line(ranks, case):
    base, by_rank = ranks
    for rank, (code, _, err) in enumerate(r[case] for r in by_rank):
        assert code == 2, (case, rank, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (case, rank, err)
        assert "missing.txt" in err, (case, rank, err)
    if case == "bad_on_rank_1":
        assert "rank 1 stopped" in by_rank[0][case][2]
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


if __name__ == "__main__":  # one rank of the torchrun launch in ``ranks``
    _rank_main(sys.argv[1])
