"""The console report of ``attnkit analyze``: a layer x head grid, then the issues."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from attnkit.analyze.diagnose import ISSUE_LETTERS
from attnkit.analyze.run import Analysis

SEVERITY_STYLE = {"error": "bold white on red", "warning": "black on yellow", "info": "cyan"}


def render_analysis(a: Analysis, console: Console) -> None:
    dtype = str(a.dtype).replace("torch.", "")
    sampled = f", statistics on {a.sample_rows} sampled query rows per call" if a.sample_rows else ""
    console.print(f"[bold]attnkit analyze[/bold] · {a.model} · {a.tokens} tokens × batch {a.batch} · {dtype}{sampled}")
    if a.mitigations:
        console.print("config already has: " + "; ".join(m.detail for m in a.mitigations))
    by_head: dict[tuple[int, int], list] = {}
    for issue in a.issues:
        if issue.layer is not None and issue.head is not None:
            by_head.setdefault((issue.layer, issue.head), []).append(issue)
    num_heads = max(h["head"] for h in a.heads) + 1
    # A caption line, not a table title: rich wraps titles to the table's width (4 heads = 4 lines).
    console.print("normalised entropy per head (1 = uniform, 0 = one key); letters mark issues")
    table = Table(show_lines=False, header_style="bold")
    table.add_column("layer", justify="right")
    for head in range(num_heads):
        table.add_column(str(head), justify="center")
    cells = {(h["layer"], h["head"]): h for h in a.heads}
    for layer in a.layers:
        row = [str(layer)]
        for head in range(num_heads):
            h = cells.get((layer, head))
            if h is None:
                row.append(Text("·", style="dim"))
                continue
            found = by_head.get((layer, head), [])
            value = h["normalized_entropy"]
            label = "nan" if value != value else f"{value:.2f}"
            if found:
                worst = found[0]  # issues come sorted most severe first
                letters = "".join(sorted({ISSUE_LETTERS[i.type] for i in found}))
                row.append(Text(f"{label}{letters}", style=SEVERITY_STYLE[worst.severity]))
            else:
                row.append(Text(label))
        table.add_row(*row)
    console.print(table)
    console.print("[dim]" + "  ".join(f"{v}={k}" for k, v in ISSUE_LETTERS.items()) + "[/dim]")
    if not a.issues:
        console.print("[green]✓ no issues found[/green]")
        return
    counts = {s: sum(1 for i in a.issues if i.severity == s) for s in ("error", "warning", "info")}
    console.print(f"[bold]{len(a.issues)} issues[/bold]: {counts['error']} errors, {counts['warning']} warnings, {counts['info']} info")
    for issue in a.issues:
        if issue.severity == "info":
            continue
        style = {"error": "red", "warning": "yellow"}[issue.severity]
        console.print(f"[{style}]{issue.severity:>7}[/{style}] [bold]{issue.type}[/bold]: {issue.message}", highlight=False)
        console.print(f"         → {issue.suggestion}", highlight=False)
        for m in issue.mitigations:
            console.print(f"         [dim]already present: {m}[/dim]", highlight=False)
    # Info findings are many and alike (every trained LM has sinks): one line per type.
    infos: dict[str, list] = {}
    for issue in a.issues:
        if issue.severity == "info":
            infos.setdefault(issue.type, []).append(issue)
    for kind, found in infos.items():
        where = ", ".join(f"L{i.layer}H{i.head}" if i.head is not None else f"L{i.layer}" for i in found)
        console.print(f"[cyan]   info[/cyan] [bold]{kind}[/bold] in {len(found)} heads: {where}", highlight=False)
        console.print(f"         e.g. {found[0].message}", highlight=False)
        console.print(f"         → {found[0].suggestion}", highlight=False)
