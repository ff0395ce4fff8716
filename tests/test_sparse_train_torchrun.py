"""``attnkit sparse train`` under a real ``torchrun --nproc_per_node 2`` (gloo, DistributedDataParallel):
the two ranks, each on half of every global batch, end with the gates one process trains on the whole
batch (up to float rounding), and only rank 0 writes and prints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from attnkit.cli.main import main
from torchrun_helpers import needs_torchrun, torchrun_attnkit

TEXT = "And God said, Let there be light: and there was light. And God saw the light, that it was good. " * 60

ARGS = ["sparse", "train", "reference", "--density", "0.5", "--block-size", "16", "--seq-len", "48", "--batch-size", "4",
        "--steps", "3", "--checkpoint-every", "0", "--map-loss", "0.5", "--lr", "0.02", "--no-progress"]


@needs_torchrun
def test_torchrun_two_ranks_train_the_gates_one_process_trains(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "train.txt").write_text(TEXT)
    corpus = str(tmp_path / "corpus")
    proc = torchrun_attnkit([*ARGS, "--corpus", corpus, "--out", str(tmp_path / "ddp")])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("distilled learned_gate") == 1  # rank 0 only
    assert main([*ARGS, "--corpus", corpus, "--out", str(tmp_path / "one")]) == 0
    ddp = load_file(str(tmp_path / "ddp" / "sparse_gates.safetensors"))
    one = load_file(str(tmp_path / "one" / "sparse_gates.safetensors"))
    # The query projections carry the gradient; the key side starts with an exactly-zero gradient
    # (the query projection is 0) that Adam divides by its own tiny magnitude, so float rounding of
    # the two runs shows there at full size: those are compared through the losses the runs log.
    for k in (k for k in one if k.endswith("q_weight")):
        assert not torch.equal(one[k], torch.zeros_like(one[k]))  # the gates trained
        assert torch.allclose(ddp[k], one[k], atol=1e-5, rtol=1e-3), k
    info = {n: json.loads((tmp_path / n / "train_summary.json").read_text()) for n in ("ddp", "one")}
    assert info["ddp"]["world_size"] == 2 and info["one"]["world_size"] == 1
    for a, b in zip(info["ddp"]["history"], info["one"]["history"]):
        for key in ("loss", "kl", "map_kl"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), (a["step"], key)
