"""A self-contained HTML report: the nine sections, a layer × head entropy grid, attention maps with token labels.

No script, no external file: figures are PNGs inlined as base64 ``data:`` URIs (matplotlib),
tables are plain HTML with inline CSS. Every piece of text that comes from the model or the
data (tokens, the sample text, the model name, messages that quote them) goes through
``html.escape``; token labels inside the PNGs are made safe for matplotlib's mathtext.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import warnings

import numpy as np

from attnkit.validate.run import ValidationReport
from attnkit.validate.types import CRITICAL, INFO, OK, WARN

MAP_TOKENS = 40  # tokens shown on each axis of an attention map
MAP_HEADS = 4  # sharpest heads shown as maps (plus the strongest special-token head, if any)
COLORS = {OK: "#1a7f37", INFO: "#0969da", WARN: "#9a6700", CRITICAL: "#cf222e"}
SYMBOLS = {OK: "✓", INFO: "ℹ", WARN: "⚠", CRITICAL: "✗"}  # glyphs every text font has (no emoji font needed)
CLASS_COLORS = {"sharp": "#1a7f37", "medium": "#bf8700", "uniform": "#cf222e"}

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px auto;max-width:1100px;color:#1f2328;background:#fff}
h1{font-size:24px;margin-bottom:4px} h2{font-size:18px;border-bottom:1px solid #d0d7de;padding-bottom:4px;margin-top:28px}
.meta{color:#57606a} pre{background:#f6f8fa;padding:8px;border-radius:6px;white-space:pre-wrap;font-size:12px}
ul.checks{list-style:none;padding-left:0} ul.checks li{margin:4px 0;padding:4px 8px;border-left:4px solid #d0d7de}
li.ok{border-color:#1a7f37!important} li.info{border-color:#0969da!important} li.warn{border-color:#bf8700!important;background:#fff8c5}
li.critical{border-color:#cf222e!important;background:#ffebe9} .sym{font-weight:bold;margin-right:6px}
table{border-collapse:collapse;font-size:12px;margin:8px 0} td,th{border:1px solid #d0d7de;padding:2px 6px;text-align:right}
th{background:#f6f8fa} td.k{text-align:left;color:#57606a}
.summary{border:2px solid #d0d7de;border-radius:8px;padding:12px 16px;background:#f6f8fa}
.summary.bad{border-color:#cf222e} .summary.good{border-color:#1a7f37}
.grid td{width:26px;height:22px;text-align:center;color:#fff;font-weight:bold;font-size:11px}
.tokens span{display:inline-block;margin:1px;padding:0 3px;border:1px solid #d0d7de;border-radius:3px;font-family:monospace;font-size:11px}
.tokens span.special{background:#ddf4ff;font-weight:bold} .tokens span.punct{background:#fff8c5}
.bar{display:inline-block;height:10px;background:#0969da;vertical-align:middle}
img{max-width:100%} .maps img{max-width:48%;margin:4px}
"""


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _label(tok: str) -> str:
    """A token as a matplotlib tick label: visible whitespace, no mathtext, short."""
    t = tok.replace("\n", "\\n").replace("\t", "\\t").strip() or "␣"
    t = t.replace("$", r"\$")
    return t if len(t) <= 10 else t[:9] + "…"


def _fmt(v) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        return f"{v:.4g}"
    return str(v)


def _scalar_table(figures: dict) -> str:
    rows = [(k, v) for k, v in figures.items() if isinstance(v, (int, float, str, bool)) or v is None]
    if not rows:
        return ""
    body = "".join(f"<tr><td class='k'>{_e(k)}</td><td>{_e(_fmt(v))}</td></tr>" for k, v in rows)
    return f"<table>{body}</table>"


def _entropy_grid_png(report: ValidationReport) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report.section("heads").figures["per_head"]
    layers = sorted({r["layer"] for r in rows})
    heads = max(r["head"] for r in rows) + 1
    grid = np.full((len(layers), heads), np.nan)
    for r in rows:
        grid[layers.index(r["layer"]), r["head"]] = r["normalized_entropy"]
    fig, ax = plt.subplots(figsize=(1.5 + 0.55 * heads, 1.2 + 0.5 * len(layers)))
    im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    letter = {"sharp": "S", "medium": "m", "uniform": "U"}
    for r in rows:
        ax.text(r["head"], layers.index(r["layer"]), letter[r["class"]], ha="center", va="center",
                color="white" if r["normalized_entropy"] < 0.6 else "black", fontsize=8, fontweight="bold")
    ax.set_xticks(range(heads))
    ax.set_yticks(range(len(layers)), [str(x) for x in layers])
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title("normalised entropy H/H_max per head (S sharp, m medium, U uniform)")
    fig.colorbar(im, ax=ax, fraction=0.03)
    return _png(fig)


def _map_png(report: ValidationReport, layer: int, head: int, title: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cap = report.captured
    lv = next(lv for lv in cap.layers if lv.layer == layer)
    n = min(MAP_TOKENS, cap.seq_len)
    probs = lv.probs[0, head, :n, :n].numpy()
    labels = [_label(t) for t in cap.tokens[0][:n]]
    fig, ax = plt.subplots(figsize=(6.5, 6.5))
    ax.imshow(probs, cmap="Blues", vmin=0, vmax=max(float(probs.max()), 1e-6))
    ax.set_xticks(range(n), labels, rotation=90, fontsize=6)
    ax.set_yticks(range(n), labels, fontsize=6)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    ax.set_title(title.replace("$", r"\$"), fontsize=9)
    return _png(fig)


def _chosen_heads(report: ValidationReport) -> list[tuple[int, int, str]]:
    rows = report.section("heads").figures["per_head"]
    ranked = sorted((r for r in rows if not math.isnan(r["normalized_entropy"])), key=lambda r: r["normalized_entropy"])
    chosen = [(r["layer"], r["head"], f"L{r['layer']}H{r['head']}: {r['class']}, H/H_max {r['normalized_entropy']:.2f}")
              for r in ranked[:MAP_HEADS]]
    special = report.section("tokens").figures.get("special_heads") or []
    if special:
        s = special[0]
        if (s["layer"], s["head"]) not in {(c[0], c[1]) for c in chosen}:
            chosen.append((s["layer"], s["head"], f"L{s['layer']}H{s['head']}: {s['mass']:.2f} of its mass on special tokens"))
    if ranked and ranked[-1]["class"] == "uniform":
        r = ranked[-1]
        if (r["layer"], r["head"]) not in {(c[0], c[1]) for c in chosen}:
            chosen.append((r["layer"], r["head"], f"L{r['layer']}H{r['head']}: most uniform, H/H_max {r['normalized_entropy']:.2f}"))
    return chosen


def _class_grid(report: ValidationReport) -> str:
    rows = report.section("heads").figures["per_head"]
    layers = sorted({r["layer"] for r in rows})
    heads = max(r["head"] for r in rows) + 1
    cells = {(r["layer"], r["head"]): r for r in rows}
    out = ["<table class='grid'><tr><th>layer</th>" + "".join(f"<th>{h}</th>" for h in range(heads)) + "</tr>"]
    for layer in layers:
        tds = []
        for h in range(heads):
            r = cells.get((layer, h))
            if r is None:
                tds.append("<td></td>")
                continue
            tds.append(f"<td style='background:{CLASS_COLORS[r['class']]}' title='{_e(r['class'])} "
                       f"{_fmt(r['normalized_entropy'])}'>{_e(r['class'][0].upper())}</td>")
        out.append(f"<tr><th>{layer}</th>{''.join(tds)}</tr>")
    out.append("</table>")
    return "".join(out)


def _token_strip(report: ValidationReport) -> str:
    cap = report.captured
    ids = cap.input_ids[0].tolist()
    spans = []
    for i, tok in zip(ids, cap.tokens[0]):
        cls = "special" if i in cap.special_ids else "punct" if i in cap.punctuation_ids else ""
        spans.append(f"<span class='{cls}'>{_e(tok.replace(chr(10), '⏎'))}</span>")
    return "<div class='tokens'>" + "".join(spans) + "</div>"


def _ablation_table(report: ValidationReport) -> str:
    fig = report.section("ablation").figures
    variants = fig.get("variants", {})
    if not variants:
        return ""
    # Per metric: the number columns, and the bar's width in px (the worst variant is 200 px).
    if fig.get("metric") == "loss":
        worst = max(v["loss"] for v in variants.values()) or 1.0
        columns = [("loss", lambda v: f"{v['loss']:.4f}"), ("perplexity", lambda v: f"{v['perplexity']:.2f}"),
                   ("Δloss", lambda v: f"{v.get('delta_loss', 0.0):+.4f}")]
        bar = lambda v: 200 * v["loss"] / worst  # noqa: E731
    else:
        columns = [("token cosine", lambda v: f"{v['token_cosine']:.4f}"),
                   ("pooled cosine", lambda v: f"{v['pooled_cosine']:.4f}")]
        bar = lambda v: 200 * max(v["pooled_cosine"], 0)  # noqa: E731
    header = "<tr><th>variant</th>" + "".join(f"<th>{name}</th>" for name, _ in columns) + "<th></th><th>pattern</th></tr>"
    rows = "".join(
        f"<tr><td class='k'>{_e(name)}</td>" + "".join(f"<td>{cell(v)}</td>" for _, cell in columns)
        + f"<td class='k'><span class='bar' style='width:{bar(v):.0f}px'></span></td><td class='k'>{_e(v['pattern'])}</td></tr>"
        for name, v in variants.items())
    return f"<table>{header}{rows}</table>"


def render_html(report: ValidationReport) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # missing glyphs for exotic token text
        logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)
        return _render(report)


def _render(report: ValidationReport) -> str:
    cap = report.captured
    s = report.summary
    parts = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
             f"<title>attnkit validate · {_e(report.model)}</title><style>{CSS}</style></head><body>",
             "<h1>Attention validation report</h1>",
             f"<p class='meta'>model <b>{_e(report.model)}</b> ({_e(report.kind)}) · {cap.input_ids.shape[0]} × "
             f"{cap.seq_len} tokens of {_e(report.data_source)}</p>"]
    good = s["critical"] == 0
    parts.append(f"<div class='summary {'good' if good else 'bad'}'><b>Summary</b>: ✓ passed {s['passed']}/{s['tests']} tests · "
                 f"⚠ {s['warnings']} warning{'s' if s['warnings'] != 1 else ''} · ✗ {s['critical']} critical")
    if s["critical_findings"]:
        parts.append("<ul>" + "".join(f"<li>{_e(f['section'])}: {_e(f['message'])}</li>" for f in s["critical_findings"]) + "</ul>")
    parts.append(f"<p><b>Conclusion: {_e(report.conclusion.title)}</b></p><p>"
                 + "<br>".join(_e(x) for x in report.conclusion.lines) + "</p></div>")
    n = len(report.sections)
    for k, sec in enumerate(report.sections, 1):
        parts.append(f"<h2 id='{_e(sec.key)}'>[{k}/{n}] {_e(sec.title)}</h2>")
        if sec.notes:
            # Notes carry the console's ❌, which needs an emoji font the page cannot count on.
            parts.append("<pre>" + _e("\n".join(sec.notes).replace("❌", SYMBOLS[CRITICAL])) + "</pre>")
        parts.append("<ul class='checks'>" + "".join(
            f"<li class='{c.status}'><span class='sym' style='color:{COLORS[c.status]}'>{SYMBOLS[c.status]}</span>{_e(c.message)}</li>"
            for c in sec.checks) + "</ul>")
        if sec.key == "tokens":
            parts.append("<p>First sequence (special tokens in blue, punctuation in yellow):</p>" + _token_strip(report))
        if sec.key == "heads":
            parts.append(f"<img alt='entropy per head' src='{_entropy_grid_png(report)}'>")
            parts.append(_class_grid(report))
            parts.append(f"<p>Attention maps of chosen heads (first sequence, first {min(MAP_TOKENS, cap.seq_len)} tokens; "
                         "rows are queries, columns keys):</p><div class='maps'>")
            for layer, head, title in _chosen_heads(report):
                parts.append(f"<img alt='{_e(title)}' src='{_map_png(report, layer, head, title)}'>")
            parts.append("</div>")
        if sec.key == "ablation":
            parts.append(_ablation_table(report))
        parts.append(_scalar_table(sec.figures))
    parts.append("<p class='meta'>Generated by attnkit validate. Figures are in the JSON report (--json).</p></body></html>")
    return "".join(parts)
