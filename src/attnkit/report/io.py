"""Writing reports whole or not at all."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from attnkit.errors import UserError


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write to a temporary file beside ``path`` and rename it into place: readers never see half a file."""
    path = Path(path)
    if not path.parent.exists():
        raise UserError(f"cannot write {path}: directory {path.parent} does not exist")
    mode = "wb" if isinstance(data, bytes) else "w"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if mode == "wb" else {"encoding": "utf-8"})) as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(doc: dict, target: str) -> None:
    """``target`` is a path, or ``-`` for standard output."""
    text = json.dumps(doc, indent=2, allow_nan=False)
    if target == "-":
        sys.stdout.write(text + "\n")
    else:
        write_atomic(target, text + "\n")
