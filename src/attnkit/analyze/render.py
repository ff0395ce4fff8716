"""The console report of ``attnkit analyze``: a layer x head grid, what it means, the issues, what to do next.

Everything that can carry user text (model names, paths, messages quoting tokens) is printed
as ``rich.text.Text``, never as markup, so ``[red]`` in a path prints as is.

The grid must stay readable at any width: rich squeezes a table that is too wide into
``0.…`` cells, so the heads are split into blocks that each fit the console instead.
Piped output (not a terminal) gets no colour from rich; the letters carry the issues there.
"""

from __future__ import annotations

import math
import shlex

from rich.console import Console
from rich.table import Table
from rich.text import Text

from attnkit.analyze.diagnose import ENTROPY_COLLAPSE_NATS, ISSUE_LETTERS, UNIFORM_NORMALIZED_ENTROPY
from attnkit.analyze.run import Analysis

SEVERITY_STYLE = {"error": "bold white on red", "warning": "black on yellow", "info": "cyan"}
SEVERITY_LABEL_STYLE = {"error": "bold red", "warning": "yellow", "info": "cyan"}
SEVERITY_WIDTH = 7  # "warning"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _cell_label(value: float, letters: str) -> str:
    return (" nan" if value != value else f"{value:4.2f}") + letters


LAYER_HEADER = "layer"


def _grid_blocks(a: Analysis, by_head: dict, width: int) -> list[list[Text]]:
    """The grid as lines of text: one block, or several blocks of heads when one would not fit ``width``.

    Laid out by hand rather than as a rich Table: rich squeezes a table wider than the console
    into ``0.…`` cells, and here every column has the same known width.
    """
    num_heads = max(h["head"] for h in a.heads) + 1
    cells = {(h["layer"], h["head"]): h for h in a.heads}
    # Letters padded to the same count, so that the decimal points line up down a column.
    letter_width = max((len({i.type for i in found}) for found in by_head.values()), default=0)

    def cell(layer: int, head: int) -> Text:
        h = cells.get((layer, head))
        if h is None:
            return Text(" ·  ", style="dim")  # head not selected with --heads
        found = by_head.get((layer, head), [])
        letters = "".join(sorted({ISSUE_LETTERS[i.type] for i in found}))
        label = _cell_label(h["normalized_entropy"], letters)
        return Text(label, style=SEVERITY_STYLE[found[0].severity]) if found else Text(label)  # found[0]: most severe

    rows = {layer: [cell(layer, head) for head in range(num_heads)] for layer in a.layers}
    cell_width = max(4 + letter_width, len(str(num_heads - 1)))
    layer_width = max(len(LAYER_HEADER), *(len(str(layer)) for layer in a.layers))

    def block(heads: range, gap: str) -> list[Text]:
        header = Text(LAYER_HEADER.rjust(layer_width), style="bold")
        for head in heads:
            header.append(gap + str(head).ljust(cell_width), style="bold")
        header.rstrip()
        lines = [header, Text("─" * (layer_width + len(heads) * (len(gap) + cell_width)), style="dim")]
        for layer in a.layers:
            line = Text(str(layer).rjust(layer_width))
            for head in heads:
                line.append(gap)
                line.append_text(rows[layer][head])
                line.append(" " * (cell_width - len(rows[layer][head])))
            line.rstrip()
            lines.append(line)
        return lines

    def fits(gap: str) -> int:
        return max(1, (width - layer_width) // (len(gap) + cell_width))

    # Two spaces between columns when they fit; one space before splitting the heads into blocks.
    gap = "  " if fits("  ") >= num_heads or fits(" ") < num_heads else " "
    blocks = math.ceil(num_heads / fits(gap))
    per_block = math.ceil(num_heads / blocks)  # balanced blocks: 6 + 6 heads, not 9 + 3
    return [block(range(start, min(start + per_block, num_heads)), gap) for start in range(0, num_heads, per_block)]


def _grid_legend(a: Analysis) -> Text:
    """The one line that says how to read the grid."""
    collapse = ENTROPY_COLLAPSE_NATS / math.log(a.tokens) if a.tokens > 1 else 0.0
    return Text(
        "Heads across, layers down; each number is the normalised entropy H/ln n of the head's attention "
        f"(1 = even over all n keys, 0 = all on one key). Healthy: ≈{collapse:.2f} to {UNIFORM_NORMALIZED_ENTROPY:g}; "
        "a letter marks an issue.", style="dim")


def _issue_rows(a: Analysis) -> Table:
    """Issues as a two-column grid: long messages wrap under the message, not under the severity."""
    grid = Table.grid(padding=(0, 1))
    grid.add_column(width=SEVERITY_WIDTH, justify="right", no_wrap=True)
    grid.add_column(overflow="fold")
    for issue in a.issues:
        if issue.severity == "info":
            continue
        body = Text()
        body.append(issue.type, style="bold")
        body.append(f": {issue.message}\n→ {issue.suggestion}")
        for m in issue.mitigations:
            body.append(f"\nalready present: {m}", style="dim")
        grid.add_row(Text(issue.severity, style=SEVERITY_LABEL_STYLE[issue.severity]), body)
    # Info findings are many and alike (every trained LM has sinks): one row per type.
    infos: dict[str, list] = {}
    for issue in a.issues:
        if issue.severity == "info":
            infos.setdefault(issue.type, []).append(issue)
    for kind, found in infos.items():
        where = ", ".join(f"L{i.layer}H{i.head}" if i.head is not None else f"L{i.layer}" for i in found)
        body = Text()
        body.append(kind, style="bold")
        body.append(f" in {_plural(len(found), 'head')}: {where}\ne.g. {found[0].message}\n→ {found[0].suggestion}")
        grid.add_row(Text("info", style=SEVERITY_LABEL_STYLE["info"]), body)
    return grid


def _next_steps(a: Analysis, given_json: bool, model_flags: str = "") -> list[tuple[str, str]]:
    """(what it answers, the command) pairs; the worst head first when there is one to look at.

    ``model_flags``: the options that load the model (--checkpoint ... of a model of your own),
    repeated in every command so that each runs as printed."""
    model = shlex.quote(a.model) + (f" {model_flags}" if model_flags else "")
    steps = []
    worst = next((i for i in a.issues if i.severity != "info" and i.head is not None), None)
    if worst is not None:
        steps.append((f"look at {worst.where} first ({worst.type}): all its statistics",
                      f"attnkit analyze {model} --layers {worst.layer} --heads {worst.head} --json -"))
    steps.append(("is attention correct and does it help? nine checks and an ablation",
                  f"attnkit validate {model} --html report.html"))
    if not given_json:
        steps.append(("every statistic of every head (schema: docs/reference/schemas.md)", f"attnkit analyze {model} --json report.json"))
    return steps


def render_analysis(a: Analysis, console: Console, *, given_json: bool = False, model_flags: str = "") -> None:
    """Print ``a`` to ``console``; ``given_json`` leaves out the hint to write the JSON the user already asked for;
    ``model_flags`` are repeated in the suggested commands."""
    dtype = str(a.dtype).replace("torch.", "")
    header = Text()
    header.append("attnkit analyze", style="bold")
    if a.sequences > 1 or a.processes > 1:  # pooled over sequences (or processes): say what the statistics rest on
        ranks = f" over {a.processes} processes" if a.processes > 1 else ""  # torchrun: each its share, pooled
        header.append(f" · {a.model} · {_plural(a.sequences, 'sequence')}{ranks}, {a.rows:,} query rows "
                      f"(longest {a.tokens} tokens) · {dtype}")
    else:
        header.append(f" · {a.model} · {a.tokens} tokens × batch {a.batch} · {dtype}")
    if a.sample_rows:
        header.append(f", statistics on {a.sample_rows} sampled query rows per call")
    console.print(header, highlight=False)
    if a.truncated:
        console.print(Text(f"{_plural(a.truncated, 'text')} of {a.sequences} cut to {a.seq_len} tokens "
                           "(--seq-len; the model's maximum unless given)"), highlight=False)
    widths = [h["entropy_ci95"][1] - h["entropy_ci95"][0] for h in a.heads if h.get("entropy_ci95")]
    if widths:
        console.print(Text(f"95% interval of each head's mean entropy over the sequences: ±{max(widths) / 2:.3f} nats "
                           "at most (entropy_ci95 in the JSON)", style="dim"), highlight=False)
    if a.mitigations:
        console.print(Text("config already has: " + "; ".join(m.detail for m in a.mitigations)), highlight=False)
    by_head: dict[tuple[int, int], list] = {}
    for issue in a.issues:
        if issue.layer is not None and issue.head is not None:
            by_head.setdefault((issue.layer, issue.head), []).append(issue)

    console.print()
    console.print(Text("Normalised entropy per head", style="bold"))
    console.print(_grid_legend(a), highlight=False)
    for k, lines in enumerate(_grid_blocks(a, by_head, console.width)):
        if k:
            console.print()  # blocks of heads, when the console is too narrow for all of them
        for line in lines:
            console.print(line, highlight=False, no_wrap=True, overflow="ignore")
    used = [t for t in ISSUE_LETTERS if any(i.type == t for found in by_head.values() for i in found)]
    if used:
        console.print(Text("letters: " + " · ".join(f"{ISSUE_LETTERS[t]} {t}" for t in used), style="dim"), highlight=False)
    if a.gates:  # a model with attnkit.gate gates
        mean = sum(g["mean_gate"] for g in a.gates) / len(a.gates)
        low = sum(g["share_below_0_1"] for g in a.gates) / len(a.gates)
        console.print(Text(f"output gates ({a.gates[0]['kind']}, {len(a.gates)} heads): mean gate {mean:.3f}, "
                           f"share of gates below 0.1 {low:.3f}"), highlight=False)

    if not a.issues:
        console.print(Text("✓ no issues found", style="green"))
    else:
        counts = {s: sum(1 for i in a.issues if i.severity == s) for s in ("error", "warning", "info")}
        console.print()
        console.print(Text(f"{_plural(len(a.issues), 'issue')}: {_plural(counts['error'], 'error')}, "
                           f"{_plural(counts['warning'], 'warning')}, {counts['info']} info", style="bold"))
        console.print(_issue_rows(a), highlight=False)

    console.print()
    console.print(Text("Next steps", style="bold"))
    for what, command in _next_steps(a, given_json, model_flags):  # the question on one line, the command under it
        console.print(Text("  " + what), highlight=False)
        console.print(Text("    " + command, style="bold cyan"), highlight=False, soft_wrap=True)
