"""The console report, numbered sections, ✓ / ℹ / ⚠ / ❌ lines, a summary and a conclusion.

Every message goes out as plain ``Text`` (no rich markup): token text such as ``[CLS]`` prints as is.
"""

from __future__ import annotations

from rich.console import Console
from rich.text import Text

from attnkit.validate.run import ValidationReport
from attnkit.validate.types import CRITICAL, INFO, OK, SYMBOLS, WARN

RULE, THIN = "=" * 70, "-" * 70
STYLES = {OK: "green", INFO: "cyan", WARN: "yellow", CRITICAL: "bold red"}

# What each step of ``validate`` is doing, as a person would say it (the progress bar's labels).
# Short enough (<= 24 characters) that the bar still fits an 80-column terminal.
STEP_LABELS = {
    "capture": "capturing attention maps",
    "sanity": "sanity checks",
    "positional": "positional patterns",
    "tokens": "token-level patterns",
    "statistics": "statistical tests",
    "heads": "per-head analysis",
    "query_variation": "query-side variation",
    "diversity": "diversity correlation",
    "gradients": "gradient flow (backward)",
    "ablation": "ablation study",
    "done": "writing the report",
}


def _line(console: Console, text: str, style: str | None = None) -> None:
    console.print(Text(text, style=style or ""), highlight=False, soft_wrap=True)


def render_report(report: ValidationReport, console: Console) -> None:
    cap = report.captured
    n = len(report.sections)
    _line(console, RULE)
    _line(console, "ATTENTION VALIDATION REPORT", "bold")
    _line(console, f"{report.model} ({report.kind}) · {cap.input_ids.shape[0]} × {cap.seq_len} tokens of {report.data_source}")
    _line(console, RULE)
    for k, sec in enumerate(report.sections, 1):
        console.print()
        _line(console, f"[{k}/{n}] {sec.title}", "bold")
        _line(console, THIN)
        for note in sec.notes:
            _line(console, f"  {note}")
        for c in sec.checks:
            sym = SYMBOLS[c.status] + ("️ " if c.status == WARN else "")
            t = Text()
            t.append(sym + " ", style=STYLES[c.status])
            t.append(c.message)
            console.print(t, highlight=False, soft_wrap=True)
    s = report.summary
    console.print()
    _line(console, RULE)
    _line(console, "SUMMARY", "bold")
    _line(console, RULE)
    console.print()
    _line(console, f"✓ Passed: {s['passed']}/{s['tests']} tests", "green")
    if s["warnings"]:
        _line(console, f"⚠️  Warnings: {s['warnings']}", "yellow")
    if s.get("inconclusive"):  # verdicts withheld for want of data (attnkit.validate.summary.apply_evidence)
        _line(console, f"ℹ  Inconclusive (too little data): {s['inconclusive']}", "cyan")
    _line(console, f"❌ Critical issues: {s['critical']}", "bold red" if s["critical"] else None)
    for f in s["critical_findings"]:
        _line(console, f"   - {f['section']}: {f['message']}")
    console.print()
    _line(console, THIN)
    _line(console, "CONCLUSION:", "bold")
    _line(console, THIN)
    _line(console, report.conclusion.title, "bold")
    for line in report.conclusion.lines:
        _line(console, f"   {line}")
    _line(console, RULE)
