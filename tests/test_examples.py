"""The examples run as they are (a notebook in the percent format is a script too)."""

import runpy
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_analyzer_notebook_runs(capsys):
    scope = runpy.run_path(str(EXAMPLES / "analyzer_notebook.py"))
    analysis = scope["analysis"]
    assert analysis.sequences == 6 and scope["report"]["sequences"] == 6
    assert scope["png"][:8] == b"\x89PNG\r\n\x1a\n"
    assert "data:image/png;base64," in analysis._repr_html_()
    assert "6 sequences" in capsys.readouterr().out
    assert not scope["model"].training  # load_model gives an eval model, and it is left so
