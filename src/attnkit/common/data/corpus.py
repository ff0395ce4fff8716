"""Load a text corpus as named splits of documents.

A corpus source is, in this order:

- a built-in name: ``kjv`` (the King James Bible, offline; see ``attnkit.common.data.bible``);
- a local ``.txt`` file (one split, ``all``, one document), a ``.jsonl`` or ``.parquet`` file (one
  split, a document per row: ``attnkit.common.data.texts``) or a folder of them: files whose names
  contain ``train`` / ``valid`` / ``test`` become those splits (so WikiText's ``wiki.train.raw``,
  ``wiki.valid.raw``, ``wiki.test.raw`` work as they are); otherwise every such file in it,
  sorted by name, forms the one split ``all``;
- a Hugging Face ``datasets`` name, ``NAME`` or ``NAME:CONFIG`` (e.g.
  ``wikitext:wikitext-2-raw-v1``), only when a dataset hub is reachable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from attnkit.errors import UserError

BUILTIN_CORPORA: dict[str, str] = {
    "kjv": "King James Bible (shipped with attnkit; Debian's bible-kjv-text as fallback), split by chapter 90/5/5 (train/validation/test)",
}
DEFAULT_CORPUS = "kjv"
TEXT_SUFFIXES = (".txt", ".raw", ".text")  # a whole file is one document
ROW_SUFFIXES = (".jsonl", ".parquet")  # a document per row
# Folder file names -> split; "valid" also matches "validation".
_SPLIT_WORDS = (("train", "train"), ("valid", "validation"), ("test", "test"))


@dataclass
class Corpus:
    name: str
    splits: dict[str, list[str]]  # split name -> documents (each tokenised separately, see blocks.py)
    description: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def split(self, name: str | None = None) -> list[str]:
        """Documents of a split. ``None`` means ``test`` if there is one, else the only split."""
        if name is None:
            if "test" in self.splits:
                name = "test"
            elif len(self.splits) == 1:
                name = next(iter(self.splits))
            else:
                raise UserError(f"corpus '{self.name}' has splits {sorted(self.splits)}; choose one with --split")
        if name not in self.splits:
            raise UserError(f"corpus '{self.name}' has no split '{name}'; it has: {', '.join(self.splits)}")
        return self.splits[name]


def load_corpus(source: str = DEFAULT_CORPUS, text_column: str = "text") -> Corpus:
    """Resolve ``source`` (built-in name, local file or folder, or hub dataset name) to a ``Corpus``."""
    if source in BUILTIN_CORPORA:
        return _load_builtin(source)
    path = Path(source).expanduser()
    if path.exists():
        return load_local_corpus(path, text_column)
    if source.startswith((".", "/", "~")) or source.endswith(TEXT_SUFFIXES + ROW_SUFFIXES):
        raise UserError(f"corpus path {source} does not exist")
    name, _, config = source.partition(":")
    return load_hf_corpus(name, config or None, text_column=text_column)


def _load_builtin(name: str) -> Corpus:
    if name == "kjv":
        from attnkit.common.data.bible import kjv_splits

        return Corpus("kjv", kjv_splits(), BUILTIN_CORPORA["kjv"])
    raise AssertionError(name)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text") from e


def load_local_corpus(path: str | Path, text_column: str = "text") -> Corpus:
    """A ``.txt`` file (split ``all``, one document), a ``.jsonl`` / ``.parquet`` file (split ``all``,
    a document per row, the text in ``text_column``) or a folder of them (see the module doc)."""
    path = Path(path).expanduser()
    if path.is_file():
        docs = _documents(path, text_column)
        if not any(d.strip() for d in docs):
            raise UserError(f"{path} is empty")
        return Corpus(str(path), {"all": docs}, f"local file {path}")
    if not path.is_dir():
        raise UserError(f"corpus path {path} does not exist")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in TEXT_SUFFIXES + ROW_SUFFIXES)
    if not files:
        raise UserError(f"no text files ({', '.join(TEXT_SUFFIXES + ROW_SUFFIXES)}) in {path}")
    splits: dict[str, list[str]] = {}
    for f in files:
        for word, split in _SPLIT_WORDS:
            if word in f.name.lower():
                splits.setdefault(split, []).extend(_documents(f, text_column))
                break
    if not splits:
        splits = {"all": [d for f in files for d in _documents(f, text_column)]}
    return Corpus(str(path), splits, f"local folder {path}")


def _documents(path: Path, text_column: str) -> list[str]:
    if path.suffix in ROW_SUFFIXES:
        from attnkit.common.data.texts import READERS

        return [t for t in READERS[path.suffix](path, text_column) if t.strip()]
    return [_read_text(path)]


def load_hf_corpus(name: str, config: str | None = None, text_column: str = "text", **kwargs: Any) -> Corpus:
    """A Hugging Face ``datasets`` corpus; each split becomes one document of its rows joined by newlines.

    Rows of line-based corpora (WikiText) are lines, not documents, so they are joined back
    rather than separated by end-of-text tokens. ``kwargs`` go to ``datasets.load_dataset``
    (e.g. ``data_files=`` for the ``text`` builder on local files).
    """
    full = f"{name}:{config}" if config else name
    hint = (
        f"cannot load dataset '{full}' from a Hugging Face hub"
        " ({why}). Without a hub, pass a local text file or folder instead, e.g. --dataset ./wiki.test.raw"
        " or a folder with wiki.train.raw / wiki.valid.raw / wiki.test.raw, or use the built-in 'kjv'"
    )
    try:
        import datasets
    except ImportError as e:
        raise UserError(hint.format(why="the 'datasets' package is not installed: pip install 'attnkit[data]'")) from e
    if "data_files" not in kwargs and not datasets.config.HF_HUB_OFFLINE:
        # Fail in seconds rather than after huggingface_hub's ~30 s of retries.
        reason = _hub_unreachable()
        if reason:
            raise UserError(hint.format(why=reason))
    try:
        dd = datasets.load_dataset(name, config, **kwargs)
    except Exception as e:  # noqa: BLE001 - datasets raises many types for "not reachable / not found"
        if isinstance(e, (KeyboardInterrupt, MemoryError)):
            raise
        raise UserError(hint.format(why=_first_line(e))) from e
    splits: dict[str, list[str]] = {}
    for split, ds in dd.items():
        if text_column not in ds.column_names:
            raise UserError(f"dataset '{name}' split '{split}' has no column '{text_column}' (it has {ds.column_names})")
        splits[_normal_split(split)] = ["\n".join(line.rstrip("\n") for line in ds[text_column])]
    return Corpus(full, splits, f"Hugging Face dataset {full}")


def _hub_unreachable(timeout: float = 3.0) -> str | None:
    """None when a TCP connection to the hub endpoint (``HF_ENDPOINT``) opens, else why not."""
    from attnkit.common.loading.hub import probe_endpoint

    return probe_endpoint(timeout)


def _normal_split(split: str) -> str:
    return "validation" if split in ("valid", "dev") else split


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
