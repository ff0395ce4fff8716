"""Every attnkit module or command a diagnosis suggests exists (a suggestion once named attnkit.gating, which did not)."""

import importlib
import re
from pathlib import Path

import attnkit
from attnkit.cli.main import COMMANDS

SOURCES = sorted((Path(attnkit.__file__).parent / "analyze").glob("*.py"))


def _strings(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def test_suggested_attnkit_modules_can_be_imported():
    named = {m for p in SOURCES for m in re.findall(r"\battnkit(?:\.[a-z_]+)+", _strings(p))}
    missing = []
    for dotted in sorted(named):
        parts = dotted.split(".")
        # a dotted name is a module, or an attribute of the longest importable prefix
        for cut in range(len(parts), 0, -1):
            try:
                module = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            obj = module
            try:
                for attr in parts[cut:]:
                    obj = getattr(obj, attr)
            except AttributeError:
                missing.append(dotted)
            break
        else:
            missing.append(dotted)
    assert not missing, f"suggestions name attnkit objects that do not exist: {missing}"


def test_suggested_commands_exist():
    named = {m for p in SOURCES for m in re.findall(r"`attnkit ([a-z]+)", _strings(p))}
    assert named <= set(COMMANDS), f"suggestions name commands that do not exist: {sorted(named - set(COMMANDS))}"
