"""``attnkit perplexity``: reproduces the card, works on local text, fails with one clear line."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from pathlib import Path

import pytest

import attnkit
from attnkit.cli import perplexity
from attnkit.errors import UserError

RESULTS = json.loads((Path(attnkit.__file__).parent / "models" / "reference" / "eval_results.json").read_text())


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="attnkit")
    perplexity.add_parser(parser.add_subparsers(dest="command"))
    return perplexity.run(parser.parse_args(["perplexity", *argv]))


def test_reproduces_card_slice(tmp_path):
    out = tmp_path / "r.json"
    assert _run(["reference", "--dataset", "kjv", "--split", "test", "--max-blocks", "4", "--json", str(out)]) == 0
    got = json.loads(out.read_text())
    want = RESULTS["perplexity"]["test_first_4_blocks"]
    block = RESULTS["block_size"]
    assert got["blocks"] == 4 and got["tokens"] == want["tokens"] == 4 * (block - 1)
    assert got["perplexity"] == pytest.approx(want["perplexity"], rel=1e-4)
    assert got["split"] == "test" and got["block_size"] == block


def test_defaults_are_reference_on_kjv_test(capsys):
    assert _run(["--max-blocks", "2", "--json", "-"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert (got["model"], got["dataset"], got["split"], got["blocks"]) == ("reference", "kjv", "test", 2)


def test_local_text_file(tmp_path, capsys):
    f = tmp_path / "psalm.txt"
    text = "The LORD is my shepherd; I shall not want.\nHe maketh me to lie down in green pastures.\n" * 20
    f.write_text(text)
    assert _run(["reference", "--dataset", str(f), "--block-size", "64", "--json", "-"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["split"] == "all" and got["block_size"] == 64
    # Independent reference: the model's own loss on the same non-overlapping 64-token blocks.
    import math

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(attnkit.__file__).parent / "models" / "reference"
    tok, model = AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()
    ids = torch.tensor(tok(text)["input_ids"])
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), 64):
            block = ids[start : start + 64][None]
            if block.shape[1] < 2:
                continue
            n = block.shape[1] - 1
            total += model(input_ids=block, labels=block).loss.item() * n
            count += n
    assert got["tokens"] == count
    assert got["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-3)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["reference", "--block-size", "4096"], "longer than the model's context"),
        (["reference", "--split", "dev"], "no split 'dev'"),
        (["reference", "--dataset", "./no/such/file.txt"], "does not exist"),
        (["reference", "--max-blocks", "0"], "--max-blocks"),
        (["./no/such/model"], "does not exist"),
    ],
)
def test_user_errors(argv, message):
    with pytest.raises(UserError, match=message):
        _run(argv)


def _cli_has_perplexity() -> bool:
    try:
        from attnkit.cli import main
    except ImportError:
        return False
    return "perplexity" in Path(main.__file__).read_text()


@pytest.mark.skipif(shutil.which("attnkit") is None or not _cli_has_perplexity(), reason="attnkit CLI entry point not wired yet")
def test_console_script(tmp_path):
    done = subprocess.run(
        ["attnkit", "perplexity", "reference", "--max-blocks", "4", "--json", "-"],
        capture_output=True, text=True, timeout=120, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert got["perplexity"] == pytest.approx(RESULTS["perplexity"]["test_first_4_blocks"]["perplexity"], rel=1e-4)
