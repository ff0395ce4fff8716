"""A self-contained HTML report of ``attnkit validate``, laid out for a person to read.

The page: a verdict at the top, a contents line that shows each section's worst status, then
the nine sections, each with the question it answers, its checks, one figure where a figure
says more than a table (head entropy, attention maps, the loss increase of the ablation,
positional preferences), its key figures under human labels, and the console's detail lines
folded away. Every figure is in the JSON report; the footer says where (or how to get it).

No script, no external file: figures are PNGs inlined as base64 ``data:`` URIs (matplotlib),
CSS is inline. Every piece of text that comes from the model or the data (tokens, the sample
text, the model name, messages that quote them) goes through ``html.escape``; token labels
inside the PNGs are made safe for matplotlib's mathtext.
"""

from __future__ import annotations

import base64
import html
import io
import logging
import math
import warnings
from collections.abc import Callable

import numpy as np

from attnkit import __version__
from attnkit.validate.run import ValidationReport
from attnkit.validate.types import CRITICAL, INFO, OK, WARN, Section

MAP_TOKENS = 24  # tokens on each axis of an attention map: few enough for labels people can read
MAP_HEADS = 4  # sharpest heads shown as maps (plus the strongest special-token head and the most uniform)
DPI = 110
COLORS = {OK: "#1a7f37", INFO: "#0969da", WARN: "#9a6700", CRITICAL: "#cf222e"}
SYMBOLS = {OK: "✓", INFO: "ℹ", WARN: "⚠", CRITICAL: "✗"}  # glyphs every text font has (no emoji font needed)
STATUS_WORDS = {OK: "passed", INFO: "note", WARN: "warning", CRITICAL: "critical"}
STATUS_RANK = {INFO: 0, OK: 1, WARN: 2, CRITICAL: 3}
CLASS_LETTERS = {"sharp": "S", "medium": "M", "uniform": "U"}
KIND_WORDS = {"causal-lm": "causal language model", "encoder": "encoder"}

# Per section: the title a person reads and the question the section answers.
SECTION_TEXT = {
    "sanity": ("Sanity checks", "Is every row of attention weights a probability distribution, "
               "and does a causal model keep its weight off future tokens?"),
    "positional": ("Positional patterns", "Do heads prefer nearby tokens, their own position or the first token?"),
    "tokens": ("Token patterns", "Do repeated tokens, special tokens or punctuation attract more attention than other tokens?"),
    "statistics": ("Statistical tests", "Which heads differ from uniform attention by more than chance?"),
    "heads": ("Heads, one by one", "Which heads are sharp (attend to a few keys), which are uniform (average everything)?"),
    "query_variation": ("Query variation", "Do different tokens attend differently, or does every query look at the same keys?"),
    "diversity": ("Diversity", "Are the hidden states diverse, and is attention selective where they are?"),
    "gradients": ("Gradient flow", "Do the parameters that form queries and keys get a gradient?"),
    "ablation": ("Ablation", "Does attention help? The held-out loss with attention replaced by fixed patterns."),
}

CSS = """
:root{--ink:#1f2328;--muted:#57606a;--line:#d0d7de;--soft:#f6f8fa}
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:var(--ink);background:#fff;line-height:1.45}
main{max-width:1040px;margin:0 auto;padding:28px 32px 40px}
h1{font-size:26px;margin:0 0 4px} .meta{color:var(--muted);margin:0 0 18px}
h2{font-size:20px;margin:0 0 2px;display:flex;align-items:baseline;gap:10px}
h2 .num{color:var(--muted);font-weight:normal;min-width:1.2em}
.badge{font-size:13px;font-weight:600;padding:1px 8px;border-radius:10px;color:#fff}
section.sec{border-top:1px solid var(--line);padding:22px 0 8px}
.question{color:var(--muted);margin:2px 0 12px}
.verdict{border:2px solid var(--line);border-radius:10px;padding:16px 20px;background:var(--soft);margin-bottom:18px}
.verdict.good{border-color:#1a7f37} .verdict.bad{border-color:#cf222e} .verdict.unsure{border-color:#bf8700}
.verdict .title{font-size:20px;font-weight:700;margin:0 0 6px} .verdict p{margin:4px 0}
.counts{display:flex;gap:18px;margin:10px 0 0;font-weight:600}
nav.toc{display:flex;flex-wrap:wrap;gap:6px 16px;margin:0 0 8px;font-size:14px}
nav.toc a{color:var(--ink);text-decoration:none} nav.toc a:hover{text-decoration:underline}
ul.checks{list-style:none;padding-left:0;margin:0 0 12px} ul.checks li{margin:4px 0;padding:5px 10px;border-left:4px solid var(--line);border-radius:2px}
li.ok{border-color:#1a7f37!important} li.info{border-color:#0969da!important}
li.warn{border-color:#bf8700!important;background:#fff8c5} li.critical{border-color:#cf222e!important;background:#ffebe9}
.sym{font-weight:bold;margin-right:8px}
table.kv,table.data{border-collapse:collapse;font-size:14px;margin:8px 0 12px}
table.kv td,table.data td,table.data th{border-bottom:1px solid var(--line);padding:4px 12px 4px 0;text-align:left;vertical-align:top}
table.kv td.v,table.data td.n{text-align:right;font-variant-numeric:tabular-nums}
table.data th{font-weight:600;color:var(--muted)} table.data th.n{text-align:right}
figure{margin:8px 0 14px} figcaption{color:var(--muted);font-size:14px;margin-top:4px}
figure img{max-width:100%;height:auto}
.maps{display:grid;grid-template-columns:repeat(2,minmax(0,1fr));gap:8px 24px}
.maps figure{margin:0} .maps figcaption{color:var(--ink);font-weight:600}
.tokens{line-height:1.9;margin:6px 0 12px}
.tokens span{display:inline-block;margin:1px;padding:0 4px;border:1px solid var(--line);border-radius:3px;font-family:ui-monospace,monospace;font-size:12px;line-height:1.5}
.tokens span.special{background:#ddf4ff;font-weight:bold} .tokens span.punct{background:#fff8c5}
details{margin:6px 0 10px;color:var(--muted)} details summary{cursor:pointer}
details ul{margin:6px 0;padding-left:20px;font-size:14px}
footer{border-top:1px solid var(--line);margin-top:24px;padding-top:10px;color:var(--muted);font-size:14px}
@media (max-width:820px){main{padding:16px} .maps{grid-template-columns:1fr}}
code{font-family:ui-monospace,monospace;font-size:13px;background:var(--soft);padding:1px 4px;border-radius:4px}
"""


def _e(text) -> str:
    """Escaped for HTML, with the console's emoji swapped for glyphs every text font has."""
    plain = str(text).replace("❌", SYMBOLS[CRITICAL]).replace("\ufe0f", "").replace("⚠  ", "⚠ ")
    return html.escape(plain, quote=True)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    _plt().close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure(src: str, alt: str, caption: str) -> str:
    return f"<figure><img alt='{_e(alt)}' src='{src}'><figcaption>{caption}</figcaption></figure>"


def _label(tok: str, limit: int = 8) -> str:
    """A token as a matplotlib tick label: visible whitespace, no mathtext, short."""
    t = tok.replace("\n", "\\n").replace("\t", "\\t").strip() or "␣"
    t = t.replace("$", r"\$")
    return t if len(t) <= limit else t[: limit - 1] + "…"


def _num(v, spec: str = ".4g") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float)):
        return format(v, spec)
    return str(v)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _worst(sec: Section) -> str:
    return max((c.status for c in sec.checks), key=STATUS_RANK.__getitem__, default=INFO)


# ---------------------------------------------------------------- key figures under human labels

Row = tuple[str, str]  # (what a person calls the figure, its value as shown)


def _against_uniform(f: dict, key: str) -> str:
    return f"{_num(f.get(key), '.4f')} (uniform {_num(f.get(key + '_uniform'), '.4f')})"


def _percent(share) -> str:
    return "–" if share is None else f"{100 * share:.1f} %"


def _rows_sanity(f: dict) -> list[Row]:
    rows = [("largest deviation of a row sum from 1", _num(f.get("max_row_sum_error"), ".2e"))]
    if f.get("causal"):
        rows.append(("largest weight on a future token", _num(f.get("max_future_attention"), ".2e")))
    return rows


def _rows_positional(f: dict) -> list[Row]:
    return [
        (f"mean weight on a key within {f.get('window')} positions", _num(f.get("nearby"), ".4f")),
        ("mean weight on a key further away", _num(f.get("far"), ".4f")),
        ("nearby / far", _num(f.get("ratio"), ".2f") + "×"),
        ("weight on the token's own position", _against_uniform(f, "self_mass")),
        ("weight on the first position", _against_uniform(f, "sink_mass")),
        ("local heads", f"{len(f.get('local_heads') or [])} of {len(f.get('head_ratio') or [])}"),
    ]


def _rows_tokens(f: dict) -> list[Row]:
    return [
        ("weight on a repeat of the query's token / on other tokens", _num(f.get("repetition_ratio"), ".2f") + "×"),
        ("weight on special tokens and punctuation / on other tokens", _num(f.get("special_ratio"), ".2f") + "×"),
        ("special tokens in the sample", _percent(f.get("special_token_share"))),
        ("punctuation in the sample", _percent(f.get("punctuation_share"))),
    ]


def _rows_statistics(f: dict) -> list[Row]:
    return [
        ("heads significantly non-uniform", f"{f.get('significant_heads')} of {f.get('heads_tested')}"),
        ("mean normalised entropy H/ln n (1 = uniform, 0 = one key)", _num(f.get("normalized_entropy"), ".3f")),
        ("required margin of 1 − H/ln n over 0", _num(f.get("margin"), "g")),
        ("significance level (per head, Bonferroni)",
         f"{_num(f.get('alpha'), 'g')} ({_num(f.get('bonferroni_threshold'), '.2g')})"),
    ]


def _rows_heads(f: dict) -> list[Row]:
    counts = f.get("counts") or {}
    return [(f"{name} heads", f"{counts.get(name, 0)} of {f.get('total')}") for name in ("sharp", "medium", "uniform")]


def _rows_query_variation(f: dict) -> list[Row]:
    return [
        ("mean L2 distance between two queries' rows (over shared keys)", _num(f.get("mean"), ".4f")),
        ("largest distance", _num(f.get("max"), ".4f")),
        ("between adjacent queries", _num(f.get("adjacent"), ".4f")),
        (f"between queries {f.get('distant_offset')} positions apart", _num(f.get("distant"), ".4f")),
    ]


def _rows_diversity(f: dict) -> list[Row]:
    return [
        ("hidden-state diversity (mean cosine distance)", _num(f.get("hidden_diversity"), ".3f")),
        ("attention non-uniformity 1 − H/ln n", _num(f.get("attention_nonuniformity"), ".3f")),
        ("attention row standard deviation", _num(f.get("attention_row_std"), ".4f")),
        ("correlation over queries of the two", "r = " + _num(f.get("correlation"), ".3f")),
    ]


def _rows_gradients(f: dict) -> list[Row]:
    return [
        ("query/key parameters found", f"{f.get('parameters') or 0:,} in {len(f.get('groups') or [])} groups"),
        ("frozen groups", _num(f.get("frozen_groups"))),
        ("gradient norm of the whole model", _num(f.get("total_grad_norm"), ".3g")),
    ]


# Per section: its key figures under human labels (every figure, by its JSON name, is in --json).
KEY_FIGURES: dict[str, Callable[[dict], list[Row]]] = {
    "sanity": _rows_sanity, "positional": _rows_positional, "tokens": _rows_tokens, "statistics": _rows_statistics,
    "heads": _rows_heads, "query_variation": _rows_query_variation, "diversity": _rows_diversity,
    "gradients": _rows_gradients,
}
# Figures that are sentences, not numbers: shown under the table.
KEY_SENTENCES: dict[str, tuple[str, str]] = {"statistics": ("test", "Test: {}."), "gradients": ("method", "Found as {}.")}


def _key_figures(sec: Section) -> str:
    rows_for = KEY_FIGURES.get(sec.key)
    if rows_for is None or not sec.figures:
        return ""
    body = "".join(f"<tr><td>{_e(label)}</td><td class='v'>{_e(value)}</td></tr>" for label, value in rows_for(sec.figures))
    out = f"<table class='kv'>{body}</table>" if body else ""
    if sec.key in KEY_SENTENCES and sec.figures.get(KEY_SENTENCES[sec.key][0]):
        name, template = KEY_SENTENCES[sec.key]
        out += f"<p class='meta'>{_e(template.format(sec.figures[name]))}</p>"
    return out


def _table(header: list[str], rows: list[list[str]], numeric: set[int]) -> str:
    th = "".join(f"<th class='{'n' if k in numeric else ''}'>{_e(h)}</th>" for k, h in enumerate(header))
    trs = "".join("<tr>" + "".join(f"<td class='{'n' if k in numeric else ''}'>{_e(c)}</td>" for k, c in enumerate(r))
                  + "</tr>" for r in rows)
    return f"<table class='data'><tr>{th}</tr>{trs}</table>"


# ---------------------------------------------------------------- figures


def _entropy_grid(report: ValidationReport) -> str:
    plt = _plt()
    rows = report.section("heads").figures["per_head"]
    layers = sorted({r["layer"] for r in rows})
    heads = max(r["head"] for r in rows) + 1
    grid = np.full((len(layers), heads), np.nan)
    for r in rows:
        grid[layers.index(r["layer"]), r["head"]] = r["normalized_entropy"]
    fig, ax = plt.subplots(figsize=(1.6 + 0.6 * heads, 1.0 + 0.5 * len(layers)))
    im = ax.imshow(grid, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for r in rows:
        value = r["normalized_entropy"]
        ax.text(r["head"], layers.index(r["layer"]), f"{CLASS_LETTERS[r['class']]}\n{value:.2f}", ha="center",
                va="center", color="white" if value < 0.6 else "black", fontsize=8, linespacing=1.1)
    ax.set_xticks(range(heads))
    ax.set_yticks(range(len(layers)), [str(x) for x in layers])
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.tick_params(length=0)
    cbar = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    cbar.set_label("H / ln n", fontsize=9)
    return _png(fig)


def _map(report: ValidationReport, layer: int, head: int) -> str:
    return _png(map_figure(report, layer, head))


def map_figure(report: ValidationReport, layer: int, head: int):
    """One head's attention on the first sequence: queries down, keys across, every token labelled."""
    plt = _plt()
    cap = report.captured
    lv = next(lv for lv in cap.layers if lv.layer == layer)
    n = min(MAP_TOKENS, cap.seq_len)
    probs = lv.probs[0, head, :n, :n].numpy()
    labels = [_label(t) for t in cap.tokens[0][:n]]
    fig, ax = plt.subplots(figsize=(5.4, 5.4))
    ax.imshow(probs, cmap="Blues", vmin=0, vmax=max(float(probs.max()), 1e-6))
    # Key labels stay horizontal: every other one a line higher (the axis is on top), so neighbours do not overlap.
    ax.set_xticks(range(n), [lab if k % 2 == 0 else lab + "\n" for k, lab in enumerate(labels)], fontsize=8)
    ax.set_yticks(range(n), labels, fontsize=9)
    ax.tick_params(length=2)
    ax.xaxis.tick_top()
    ax.set_xlabel("key (attended to)", fontsize=9)
    ax.xaxis.set_label_position("top")
    ax.set_ylabel("query (attending)", fontsize=9)
    return fig


def _chosen_heads(report: ValidationReport) -> list[tuple[int, int, str]]:
    """(layer, head, why) for the maps: the sharpest heads, the strongest special-token head, the most uniform."""
    rows = report.section("heads").figures["per_head"]
    ranked = sorted((r for r in rows if not math.isnan(r["normalized_entropy"])), key=lambda r: r["normalized_entropy"])
    if ranked and all(r["class"] == "uniform" for r in ranked):  # identical maps say nothing more: show one
        r = ranked[0]
        return [(r["layer"], r["head"], f"every head is uniform; the sharpest, H/ln n {r['normalized_entropy']:.2f}")]
    chosen = [(r["layer"], r["head"], f"{r['class']}, H/ln n {r['normalized_entropy']:.2f}") for r in ranked[:MAP_HEADS]]
    taken = {(c[0], c[1]) for c in chosen}
    special = report.section("tokens").figures.get("special_heads") or []
    if special and (special[0]["layer"], special[0]["head"]) not in taken:
        s = special[0]
        chosen.append((s["layer"], s["head"], f"{s['mass']:.2f} of its weight on special tokens"))
        taken.add((s["layer"], s["head"]))
    if ranked and ranked[-1]["class"] == "uniform" and (ranked[-1]["layer"], ranked[-1]["head"]) not in taken:
        r = ranked[-1]
        chosen.append((r["layer"], r["head"], f"the most uniform, H/ln n {r['normalized_entropy']:.2f}"))
    return chosen


def _positional_figure(f: dict) -> str:
    """Observed weight against what uniform attention would give, for the positions the section asks about."""
    if not {"self_mass", "self_mass_uniform", "sink_mass", "sink_mass_uniform"} <= set(f):
        return ""
    plt = _plt()
    names = ["own position", "first position"]
    observed = [f["self_mass"], f["sink_mass"]]
    uniform = [f["self_mass_uniform"], f["sink_mass_uniform"]]
    fig, ax = plt.subplots(figsize=(6.2, 1.9))
    y = np.arange(len(names))
    ax.barh(y - 0.18, observed, height=0.34, color="#0969da", label="this model")
    ax.barh(y + 0.18, uniform, height=0.34, color="#afb8c1", label="uniform attention")
    for k in range(len(names)):
        ax.text(observed[k], y[k] - 0.18, f" {observed[k]:.3f}", va="center", fontsize=8)
        ax.text(uniform[k], y[k] + 0.18, f" {uniform[k]:.3f}", va="center", fontsize=8)
    ax.set_yticks(y, names, fontsize=9)
    ax.invert_yaxis()
    ax.set_xlabel("mean weight a query puts there", fontsize=9)
    ax.set_xlim(0, max(observed + uniform) * 1.25 or 1.0)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(fontsize=8, frameon=False, loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=2)  # above the bars
    return _png(fig)


def ablation_bars(f: dict) -> tuple[list[tuple[str, float, str]], str]:
    """(variant, bar length, note) per replaced pattern, and the axis label.

    A bar is the cost of the replacement *relative to learned attention* (loss increase in nats,
    or 1 − cosine for a model without a language-model head), so it starts at 0; raw losses
    would give bars of nearly equal length.
    """
    variants = {k: v for k, v in (f.get("variants") or {}).items() if k != "learned"}
    bars = []
    if f.get("metric") == "loss":
        learned_ppl = f["variants"]["learned"]["perplexity"]
        for name, v in variants.items():
            d = v.get("delta_loss", 0.0)
            bars.append((name, d, f" {d:+.3f} nats  (perplexity {learned_ppl:.1f} → {v['perplexity']:.1f})"))
        return bars, "loss increase over learned attention (nats per token)"
    for name, v in variants.items():
        d = v.get("output_change", 1.0 - min(v["token_cosine"], v["pooled_cosine"]))
        bars.append((name, d, f" {d:.4f}"))
    return bars, "output change against learned attention (1 − cosine, the lower of token and pooled)"


def _ablation_figure(f: dict) -> str:
    bars, xlabel = ablation_bars(f)
    if not bars:
        return ""
    plt = _plt()
    names = [_label(name.replace("_", " "), 20) for name, _, _ in bars]
    values = [value for _, value, _ in bars]
    fig, ax = plt.subplots(figsize=(7.4, 0.6 + 0.55 * len(names)))
    y = np.arange(len(names))
    ax.barh(y, values, height=0.55, color=["#cf222e" if d > 0 else "#1a7f37" for d in values])
    for k, (_, value, note) in enumerate(bars):
        ax.text(max(value, 0.0), y[k], note, va="center", fontsize=9)
    ax.axvline(0, color="#57606a", linewidth=1)
    ax.set_yticks(y, names, fontsize=10)
    ax.invert_yaxis()
    hi = max(max(values), 0.0)
    ax.set_xlim(min(min(values), 0.0) * 1.1, hi * 1.9 if hi > 0 else 1.0)  # room for the notes
    ax.set_xlabel(xlabel, fontsize=9)
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)


def _ablation_table(f: dict) -> str:
    variants = f.get("variants") or {}
    if not variants:
        return ""
    if f.get("metric") == "loss":
        header = ["attention", "pattern", "loss (nats)", "increase", "perplexity"]
        rows = [[name.replace("_", " "), v["pattern"], f"{v['loss']:.4f}",
                 "" if name == "learned" else f"{v.get('delta_loss', 0.0):+.4f}", f"{v['perplexity']:.2f}"]
                for name, v in variants.items()]
        return _table(header, rows, numeric={2, 3, 4})
    header = ["attention", "pattern", "token cosine", "pooled cosine"]
    rows = [[name.replace("_", " "), v["pattern"], f"{v['token_cosine']:.4f}", f"{v['pooled_cosine']:.4f}"]
            for name, v in variants.items()]
    return _table(header, rows, numeric={2, 3})


def _token_strip(report: ValidationReport) -> str:
    cap = report.captured
    ids = cap.input_ids[0].tolist()
    spans = []
    for i, tok in zip(ids, cap.tokens[0]):
        cls = "special" if i in cap.special_ids else "punct" if i in cap.punctuation_ids else ""
        spans.append(f"<span class='{cls}'>{_e(tok.replace(chr(10), '⏎'))}</span>")
    return "<div class='tokens'>" + "".join(spans) + "</div>"


# ---------------------------------------------------------------- sections


def _section_body(report: ValidationReport, sec: Section) -> list[str]:
    """What goes between a section's checks and its details: its figure and its key figures."""
    cap = report.captured
    f = sec.figures
    out: list[str] = []
    if sec.key == "positional":
        src = _positional_figure(f)
        if src:
            out.append(_figure(src, "weight on own and first position", "Mean weight a query puts on its own "
                               "position and on the first position, against uniform attention over the same keys."))
    elif sec.key == "tokens":
        out.append("<p>The first sequence, token by token (<span style='background:#ddf4ff'>special tokens</span>, "
                   "<span style='background:#fff8c5'>punctuation</span>):</p>" + _token_strip(report))
    elif sec.key == "heads" and f.get("per_head"):
        out.append(_figure(_entropy_grid(report), "normalised entropy per head",
                           f"Normalised entropy H/ln n of each head (1 = weight spread evenly, 0 = all on one key). "
                           f"Letters: S sharp (below {_num(f.get('sharp_below'), 'g')}), M medium, "
                           f"U uniform ({_num(f.get('uniform_above'), 'g')} and above)."))
        n = min(MAP_TOKENS, cap.seq_len)
        out.append(f"<h3>Attention maps</h3><p class='question'>The first {n} tokens of the first sequence; "
                   "each row is a query, each column a key, darker means more weight.</p><div class='maps'>")
        for layer, head, why in _chosen_heads(report):
            out.append(f"<figure><figcaption>Layer {layer}, head {head}: {_e(why)}</figcaption>"
                       f"<img alt='attention map of layer {layer} head {head}' src='{_map(report, layer, head)}'></figure>")
        out.append("</div>")
    elif sec.key == "diversity" and f.get("per_layer"):
        rows = [[str(r["layer"]), f"{r['hidden_diversity']:.3f}", f"{r['attention_nonuniformity']:.3f}",
                 f"{r['attention_row_std']:.4f}"] for r in f["per_layer"]]
        out.append(_table(["layer", "hidden-state diversity", "1 − H/ln n", "row std"], rows, numeric={0, 1, 2, 3}))
    elif sec.key == "gradients" and f.get("layer_grad_norm"):
        rows = [[str(layer), f"{norm:.3e}"] for layer, norm in f["layer_grad_norm"].items()]
        out.append(_table(["layer", "gradient norm of its query/key parameters"], rows, numeric={0, 1}))
    elif sec.key == "ablation":
        src = _ablation_figure(f)
        if src:
            what = ("how much worse the model predicts the held-out text" if f.get("metric") == "loss"
                    else "how far the outputs move")
            out.append(_figure(src, "ablation", f"With attention replaced by each fixed pattern: {what}. "
                               "Longer bars mean attention matters more; a bar left of 0 means the pattern "
                               "does better than the model's own attention."))
        out.append(_ablation_table(f))
        if f.get("blocks"):
            out.append(f"<p class='meta'>Held-out text: {_plural(f['blocks'], 'block')} of {f.get('block_tokens')} tokens "
                       f"from {_e(f.get('data', report.data_source))}.</p>")
    out.append(_key_figures(sec))
    return out


def _section(report: ValidationReport, k: int, sec: Section) -> list[str]:
    title, question = SECTION_TEXT.get(sec.key, (sec.title, ""))
    if sec.key == "ablation" and sec.figures.get("metric") == "cosine":  # no language-model head: no loss
        question = "Does attention help? How far the outputs move with attention replaced by fixed patterns."
    worst = _worst(sec)
    critical = sum(1 for c in sec.checks if c.status == CRITICAL)
    warned = sum(1 for c in sec.checks if c.status == WARN)
    if critical or warned:  # "✗ 1 critical · ⚠ 2 warnings"
        badge = " · ".join(part for part in (f"{SYMBOLS[CRITICAL]} {critical} critical" if critical else "",
                                             f"{SYMBOLS[WARN]} {_plural(warned, 'warning')}" if warned else "") if part)
    else:
        badge = f"{SYMBOLS[worst]} {STATUS_WORDS[worst]}"
    badge_html = f"<span class='badge' style='background:{COLORS[worst]}'>{_e(badge)}</span>"
    out = [f"<section class='sec' id='{_e(sec.key)}'>",
           f"<h2><span class='num'>{k}</span>{_e(title)}{badge_html}</h2>"]
    if question:
        out.append(f"<p class='question'>{_e(question)}</p>")
    out.append("<ul class='checks'>" + "".join(
        f"<li class='{c.status}'><span class='sym' style='color:{COLORS[c.status]}'>{SYMBOLS[c.status]}</span>"
        f"{_e(c.message)}</li>" for c in sec.checks) + "</ul>")
    out.extend(_section_body(report, sec))
    if sec.notes:
        # The console's detail lines, folded: the figures above carry the same numbers.
        notes = "".join(f"<li>{_e(n.strip())}</li>" for n in sec.notes if n.strip())
        out.append(f"<details><summary>All detail lines of this section</summary><ul>{notes}</ul></details>")
    out.append("</section>")
    return out


def render_html(report: ValidationReport, json_path: str | None = None) -> str:
    """The page; ``json_path`` is where the JSON report went (``-`` for stdout), ``None`` when none was written."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # missing glyphs for exotic token text
        logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)
        return _render(report, json_path)


def _footer(report: ValidationReport, json_path: str | None) -> str:
    took = sum(report.seconds.values()) if report.seconds else None
    made = f"Made by attnkit {_e(__version__)} with <code>attnkit validate</code>" + (f" in {took:.1f} s." if took else ".")
    if json_path == "-":
        where = " Every figure of this report was printed as JSON to standard output."
    elif json_path:
        where = f" Every figure of this report is in the JSON report <code>{_e(json_path)}</code>."
    else:
        where = " For every figure as JSON, run the same command with <code>--json report.json</code>."
    return f"<footer>{made}{where}</footer>"


GOOD_CONCLUSIONS = ("healthy", "scenario_1")
BAD_CONCLUSIONS = ("incorrect", "scenario_3")


def _verdict_class(report: ValidationReport) -> str:
    """The verdict box's frame: green for a healthy conclusion, red for critical findings, amber for the rest."""
    if report.summary["critical"] or report.conclusion.id in BAD_CONCLUSIONS:
        return "bad"
    return "good" if report.conclusion.id in GOOD_CONCLUSIONS else "unsure"


def _render(report: ValidationReport, json_path: str | None) -> str:
    cap = report.captured
    s = report.summary
    parts = ["<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
             "<meta name='viewport' content='width=device-width, initial-scale=1'>",
             f"<title>Attention validation · {_e(report.model)}</title><style>{CSS}</style></head><body><main>",
             "<h1>Attention validation report</h1>",
             f"<p class='meta'>Model <b>{_e(report.model)}</b> ({_e(KIND_WORDS.get(report.kind, report.kind))}) · "
             f"{_plural(cap.input_ids.shape[0], 'sequence')} of {cap.seq_len} tokens from {_e(report.data_source)}</p>"]
    parts.append(f"<div class='verdict {_verdict_class(report)}'><p class='title'>{_e(report.conclusion.title)}</p>"
                 + "".join(f"<p>{_e(x)}</p>" for x in report.conclusion.lines))
    parts.append(f"<div class='counts'><span style='color:{COLORS[OK]}'>✓ {s['passed']} of {s['tests']} tests passed</span>"
                 f"<span style='color:{COLORS[WARN]}'>⚠ {s['warnings']} warning{'s' if s['warnings'] != 1 else ''}</span>"
                 f"<span style='color:{COLORS[CRITICAL]}'>✗ {s['critical']} critical</span></div>")
    if s.get("critical_findings"):
        # findings name their section by its console title; the page names it by its own
        titles = {sec.title: SECTION_TEXT.get(sec.key, (sec.title,))[0] for sec in report.sections}
        parts.append("<ul>" + "".join(f"<li>{_e(titles.get(f['section'], f['section']))}: {_e(f['message'])}</li>"
                                      for f in s["critical_findings"]) + "</ul>")
    parts.append("</div>")
    parts.append("<nav class='toc'>" + "".join(
        f"<a href='#{_e(sec.key)}'><span style='color:{COLORS[_worst(sec)]}'>{SYMBOLS[_worst(sec)]}</span> "
        f"{k} {_e(SECTION_TEXT.get(sec.key, (sec.title,))[0])}</a>" for k, sec in enumerate(report.sections, 1)) + "</nav>")
    for k, sec in enumerate(report.sections, 1):
        parts.extend(_section(report, k, sec))
    parts.append(_footer(report, json_path))
    parts.append("</main></body></html>")
    return "".join(parts)
