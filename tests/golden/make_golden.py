"""Golden outputs of every ``attnkit`` command on the built-in models, to show a refactor changes nothing.

``python tests/golden/make_golden.py`` runs each case below through ``attnkit.cli.main.main`` in one
process and writes what a user sees (exit code, stdout, stderr, and every JSON/text file the command
writes) to ``tests/golden/cases/NAME.txt``; ``tests/test_golden.py`` reruns the cases and diffs.

What is normalised, because it changes from run to run and not with the code:
- the temporary directory the cases write into (``<TMP>``);
- wall-clock seconds (perplexity's ``"seconds"`` field and its ``(... ; 1.2 s)`` line, validate's
  ``"seconds"`` table and its HTML footer's ``in 1.2 s``);
- ``"local_files_only"`` in a tokenizer config the gate command saves: transformers records whether
  the hub was offline when the tokenizer was loaded (read once, when huggingface_hub is imported);
- PNG bytes, written or inlined as base64 in HTML: checked to be PNGs, not byte for byte (matplotlib's
  bytes vary with its version and fonts, not with attnkit).
Numbers are compared with a relative tolerance of 1e-5 (``same``): a backward pass on CPU sums in a
thread-dependent order, so gradient norms move in their 8th digit from run to run. Everything else,
every word and every key, must be identical.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CASES_DIR = HERE / "cases"

TEXT = "The cat sat on the mat. The dog sat on the log. The cat saw the dog and the dog saw the cat."
CORPUS = ("In the beginning God created the heaven and the earth. And the earth was without form, and void; "
          "and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters. ")

# name -> argv ({tmp} is the case's temporary directory); files the command writes are read back after it.
CASES: dict[str, list[str]] = {
    "analyze_reference_console": ["analyze", "reference"],
    "analyze_reference_json": ["analyze", "reference", "--json", "-"],
    "analyze_reference_layers": ["analyze", "reference", "--text", TEXT, "--layers", "0,2", "--heads", "1-2",
                                 "--json", "{tmp}/a.json", "--plot", "{tmp}/a.png"],
    "analyze_reference_long_json": ["analyze", "reference-long", "--max-length", "96", "--json", "-"],
    "analyze_reference_long_console": ["analyze", "reference-long", "--max-length", "96"],
    "analyze_minilm_json": ["analyze", "minilm", "--text", TEXT, "--json", "-"],
    "analyze_minilm_console": ["analyze", "minilm", "--text", TEXT],
    "check_reference_console": ["check", "reference"],
    "check_reference_json": ["check", "reference", "--dtype", "fp16", "--seq-len", "512", "--json", "-"],
    "check_reference_measure": ["check", "reference", "--measure", "--json", "{tmp}/c.json", "--plot", "{tmp}/c.png"],
    "check_minilm_json": ["check", "minilm", "--dtype", "fp16", "--temperature", "0.5", "--json", "-"],
    "validate_reference": ["validate", "reference", "--seq-len", "32", "--sequences", "2", "--ablation-blocks", "2",
                           "--json", "{tmp}/v.json", "--html", "{tmp}/v.html"],
    "validate_minilm_json": ["validate", "minilm", "--text", TEXT, "--seq-len", "16", "--sequences", "2",
                             "--ablation-blocks", "2", "--json", "-"],
    "perplexity_reference_json": ["perplexity", "reference", "--max-blocks", "2", "--block-size", "64", "--json", "-"],
    "perplexity_reference_long": ["perplexity", "reference-long", "--max-blocks", "2", "--block-size", "64"],
    "gate_reference_headwise": ["gate", "reference", "--kind", "headwise", "--out", "{tmp}/gated"],
    "gate_reference_stats": ["gate", "{tmp}/gated", "--stats", "--text", TEXT],
    "gate_reference_mlp": ["gate", "reference", "--kind", "mlp", "--layers", "1-2", "--init-bias", "1.0",
                           "--out", "{tmp}/gated_mlp"],
    "sparse_train_reference": ["sparse", "train", "reference", "--density", "0.5", "--block-size", "16",
                               "--seq-len", "64", "--batch-size", "2", "--steps", "2", "--checkpoint-every", "0",
                               "--map-loss", "0.5", "--lr", "0.01", "--corpus", "{tmp}/corpus", "--no-progress",
                               "--out", "{tmp}/sparse"],
    "sparse_eval_reference": ["sparse", "eval", "reference", "--block-size", "16", "--seq-lens", "64",
                              "--densities", "0.5", "--tokens", "128", "--corpus", "{tmp}/corpus",
                              "--gates", "{tmp}/sparse", "--speed-rounds", "0", "--out", "{tmp}/sparse_eval"],
    "sparse_eval_minilm": ["sparse", "eval", "minilm", "--patterns", "window,moba", "--densities", "0.5",
                           "--block-size", "8", "--sentences", "4", "--max-length", "32", "--corpus", "{tmp}/corpus",
                           "--speed-rounds", "0", "--out", "{tmp}/sparse_minilm"],
    "monitor_report": ["monitor", "report", "{tmp}/run", "--out", "{tmp}/figs"],
    "monitor_trace_reference": ["monitor", "trace", "reference", "--text", TEXT],
    # bad input: one line, exit 2
    "error_unknown_model": ["analyze", "no-such-model-here"],
    "error_check_seq_len": ["check", "reference", "--seq-len", "1"],
    "error_sparse_pattern": ["sparse", "eval", "reference", "--patterns", "nope", "--out", "{tmp}/x"],
    "error_validate_split": ["validate", "reference", "--split", "test"],
    "error_monitor_missing": ["monitor", "report", "{tmp}/missing"],
    "error_gate_no_out": ["gate", "reference"],
    "error_perplexity_encoder": ["perplexity", "minilm"],
}

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TEXT_SUFFIXES = {".json", ".html", ".txt", ".jsonl"}


def _prepare(tmp: Path) -> None:
    """Inputs some cases read: a small corpus (train/test) and a monitored training run."""
    (tmp / "corpus").mkdir()
    (tmp / "corpus" / "train.txt").write_text(CORPUS * 40)
    (tmp / "corpus" / "test.txt").write_text(CORPUS[::-1] * 10 + CORPUS * 10)
    _monitored_run(tmp / "run")


def _monitored_run(log_dir: Path) -> None:
    """The monitored run test_monitor_cli reads too (tests/monitor_helpers.py: trained once per process)."""
    sys.path.insert(0, str(HERE.parent))  # tests/, also when this file runs as a script
    from monitor_helpers import monitored_run

    monitored_run(log_dir)


def normalise(text: str, tmp: Path) -> str:
    for t in {str(tmp), str(tmp.resolve())}:
        text = text.replace(t, "<TMP>")
    text = re.sub(r'"seconds": [0-9.eE+-]+', '"seconds": <S>', text)
    text = re.sub(r'"seconds": \{[^{}]*\}', '"seconds": {<S>}', text)
    text = re.sub(r'"local_files_only": (true|false)', '"local_files_only": <OFFLINE>', text)
    text = re.sub(r"; [0-9]+\.[0-9] s\)", "; <S> s)", text)
    text = re.sub(r" in [0-9]+(\.[0-9]+)? s\. ", " in <S> s. ", text)
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "data:image/png;base64,<PNG>", text)
    return text


NUMBER = re.compile(r"[-+]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][-+]?\d+)?")


def same(want: str, got: str, rel: float = 1e-5, abs_: float = 1e-9) -> bool:
    """Equal text, and numbers equal within ``rel`` (see the module docstring for why)."""
    if want == got:
        return True
    if NUMBER.split(want) != NUMBER.split(got):
        return False
    for a, b in zip(NUMBER.findall(want), NUMBER.findall(got)):
        if a != b and abs(float(a) - float(b)) > max(abs_, rel * max(abs(float(a)), abs(float(b)))):
            return False
    return True


def run_case(name: str, tmp: Path) -> str:
    """What the user sees of one case, as one normalised text."""
    from attnkit.cli.main import main

    argv = [a.replace("{tmp}", str(tmp)) for a in CASES[name]]
    before = {p for p in tmp.rglob("*")}
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    parts = [f"$ attnkit {' '.join(CASES[name])}", f"exit {rc}", "--- stdout", out.getvalue(), "--- stderr",
             err.getvalue()]
    for path in sorted(p for p in tmp.rglob("*") if p not in before and p.is_file()):
        rel = path.relative_to(tmp)
        # checkpoints hold training state, a copied tokenizer.json is the built-in model's own file
        if path.suffix in TEXT_SUFFIXES and "checkpoints" not in rel.parts and path.name != "tokenizer.json":
            body = path.read_text(encoding="utf-8")
            if path.suffix == ".json":  # stable key order is the command's; keep it
                json.loads(body)
            parts += [f"--- file {rel}", body]
        elif path.suffix == ".png":
            is_png = path.read_bytes()[:8] == PNG_MAGIC
            parts.append(f"--- file {rel} (PNG: {is_png})")
        else:
            parts.append(f"--- file {rel}")
    return normalise("\n".join(parts), tmp)


def run_all(names=None) -> dict[str, str]:
    os.environ.update(COLUMNS="120", LINES="40", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", NO_COLOR="1")
    os.environ.pop("FORCE_COLOR", None)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        _prepare(tmp)
        return {name: run_case(name, tmp) for name in (names or CASES)}


# The goldens record what one dependency stack prints: another release of these renders the console
# differently (rich's wrapping) or moves numbers past the tolerance (transformers, torch kernels), which
# says nothing about attnkit. The test compares on the stack the goldens were written with.
STACK = ("torch", "transformers", "tokenizers", "rich", "numpy")
STACK_FILE = HERE / "stack.json"


def installed_stack() -> dict[str, str]:
    """major.minor of each package of ``STACK`` installed now."""
    from importlib.metadata import version

    return {name: ".".join(version(name).split("+")[0].split(".")[:2]) for name in STACK}


def main() -> None:
    STACK_FILE.write_text(json.dumps(installed_stack(), indent=1) + "\n", encoding="utf-8")
    CASES_DIR.mkdir(exist_ok=True)
    for old in CASES_DIR.glob("*.txt"):
        old.unlink()
    for name, text in run_all().items():
        (CASES_DIR / f"{name}.txt").write_text(text, encoding="utf-8")
        print(f"wrote {name}", file=sys.stderr)


if __name__ == "__main__":
    main()
