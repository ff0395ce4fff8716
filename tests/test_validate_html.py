"""The HTML report reads as a report: human section titles, no internal key names, the ablation as a
difference, legible token labels, a footer that tells the truth about the JSON, everything escaped."""

from __future__ import annotations

import html
import re

import pytest

from attnkit.validate import Options, validate
from attnkit.validate.html import MAP_TOKENS, SECTION_TEXT, ablation_bars, map_figure, render_html
from validate_helpers import TEXT, tiny_gpt2, tokenizer

EVIL = "<script>alert(1)</script>"
OPTIONS = Options(seq_len=32, sequences=2, ablation_blocks=4)


@pytest.fixture(scope="module")
def report():
    tok = tokenizer()
    tok.add_tokens([EVIL, "$x^2$"])  # markup for HTML and for matplotlib's mathtext
    model = tiny_gpt2(tok)
    text = f"The sign said {EVIL} and $x^2$ twice: {EVIL}. " + TEXT
    return validate(model, tok, [text], name="tiny <b>model</b>", options=OPTIONS)


@pytest.fixture(scope="module")
def page(report) -> str:
    return render_html(report, json_path="out/report.json")


def _visible_text(page: str) -> str:
    """What a reader sees: no tags, no attribute values, no inlined images, entities decoded."""
    body = re.sub(r"<style>.*?</style>", " ", page, flags=re.S)
    return html.unescape(re.sub(r"<[^>]+>", " ", body))


def test_sections_carry_human_titles_in_report_order(page):
    headings = [_visible_text(h).split() for h in re.findall(r"<h2>(.*?)</h2>", page)]
    titles = [title for title, _ in SECTION_TEXT.values()]
    assert [" ".join(words[1:1 + len(t.split())]) for words, t in zip(headings, titles)] == titles
    assert [words[0] for words in headings] == [str(k) for k in range(1, 10)]
    text = _visible_text(page)
    for _, question in SECTION_TEXT.values():
        if not question.startswith("Does attention help"):
            assert question in text


def test_no_internal_key_names_in_the_visible_text(page):
    text = _visible_text(page)
    for key in ("max_row_sum_error", "max_future_attention", "self_mass_uniform", "sink_mass", "repetition_ratio",
                "bonferroni_threshold", "significant_heads", "sharp_below", "uniform_above", "distant_offset",
                "hidden_diversity", "attention_nonuniformity", "total_grad_norm", "frozen_groups", "block_tokens",
                "attention_matters", "per_head"):
        assert key not in text, key


def test_token_text_and_the_model_name_are_escaped(page):
    assert "<script" not in page.lower()  # the token is escaped, and the page has no script of its own
    assert html.escape(EVIL) in page
    assert "tiny &lt;b&gt;model&lt;/b&gt;" in page and "<b>model</b>" not in page


def test_self_contained(page):
    assert page.startswith("<!DOCTYPE html>")
    assert not re.search(r"""(src|href)=['"]?(https?:|//)""", page)
    assert "<link" not in page and "@import" not in page and "url(" not in page
    assert page.count("data:image/png;base64,") >= 4  # positional, head grid, attention maps, ablation


def test_ablation_bars_are_the_loss_increase_over_learned_attention(report):
    f = report.section("ablation").figures
    bars, label = ablation_bars(f)
    assert "increase over learned" in label
    assert [name for name, _, _ in bars] == [k for k in f["variants"] if k != "learned"]
    for name, value, note in bars:
        assert value == pytest.approx(f["variants"][name]["loss"] - f["variants"]["learned"]["loss"])
        assert "nats" in note and "perplexity" in note


def test_ablation_bars_for_a_model_without_a_language_model_head():
    figures = {"metric": "cosine", "variants": {
        "learned": {"token_cosine": 1.0, "pooled_cosine": 1.0},
        "uniform": {"token_cosine": 0.6, "pooled_cosine": 0.5, "output_change": 0.5}}}
    bars, label = ablation_bars(figures)
    assert bars == [("uniform", 0.5, " 0.5000")] and "1 − cosine" in label


def test_attention_map_token_labels_are_horizontal_and_readable(report):
    fig = map_figure(report, layer=0, head=0)
    ax = fig.axes[0]
    n = min(MAP_TOKENS, report.captured.seq_len)
    xlabels, ylabels = ax.get_xticklabels(), ax.get_yticklabels()
    assert len(xlabels) == len(ylabels) == n
    for lab in [*xlabels, *ylabels]:
        assert lab.get_rotation() == 0 and lab.get_fontsize() >= 8
    shown = [lab.get_text().strip() for lab in ylabels]
    expected = [t.strip() or "␣" for t in report.captured.tokens[0][:n]]
    assert [s.replace("\\$", "$") for s in shown] == [e if len(e) <= 8 else e[:7] + "…" for e in expected]
    fig.canvas.draw()  # mathtext in a token ($x^2$) must not break the drawing
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_footer_names_the_json_only_when_one_was_written(report, page):
    assert "JSON report <code>out/report.json</code>" in page
    without = render_html(report)
    assert "report.json</code>" not in without.split("<footer>")[1].replace("--json report.json", "")
    assert "run the same command with <code>--json report.json</code>" in without
    to_stdout = render_html(report, json_path="-")
    assert "printed as JSON to standard output" in to_stdout


def test_legend_letters_are_one_case(page):
    text = _visible_text(page)
    assert "S sharp" in text and "M medium" in text and "U uniform" in text
    assert "m medium" not in text


@pytest.fixture(scope="module")
def uniform_report():
    tok = tokenizer()
    model = tiny_gpt2(tok, zero_qk=True)  # attention exactly uniform: critical findings (gradient flow is exact)
    return validate(model, tok, [" ".join([TEXT] * 4)], name="uniform",
                    options=Options(seq_len=32, sequences=2, ablation_blocks=9))


@pytest.fixture(scope="module")
def uniform_page(uniform_report) -> str:
    return render_html(uniform_report)


def _badge(page: str, key: str) -> str:
    section = page[page.index(f"id='{key}'"):]
    return _visible_text(re.search(r"<span class='badge'[^>]*>(.*?)</span>", section).group(1)).strip()


def test_a_failing_page_is_framed_red_and_badges_count_per_status(uniform_report, uniform_page):
    assert uniform_report.summary["critical"] > 0
    assert "<div class='verdict bad'>" in uniform_page
    for sec in uniform_report.sections:
        critical = sum(c.status == "critical" for c in sec.checks)
        warned = sum(c.status == "warn" for c in sec.checks)
        expected = " · ".join(p for p in (f"✗ {critical} critical" if critical else "",
                                          f"⚠ {warned} warning{'s' if warned != 1 else ''}" if warned else "") if p)
        if expected:  # "✗ 1 critical · ⚠ 2 warnings", never "3 criticals"
            assert _badge(uniform_page, sec.key) == expected


def test_console_emoji_become_plain_glyphs(uniform_page):
    # Headless browsers (and many desktops) have no emoji font: ❌ and the emoji selector of ⚠️ show as boxes.
    assert "❌" not in uniform_page and "\ufe0f" not in uniform_page
    assert "✗" in uniform_page and "⚠" in uniform_page
