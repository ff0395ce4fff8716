"""The package's layers hold: import-linter's contracts in pyproject.toml, and no import circle at all.

``lint-imports`` checks the layers (cli > features > common > seam > metrics > errors), that features
do not import each other but for the listed imports, and that no two sibling packages import each
other. The test below goes one step finer: no circle between any two *modules*, counting imports
inside functions too (those were how circles used to hide).
"""

from __future__ import annotations

import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def _config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]


def test_import_linter_contracts_are_kept(monkeypatch, capsys):
    from importlinter.cli import lint_imports

    monkeypatch.chdir(ROOT)  # lint-imports reads ./pyproject.toml
    monkeypatch.syspath_prepend(str(SRC))  # this checkout's attnkit, not an installed one
    code = lint_imports(no_cache=True, no_logo=True)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "BROKEN" not in out and "0 broken" in out


def test_at_most_two_imports_run_up_a_layer():
    layers = [c for c in _config()["contracts"] if c["type"] == "layers"]
    assert len(layers) == 1 and layers[0]["layers"][0] == "attnkit.cli" and layers[0]["layers"][-1] == "attnkit.errors"
    assert len(layers[0].get("ignore_imports", [])) <= 2


def test_every_package_is_in_a_layer():
    """A new top-level package must take a place in the layers (else the contract says nothing about it)."""
    layered = {name.strip() for layer in [c for c in _config()["contracts"] if c["type"] == "layers"][0]["layers"]
               for name in layer.replace(":", "|").split("|")}
    top = {f"attnkit.{p.stem if p.is_file() else p.name}" for p in (SRC / "attnkit").iterdir()
           if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py" and p.name != "__init__.py")}
    assert top <= layered, f"not in any layer: {sorted(top - layered)}"


def _strongly_connected(graph) -> list[list[str]]:
    """Tarjan's algorithm over grimp's module graph: the groups of modules that import each other."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return groups


def test_no_module_imports_itself_back():
    import grimp

    graph = grimp.build_graph("attnkit", exclude_type_checking_imports=True, cache_dir=None)
    assert "attnkit.seam.attach" in graph.modules
    assert _strongly_connected(graph) == []


def test_a_circle_is_found():
    """The finder itself: a two-module circle and a self-contained chain."""

    class Graph:
        edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
        modules = set(edges)

        def find_modules_directly_imported_by(self, m):
            return self.edges[m]

    assert _strongly_connected(Graph()) == [["a", "b", "c"]]
