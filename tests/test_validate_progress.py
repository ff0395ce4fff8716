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


def _start(*argv: str, force_terminal: bool) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "NO_COLOR", "TTY_COMPATIBLE")}
    env.update(HF_HUB_OFFLINE="1", COLUMNS="80")
    if force_terminal:
        env["FORCE_COLOR"] = "1"
    return subprocess.Popen([sys.executable, "-m", "attnkit.cli.main", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _cli(*argv: str, force_terminal: bool) -> subprocess.CompletedProcess:
    return _finish(_start(*argv, force_terminal=force_terminal))


# The three validate runs below, started together: each is a fresh process that spends most of its
# time importing torch and transformers, so they overlap on the cores instead of queueing.
RUNS = {
    "json_to_stdout": (("--json", "-"), True),
    "report_to_stdout": ((), True),
    "no_terminal": ((), False),
}


@pytest.fixture(scope="module")
def runs(tiny_dir) -> dict[str, subprocess.CompletedProcess]:
    started = {name: _start("validate", str(tiny_dir), "--text", TEXT, *FAST, *extra, force_terminal=terminal)
               for name, (extra, terminal) in RUNS.items()}
    return {name: _finish(proc) for name, proc in started.items()}


def test_progress_goes_to_stderr_and_json_to_stdout_stays_pure(runs):
    proc = runs["json_to_stdout"]
    assert proc.returncode in (0, 1), proc.stderr
    doc = json.loads(proc.stdout)  # nothing but the JSON document
    assert doc["schema_version"] and doc["sections"]
    err = ANSI.sub("", proc.stderr)
    assert "validating: capturing attention maps" in err and "validating: ablation study" in err
    assert "10/10" in err  # the bar reached its end
    assert "loading" in err


def test_progress_does_not_reach_stdout_when_stdout_is_the_report(runs):
    proc = runs["report_to_stdout"]
    assert proc.returncode in (0, 1), proc.stderr
    out = ANSI.sub("", proc.stdout)
    assert "ATTENTION VALIDATION REPORT" in out
    assert "validating" not in out and "loading" not in out and "━" not in out
    assert "validating: sanity checks" in ANSI.sub("", proc.stderr)


def test_no_progress_and_no_ansi_when_nothing_is_a_terminal(runs):
    proc = runs["no_terminal"]
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
