"""Corpora, the KJV split and fixed-length blocks."""

from __future__ import annotations

import lzma
import re
import shutil

import pytest
import torch

from attnkit.common.data import (
    Corpus,
    batched_blocks,
    encode_documents,
    load_corpus,
    load_hf_corpus,
    load_local_corpus,
    random_blocks,
    split_blocks,
)
from attnkit.common.data import bible
from attnkit.errors import UserError


# --------------------------------------------------------------------------- KJV


def test_kjv_has_every_verse_and_chapter():
    chapters = bible.load_chapters()
    assert len(chapters) == 1189
    assert sum(len(c.verses) for c in chapters) == 31_102
    assert chapters[0].book == "Ge" and chapters[0].verses[0].startswith("In the beginning God created")
    assert chapters[-1].book == "Rev" and chapters[-1].chapter == 22


def test_kjv_split_is_by_chapter_and_disjoint():
    chapters = bible.load_chapters()
    by_split: dict[str, set[tuple[str, int]]] = {"train": set(), "validation": set(), "test": set()}
    for c in chapters:
        by_split[c.split].add((c.book, c.chapter))
    assert [len(by_split[s]) for s in ("train", "validation", "test")] == [1071, 59, 59]
    assert not by_split["train"] & by_split["test"]
    assert not by_split["train"] & by_split["validation"]
    assert not by_split["validation"] & by_split["test"]
    # Held-out chapters are spread over the whole book: Old and New Testament both in test.
    books = {b for b, _ in by_split["test"]}
    assert {"Ge", "Psa", "Mat"} <= books or len(books) > 30


def test_kjv_split_is_deterministic():
    first = bible.kjv_splits()
    bible.load_chapters.cache_clear()  # read and parse the text again
    second = bible.kjv_splits()
    assert first == second
    assert [bible.chapter_split(k) for k in range(40)] == [bible.chapter_split(k) for k in range(40)]
    assert bible.chapter_split(9) == "validation" and bible.chapter_split(19) == "test" and bible.chapter_split(0) == "train"


def test_test_chapters_never_appear_in_train():
    splits = load_corpus("kjv").splits
    train = set(splits["train"])
    train_text = "\n".join(splits["train"])
    for doc in splits["test"]:
        assert doc not in train
        # A whole held-out chapter is never a substring of the training text.
        assert doc not in train_text


def test_kjv_text_has_no_verse_references():
    ref = re.compile(r"^\d?[A-Za-z]+\d+:\d+ ", re.M)
    for docs in load_corpus("kjv").splits.values():
        assert not any(ref.search(d) for d in docs)


@pytest.mark.skipif(shutil.which("bible") is None, reason="Debian's bible-kjv-text is not installed (bible command)")
def test_shipped_text_gives_the_same_verses_and_splits_as_debian():
    shipped = bible.chapters_from_text(bible.read_shipped_text())
    debian = bible.chapters_from_text(bible.run_bible())
    assert len(shipped) == len(debian) == 1189
    assert shipped == debian  # every chapter: book, number, verses, hence every split
    assert [c.split for c in shipped] == [c.split for c in debian]


def test_the_corpus_is_read_from_the_shipped_text_first():
    assert bible.SHIPPED_TEXT.is_file()
    assert bible.kjv_source() == "shipped"
    assert bible.kjv_available()


def test_debian_bible_is_the_fallback_when_the_shipped_text_is_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(bible, "SHIPPED_TEXT", tmp_path / "absent.txt.xz")
    calls = []
    monkeypatch.setattr(bible, "run_bible", lambda: calls.append(1) or "Ge1:1 In the beginning\n")
    assert bible.kjv_source() == "bible-kjv-text"
    assert bible.raw_text() == "Ge1:1 In the beginning\n" and calls == [1]


def test_a_damaged_shipped_text_is_refused(tmp_path):
    good = lzma.decompress(bible.SHIPPED_TEXT.read_bytes())
    altered = tmp_path / "kjv.txt.xz"
    altered.write_bytes(lzma.compress(good.replace(b"In the beginning", b"In the beginnin_", 1)))
    with pytest.raises(UserError, match="damaged"):
        bible.read_shipped_text(altered)
    truncated = tmp_path / "short.txt.xz"
    truncated.write_bytes(bible.SHIPPED_TEXT.read_bytes()[:1000])
    with pytest.raises(UserError, match="cannot be read"):
        bible.read_shipped_text(truncated)


def test_missing_text_and_bible_command_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(bible, "SHIPPED_TEXT", tmp_path / "absent.txt.xz")
    monkeypatch.setattr(bible.shutil, "which", lambda name: None)
    bible.load_chapters.cache_clear()
    try:
        with pytest.raises(UserError, match="apt-get install bible-kjv-text"):
            load_corpus("kjv")
    finally:
        bible.load_chapters.cache_clear()


def test_unexpected_bible_output_is_a_user_error():
    with pytest.raises(UserError, match="unexpected line"):
        bible.parse_verses("Ge1:1 In the beginning\nthis is not a verse\n")


# --------------------------------------------------------------------------- local files


def test_local_file_is_one_split(tmp_path):
    f = tmp_path / "text.txt"
    f.write_text("one two three\nfour five\n")
    c = load_corpus(str(f))
    assert c.splits == {"all": ["one two three\nfour five\n"]}
    assert c.split() == c.splits["all"]
    with pytest.raises(UserError, match="no split 'test'"):
        c.split("test")


def test_local_folder_with_split_names(tmp_path):
    for name, text in [("wiki.train.raw", "train text"), ("wiki.valid.raw", "valid text"), ("wiki.test.raw", "test text")]:
        (tmp_path / name).write_text(text)
    c = load_local_corpus(tmp_path)
    assert c.splits == {"test": ["test text"], "train": ["train text"], "validation": ["valid text"]}
    assert c.split() == ["test text"]


def test_local_folder_without_split_names(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "notes.md").write_text("ignored")
    assert load_local_corpus(tmp_path).splits == {"all": ["first", "second"]}


@pytest.mark.parametrize("make", ["missing", "empty", "emptydir"])
def test_bad_local_paths_are_user_errors(tmp_path, make):
    if make == "missing":
        source = str(tmp_path / "nope.txt")
    elif make == "empty":
        (tmp_path / "e.txt").write_text("  \n")
        source = str(tmp_path / "e.txt")
    else:
        source = str(tmp_path)
    with pytest.raises(UserError):
        load_corpus(source)


def test_corpus_with_several_splits_and_no_test_needs_a_choice():
    c = Corpus("x", {"train": ["a"], "validation": ["b"]})
    with pytest.raises(UserError, match="--split"):
        c.split()


# --------------------------------------------------------------------------- Hugging Face datasets


def test_hf_loader_on_local_files(tmp_path):
    pytest.importorskip("datasets")
    train, test = tmp_path / "train.txt", tmp_path / "test.txt"
    train.write_text("line one\nline two\n")
    test.write_text("held out\n")
    c = load_hf_corpus("text", data_files={"train": str(train), "test": str(test)}, cache_dir=str(tmp_path / "cache"))
    assert c.splits == {"train": ["line one\nline two"], "test": ["held out"]}


def test_hf_loader_wrong_column(tmp_path):
    pytest.importorskip("datasets")
    (tmp_path / "t.txt").write_text("x\n")
    with pytest.raises(UserError, match="no column 'body'"):
        load_hf_corpus("text", data_files={"train": str(tmp_path / "t.txt")}, text_column="body", cache_dir=str(tmp_path / "c"))


def test_unreachable_hub_says_to_use_a_local_file(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path))
    with pytest.raises(UserError, match="pass a local text file or folder") as e:
        load_corpus("wikitext:wikitext-2-raw-v1")
    assert "wikitext" in str(e.value)


# --------------------------------------------------------------------------- blocks


class _CharTokenizer:
    """A tokenizer of the shape HF fast tokenizers have: one id per character, EOS = 0."""

    eos_token_id = 0

    def __call__(self, docs, add_special_tokens=False, verbose=False):
        return {"input_ids": [[ord(ch) for ch in d] for d in docs]}


def test_encode_documents_joins_with_eos():
    ids = encode_documents(_CharTokenizer(), ["ab", "  ", "c"])
    assert ids.tolist() == [97, 98, 0, 99]  # the blank document is dropped
    with pytest.raises(UserError):
        encode_documents(_CharTokenizer(), ["", " "])


def test_split_blocks_shapes_and_coverage():
    ids = torch.arange(1000)
    blocks = split_blocks(ids, 256)
    assert [b.numel() for b in blocks] == [256, 256, 256, 232]
    assert torch.equal(torch.cat(blocks), ids)
    assert [b.numel() for b in split_blocks(torch.arange(513), 256)] == [256, 256]  # 1-token tail has nothing to predict
    with pytest.raises(UserError):
        split_blocks(ids, 1)


def test_batched_blocks_keeps_equal_lengths_together():
    blocks = split_blocks(torch.arange(1000), 256)
    shapes = [tuple(b.shape) for b in batched_blocks(blocks, 2)]
    assert shapes == [(2, 256), (1, 256), (1, 232)]


def test_random_blocks_are_seeded_windows():
    ids = torch.arange(10_000)
    a = random_blocks(ids, 64, 4, torch.Generator().manual_seed(0))
    b = random_blocks(ids, 64, 4, torch.Generator().manual_seed(0))
    assert a.shape == (4, 64) and torch.equal(a, b)
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(4, 63, dtype=torch.long))  # contiguous text


def test_unreachable_hub_fails_fast_without_calling_datasets(monkeypatch):
    datasets = pytest.importorskip("datasets")
    from attnkit.common.data import corpus

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(corpus, "_hub_unreachable", lambda: "hub.example is not reachable: test")
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("load_dataset must not be called"))
    with pytest.raises(UserError, match=r"hub.example is not reachable.*--dataset \./wiki\.test\.raw"):
        load_corpus("wikitext:wikitext-2-raw-v1")


def test_hub_probe_reports_an_unresolvable_endpoint(monkeypatch):
    pytest.importorskip("datasets")
    import huggingface_hub.constants

    from attnkit.common.data import corpus

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://attnkit-no-such-host.invalid")
    assert "attnkit-no-such-host.invalid is not reachable" in corpus._hub_unreachable(timeout=2.0)


def test_lm_blocks_open_with_the_tokenizer_s_bos_and_cover_the_stream_once():
    from tokenizers import processors
    from transformers import AutoTokenizer

    from attnkit.common.data.blocks import lm_blocks, split_blocks
    from attnkit.common.loading.registry import resolve_model_path

    plain = AutoTokenizer.from_pretrained(resolve_model_path("reference"))
    ids = torch.arange(1, 2500)
    assert [b.tolist() for b in lm_blocks(plain, ids, 100)] == [b.tolist() for b in split_blocks(ids, 100)]  # GPT-2: no prefix
    bos_tok = AutoTokenizer.from_pretrained(resolve_model_path("reference"))
    bos = bos_tok.bos_token
    bos_tok._tokenizer.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, bos_tok.bos_token_id)])
    blocks = lm_blocks(bos_tok, ids, 100)
    assert all(b[0] == bos_tok.bos_token_id for b in blocks)
    assert all(b.numel() == 100 for b in blocks[:-1])
    assert torch.equal(torch.cat([b[1:] for b in blocks]), ids)  # every stream token once, in order
