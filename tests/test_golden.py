"""Every command's output and JSON on the built-in models equals the golden copy in tests/golden/cases.

The goldens were written by ``tests/golden/make_golden.py`` from the code as it was before the
package layout changed; a change that alters what a user sees on purpose regenerates them with that
script and says so in its commit. What is normalised (temporary paths, wall-clock seconds) is listed
in the script's docstring.
"""

from __future__ import annotations

import difflib
import importlib.util
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent / "golden"
_spec = importlib.util.spec_from_file_location("make_golden", HERE / "make_golden.py")
make_golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_golden)


def _stack_differs() -> str | None:
    import json

    recorded = json.loads(make_golden.STACK_FILE.read_text(encoding="utf-8"))
    now = make_golden.installed_stack()
    changed = [f"{name} {recorded.get(name)} -> {now[name]}" for name in make_golden.STACK if recorded.get(name) != now[name]]
    return "; ".join(changed) or None


pytestmark = pytest.mark.skipif(bool(_stack_differs()), reason=f"the goldens were written on another dependency stack "
                                f"({_stack_differs()}): regenerate them there with tests/golden/make_golden.py")


@pytest.fixture(scope="module")
def outputs() -> dict[str, str]:
    return make_golden.run_all()  # one process, one temporary directory: the cases feed each other


def test_every_case_has_a_golden_copy():
    stored = {p.stem for p in (HERE / "cases").glob("*.txt")}
    assert stored == set(make_golden.CASES)


@pytest.mark.parametrize("name", list(make_golden.CASES))
def test_output_equals_the_golden_copy(outputs, name):
    want = (HERE / "cases" / f"{name}.txt").read_text(encoding="utf-8")
    got = outputs[name]
    if not make_golden.same(want, got):
        diff = "".join(list(difflib.unified_diff(want.splitlines(True), got.splitlines(True), "golden", "now"))[:80])
        pytest.fail(f"{name} differs from its golden copy:\n{diff}")
