"""The one parameter-store format (attnkit.common.param_store): directories written by the gate
and sparse-gate writers of earlier releases (tests/fixtures/param_store) load unchanged, re-saving
them gives the same bytes, and every broken directory is one UserError naming the file."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from attnkit.errors import UserError

FIXTURES = Path(__file__).parent / "fixtures" / "param_store"


def _output_gates():
    from conftest import gpt2

    from attnkit.gate import io

    def load(directory):
        model = gpt2()
        io.load_gates(model, directory)
        return model

    def save(model, directory):
        io.save_gates(model, directory)

    def state(model):
        from attnkit.gate.gating import gate_state_dict
        return gate_state_dict(model)

    return io.STORE, load, save, state


def _sparse_gates():
    sys.path.insert(0, str(Path(__file__).parent))
    from test_sparse_core_models import build

    from attnkit.sparse import io

    def load(directory):
        return io.load_gates(build("qwen2"), directory)

    def save(loaded, directory):
        io.save_gates(*loaded, directory)

    def state(loaded):
        return loaded[0].state_dict()

    return io.STORE, load, save, state


STORES = {"gates": _output_gates, "sparse_gates": _sparse_gates}


@pytest.mark.parametrize("name", list(STORES))
def test_files_of_the_earlier_writer_load_and_resave_byte_for_byte(name, tmp_path):
    store, load, save, state = STORES[name]()
    old = FIXTURES / name
    loaded = load(old)
    got = state(loaded)
    with safe_open(str(old / store.weights), framework="pt") as f:  # the file itself, read independently
        assert sorted(got) == sorted(f.keys())
        for key in f.keys():
            assert torch.equal(got[key], f.get_tensor(key)), key
    save(loaded, tmp_path)
    for file in (store.weights, store.header):
        assert (tmp_path / file).read_bytes() == (old / file).read_bytes(), file


BREAKS = {
    "header missing": (lambda d, s: (d / s.header).unlink(), "is missing"),
    "weights missing": (lambda d, s: (d / s.weights).unlink(), "is missing"),
    "header truncated": (lambda d, s: (d / s.header).write_text((d / s.header).read_text()[:40]), "truncated or corrupted"),
    "header of another format": (lambda d, s: (d / s.header).write_text('{"format": "something-else/1"}'), "format"),
    "weights truncated": (lambda d, s: (d / s.weights).write_bytes((d / s.weights).read_bytes()[:100]),
                          "truncated or corrupted"),
}


@pytest.mark.parametrize("name", list(STORES))
@pytest.mark.parametrize("how", list(BREAKS))
def test_a_broken_store_is_one_line_naming_the_file(name, how, tmp_path):
    store, load, _, _ = STORES[name]()
    shutil.copytree(FIXTURES / name, tmp_path / name)
    brk, words = BREAKS[how]
    brk(tmp_path / name, store)
    with pytest.raises(UserError) as e:
        load(tmp_path / name)
    message = str(e.value)
    assert "\n" not in message and words in message
    assert store.weights in message or store.header in message
