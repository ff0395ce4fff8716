"""The documentation site builds with no warning (``mkdocs build --strict``), and the README's
links into the repository resolve."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The page "how the code is laid out" is written with the package layout it describes; until it
# is here, the build and the link check stand a one-line page in for it rather than fail on it.
ARRIVES_WITH_THE_LAYOUT = "docs/layout.md"


def test_mkdocs_build_strict_has_no_warning(tmp_path):
    for module, package in (("mkdocs", "mkdocs"), ("material", "mkdocs-material"),
                            ("mkdocstrings_handlers.python", "mkdocstrings[python]")):
        pytest.importorskip(module, reason=f"{package} is not installed (pip install -e '.[docs]')")
    project = ROOT
    if not (ROOT / ARRIVES_WITH_THE_LAYOUT).exists():
        project = tmp_path / "project"
        project.mkdir()
        shutil.copy(ROOT / "mkdocs.yml", project)
        shutil.copytree(ROOT / "docs", project / "docs")
        (project / "src").symlink_to(ROOT / "src")
        (project / ARRIVES_WITH_THE_LAYOUT).write_text("# How the code is laid out\n")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=project, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "NO_MKDOCS_2_WARNING": "1"})
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    warnings = [line for line in log.splitlines() if re.match(r"^(WARNING|ERROR)\b", line)]
    assert not warnings, "\n".join(warnings)
    api = (tmp_path / "site" / "reference" / "api" / "index.html").read_text(encoding="utf-8")
    for documented in ("attnkit.load_model", "attnkit.analyze", "attnkit.sparse", "AttentionMonitor", "sparse_attention"):
        assert documented in api, f"the API reference lost {documented}"


def _relative_links(markdown: str) -> list[str]:
    links = re.findall(r"\]\(([^)\s]+)\)", markdown)
    return [link.split("#", 1)[0] for link in links if not re.match(r"^[a-z]+:|^#", link)]


def test_readme_links_resolve():
    missing = [link for link in _relative_links((ROOT / "README.md").read_text(encoding="utf-8"))
               if not (ROOT / link).exists() and link != ARRIVES_WITH_THE_LAYOUT]
    assert not missing, missing


def test_every_docs_page_is_in_the_nav():
    nav = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    pages = {str(p.relative_to(ROOT / "docs")) for p in (ROOT / "docs").rglob("*.md")}
    listed = set(re.findall(r":\s*([\w./-]+\.md)\s*$", nav, re.M))
    assert pages <= listed, sorted(pages - listed)
    assert listed - pages <= {"layout.md"}, sorted(listed - pages)
