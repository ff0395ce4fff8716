"""A dataset of texts to analyse, one text per row: local files, a folder of them, or a hub dataset.

``load_texts(source)`` reads, by what ``source`` is:

- a ``.txt`` file: one text a line (blank lines skipped);
- a ``.jsonl`` file: one JSON object a line, the text in field ``text`` unless told otherwise;
- a ``.parquet`` file: the text column ``text`` unless told otherwise (read with pyarrow);
- a folder: every such file in it, sorted by name (``split`` keeps the files whose names contain it);
- otherwise a Hugging Face ``datasets`` name, ``NAME`` or ``NAME:CONFIG``, when a dataset hub is
  reachable (``split`` defaults to ``train``).

Every problem with the source (missing, empty, a malformed line, a missing field) is one
``UserError`` naming the file and, for a line, its number.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from attnkit.errors import UserError


def _read_txt(path: Path, field: str) -> list[str]:
    return [line for line in _utf8(path).splitlines() if line.strip()]


def _read_jsonl(path: Path, field: str) -> list[str]:
    texts = []
    for number, line in enumerate(_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {number} is not JSON: {e.msg}") from e
        if not isinstance(row, dict):
            raise UserError(f"{path} line {number} is not a JSON object")
        if field not in row:
            raise UserError(f"{path} line {number} has no field '{field}' (it has: {', '.join(row) or 'none'}); "
                            "name the text field with --text-field")
        if not isinstance(row[field], str):
            raise UserError(f"{path} line {number}: field '{field}' is {type(row[field]).__name__}, not text")
        texts.append(row[field])
    return texts


def _read_parquet(path: Path, field: str) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise UserError("reading .parquet needs pyarrow: pip install 'attnkit[data]'") from e
    try:
        schema = pq.read_schema(path)
        if field not in schema.names:
            raise UserError(f"{path} has no column '{field}' (it has: {', '.join(schema.names)}); "
                            "name the text column with --text-field")
        column = pq.read_table(path, columns=[field]).column(field)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a file it cannot read
        raise UserError(f"{path} is not a readable parquet file: {_first_line(e)}") from e
    values = column.to_pylist()
    bad = next((v for v in values if v is not None and not isinstance(v, str)), None)
    if bad is not None:
        raise UserError(f"{path}: column '{field}' holds {type(bad).__name__}, not text")
    return [v for v in values if v is not None]


# A file suffix -> its reader (path, text field) -> texts. Another format is another entry.
READERS: dict[str, Callable[[Path, str], list[str]]] = {
    ".txt": _read_txt,
    ".jsonl": _read_jsonl,
    ".parquet": _read_parquet,
}


def load_texts(source: str, *, split: str | None = None, text_field: str = "text") -> list[str]:
    """The non-blank texts of ``source`` (see the module doc), in order."""
    path = Path(source).expanduser()
    if path.is_file():
        if split is not None:
            raise UserError("--split chooses files in a folder or a split of a hub dataset; "
                            f"{source} is one file")
        texts = _read_file(path, text_field)
    elif path.is_dir():
        texts = _read_folder(path, split, text_field)
    elif source.startswith((".", "/", "~")) or path.suffix in READERS:
        raise UserError(f"dataset file {source} does not exist")
    else:
        texts = _hub_texts(source, split, text_field)
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise UserError(f"dataset {source} has no texts (every line or row is empty)")
    return texts


def _read_file(path: Path, text_field: str) -> list[str]:
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise UserError(f"cannot read {path}: a dataset file is one of {', '.join(READERS)}")
    return reader(path, text_field)


def _read_folder(path: Path, split: str | None, text_field: str) -> list[str]:
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in READERS)
    if split is not None:
        files = [p for p in files if split.lower() in p.name.lower()]
    if not files:
        which = f" with '{split}' in their names" if split is not None else ""
        raise UserError(f"no dataset files ({', '.join(READERS)}){which} in {path}")
    return [t for f in files for t in _read_file(f, text_field)]


def _hub_texts(source: str, split: str | None, text_field: str) -> list[str]:
    """The ``text_field`` column of one split of a hub dataset ``NAME[:CONFIG]``."""
    from attnkit.common.loading.hub import offline_setting, probe_endpoint

    name, _, config = source.partition(":")
    split = split or "train"
    hint = (f"cannot load dataset '{source}' from a Hugging Face hub ({{why}}); without a hub, give a local "
            f".txt, .jsonl or .parquet file or a folder of them")
    try:
        import datasets
    except ImportError as e:
        raise UserError(hint.format(why="the 'datasets' package is not installed: pip install 'attnkit[data]'")) from e
    # the settings first (they cost nothing), then one quick connection: fail in seconds, not after retries
    why = (offline_setting() or ("HF_DATASETS_OFFLINE is set" if datasets.config.HF_HUB_OFFLINE else None)
           or probe_endpoint())
    if why:
        raise UserError(hint.format(why=why))
    try:
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many types for "not reachable / not found"
        if isinstance(e, (KeyboardInterrupt, MemoryError)):
            raise
        raise UserError(hint.format(why=_first_line(e))) from e
    if text_field not in ds.column_names:
        raise UserError(f"dataset '{source}' split '{split}' has no column '{text_field}' (it has: "
                        f"{', '.join(ds.column_names)}); name the text column with --text-field")
    return [t for t in ds[text_field] if isinstance(t, str)]


def _utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text") from e
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror or type(e).__name__}") from e


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
