"""`.ci/run` calls exactly the README's second command, then the same suite at the lower bounds, and that
command installs what the tests need."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    section = ROOT.joinpath("README.md").read_text(encoding="utf-8").split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_ci_runs_the_readme_second_command_verbatim():
    first, second = _readme_commands()
    ci_lines = [line.strip() for line in ROOT.joinpath(".ci/run").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]
    # the README's second command, verbatim, then the suite again at every dependency's lower bound
    assert ci_lines[-2:] == [second, ".ci/lower-bounds"]
    assert "export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1" in ci_lines


def test_the_second_command_installs_the_test_extra_with_torch_pinned():
    _, second = _readme_commands()
    assert 'torch==2.13.0 -e ".[test]"' in second and second.endswith("python3 -m pytest")
    pyproject = ROOT.joinpath("pyproject.toml").read_text()
    assert re.search(r'^test = \[.*"pytest', pyproject, re.M)
