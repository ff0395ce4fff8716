"""`attnkit validate` end to end: JSON schema, exit status, bad input, the HTML report (escaped, renders in Chromium)."""

import json
import math
import shutil
import subprocess

import numpy as np
import pytest

from attnkit.cli.main import main
from validate_helpers import TEXT, save_tiny

EVIL = "<script>alert(1)</script>"
FAST = ["--seq-len", "32", "--sequences", "2", "--ablation-blocks", "4"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny"), extra_tokens=[EVIL])


@pytest.fixture(scope="module")
def uniform_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("uniform"), zero_qk=True)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "held_out.txt"
    path.write_text(f"The sign said {EVIL} twice: {EVIL}. " + TEXT + "\n" + TEXT, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny_run(tiny_dir, text_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    code = main(["validate", str(tiny_dir), "--text-file", str(text_file), *FAST,
                 "--json", str(out / "report.json"), "--html", str(out / "report.html")])
    return code, json.loads((out / "report.json").read_text()), out / "report.html"


def test_json_has_every_section_and_the_ablation(tiny_run):
    code, doc, _ = tiny_run
    assert doc["schema_version"] == "1.0"
    assert [s["key"] for s in doc["sections"]] == ["sanity", "positional", "tokens", "statistics", "heads",
                                                   "query_variation", "diversity", "gradients", "ablation"]
    assert set(doc["ablation"]) == {"learned", "uniform", "local", "first_token"}
    for v in doc["ablation"].values():
        assert v["perplexity"] == pytest.approx(math.exp(v["loss"]))
        assert v["tokens"] == 4 * 31
    assert doc["data"] == {"source": doc["data"]["source"], "sequences": 2, "seq_len": 32}
    for sec in doc["sections"]:
        for c in sec["checks"]:
            assert c["status"] in {"ok", "info", "warn", "critical"} and c["message"]
    assert doc["summary"]["conclusion"]["id"]
    assert code == doc["exit_status"] == (1 if doc["summary"]["critical"] else 0)


def test_uniform_model_exit_status_1_and_says_uniform(uniform_dir, text_file, capsys):
    assert main(["validate", str(uniform_dir), "--text-file", str(text_file), *FAST, "--json", "-"]) == 1
    captured = capsys.readouterr()
    doc = json.loads(captured.out)  # --json - keeps stdout pure JSON; the report goes to stderr
    assert doc["exit_status"] == 1
    assert doc["summary"]["conclusion"]["id"] == "scenario_2"
    assert abs(doc["ablation"]["uniform"]["loss"] - doc["ablation"]["learned"]["loss"]) < 1e-4
    assert "[9/9] Ablation Study" in captured.err
    assert "Scenario 2" in captured.err and "❌ Critical issues:" in captured.err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--text", "   "], "empty"),
        (["--text-file", "/no/such/file.txt"], "does not exist"),
        (["--seq-len", "4096"], "more than the model takes"),
        (["--seq-len", "2"], "at least 4"),
        (["--sequences", "0"], "at least 1"),
        (["--split", "test"], "--split goes with --dataset"),
        (["--dataset", "/no/such/corpus.txt"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tiny_dir, extra, message, capsys):
    assert main(["validate", str(tiny_dir), *extra]) == 2
    err = capsys.readouterr().err
    assert message in " ".join(err.split())
    assert "Traceback" not in err


def test_missing_model_and_conflicting_sources(capsys):
    assert main(["validate", "/no/such/model"]) == 2
    assert "does not exist" in capsys.readouterr().err
    # argparse's complaint is one line and exit 2 too, not a usage block and SystemExit
    assert main(["validate", "minilm", "--text", "a", "--dataset", "kjv"]) == 2
    err = capsys.readouterr().err
    assert "not allowed with argument --text" in err and len(err.strip().splitlines()) == 1


def test_html_is_self_contained_and_escapes_token_text(tiny_run):
    _, doc, html_path = tiny_run
    page = html_path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>")
    for k, key in enumerate(["sanity", "positional", "tokens", "statistics", "heads", "query_variation", "diversity",
                             "gradients", "ablation"], 1):
        assert f"<section class='sec' id='{key}'><h2><span class='num'>{k}</span>" in page
    assert f"JSON report <code>{html_path.parent / 'report.json'}</code>" in page  # the footer names the JSON written
    assert "<script" not in page.lower()  # the token <script>alert(1)</script> is escaped, and attnkit adds no script
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.count("data:image/png;base64,") >= 3  # entropy grid + attention maps
    assert "src='http" not in page and 'src="http' not in page


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="Chromium is not installed (apt-get install chromium); HTML render test skipped")
def test_html_renders_in_headless_chromium(tiny_run, tmp_path):
    _, _, html_path = tiny_run
    shot = tmp_path / "shot.png"
    profile = tmp_path / "chromium-profile"  # a fresh profile: no state shared with other runs
    subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1200,2000",
                    html_path.resolve().as_uri()],
                   capture_output=True, timeout=120, check=False)
    assert shot.exists() and shot.stat().st_size > 10_000
    from matplotlib.image import imread

    pixels = imread(str(shot))
    assert pixels.shape[0] == 2000 and pixels.shape[1] == 1200
    gray = pixels[..., :3].mean(-1)
    assert gray.std() > 0.05  # not blank: text, tables and figures
    assert (gray < 0.3).mean() > 0.005  # some dark ink (text)
    assert len({tuple(p) for p in (pixels[::40, ::40, :3] * 255).astype(int).reshape(-1, 3).tolist()}) > 20
    # The verdict box at the top is framed in green (no critical finding) or red (some): its colour is drawn.
    top = (pixels[:400, :, :3] * 255).round().astype(int)
    frame = (26, 127, 55) if doc_is_good(tiny_run) else (207, 34, 46)
    assert (abs(top - np.array(frame)).sum(-1) < 30).sum() > 500
    # Figures are laid out below the fold, not collapsed: the lower half has ink too.
    assert (gray[1000:] < 0.5).mean() > 0.002


def doc_is_good(tiny_run) -> bool:
    return tiny_run[1]["summary"]["critical"] == 0
