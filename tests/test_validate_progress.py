"""`attnkit validate` shows progress on stderr only, and its --help reads as help, not as a docstring.

Rich draws nothing when stderr is not a terminal; ``FORCE_COLOR=1`` makes it draw into the pipe
as it would on a terminal, so these tests see the bar and can check where it went.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from validate_helpers import TEXT, save_tiny

FAST = ["--seq-len", "32", "--sequences", "2", "--ablation-blocks", "4"]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny"))


def _cli(*argv: str, force_terminal: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "NO_COLOR", "TTY_COMPATIBLE")}
    env.update(HF_HUB_OFFLINE="1", COLUMNS="80")
    if force_terminal:
        env["FORCE_COLOR"] = "1"
    return subprocess.run([sys.executable, "-m", "attnkit.cli.main", *argv], capture_output=True, text=True,
                          env=env, timeout=300)


def test_progress_goes_to_stderr_and_json_to_stdout_stays_pure(tiny_dir):
    proc = _cli("validate", str(tiny_dir), "--text", TEXT, *FAST, "--json", "-", force_terminal=True)
    assert proc.returncode in (0, 1), proc.stderr
    doc = json.loads(proc.stdout)  # nothing but the JSON document
    assert doc["schema_version"] and doc["sections"]
    err = ANSI.sub("", proc.stderr)
    assert "validating: capturing attention maps" in err and "validating: ablation study" in err
    assert "10/10" in err  # the bar reached its end
    assert "loading" in err


def test_progress_does_not_reach_stdout_when_stdout_is_the_report(tiny_dir):
    proc = _cli("validate", str(tiny_dir), "--text", TEXT, *FAST, force_terminal=True)
    assert proc.returncode in (0, 1), proc.stderr
    out = ANSI.sub("", proc.stdout)
    assert "ATTENTION VALIDATION REPORT" in out
    assert "validating" not in out and "loading" not in out and "━" not in out
    assert "validating: sanity checks" in ANSI.sub("", proc.stderr)


def test_no_progress_and_no_ansi_when_nothing_is_a_terminal(tiny_dir):
    proc = _cli("validate", str(tiny_dir), "--text", TEXT, *FAST, force_terminal=False)
    assert proc.returncode in (0, 1), proc.stderr
    assert "\x1b[" not in proc.stdout and "\x1b[" not in proc.stderr
    assert "validating" not in proc.stdout + proc.stderr


def test_validate_help_is_plain_help():
    proc = _cli("validate", "--help", force_terminal=False)
    assert proc.returncode == 0
    text = proc.stdout
    assert "``" not in text and ":func:" not in text  # no reST
    assert "seed" not in text.lower()  # internal wording
    for section in ("sanity checks", "positional", "token patterns", "statistical tests", "per-head analysis",
                    "query variation", "diversity", "gradient flow", "ablation"):
        assert section in text
    assert "Exit status: 0" in text and "examples:" in text
    assert max(len(line) for line in text.splitlines()) <= 80
