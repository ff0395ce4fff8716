"""The one file format for trained parameters attnkit adds to a model (output gates, sparse gates).

A parameter store is a directory with two files, written adapter-style and nothing pickled:

    <weights>.safetensors   the tensors, by name (safetensors metadata: {"format": FORMAT})
    <header>.json           a JSON object whose "format" names the kind of store, and whatever
                            else rebuilds the modules that hold the tensors (kinds, layers, config)

Each kind of store is a ``ParamStore`` naming its two files and its format string; the gates of
``attnkit gate`` and of ``attnkit sparse`` are two instances. Both files are written whole or not
at all. Reading checks, in order, that the header exists, is JSON, and names this store's format,
then that the tensors file is whole: each failure is a ``UserError`` with one sentence naming the
file (the CLI prints it as one line and exits 2).

    store = ParamStore("gates.safetensors", "gate_config.json", "attnkit-gates/1", "attnkit gates", "attnkit gate config")
    store.save("out/", {"layers.0.net.weight": w}, {"kind": "elementwise"})
    header, tensors = store.read_header("out/"), store.read_tensors("out/")
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from attnkit.errors import UserError


@dataclass(frozen=True)
class ParamStore:
    weights: str  # file name of the tensors
    header: str  # file name of the JSON header
    format: str  # the header's (and the tensors' metadata) "format"
    what: str  # what a directory of this store holds, for error messages ("attnkit gates")
    header_what: str  # what its header is, for error messages ("attnkit gate config")

    def save(self, directory: str | os.PathLike, tensors: dict[str, Tensor], header: dict) -> Path:
        """Write ``tensors`` and ``{"format": ..., **header}`` to ``directory`` (created)."""
        from safetensors.torch import save

        from attnkit.common.io import write_atomic

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        write_atomic(out / self.weights, save(data, metadata={"format": self.format}))
        write_atomic(out / self.header, json.dumps({"format": self.format, **header}, indent=2) + "\n")
        return out

    def exists(self, directory: str | os.PathLike) -> bool:
        """Whether ``directory`` holds this store's header (a cheap test, before a full read)."""
        return (Path(directory) / self.header).is_file()

    def _missing(self, path: Path, directory: str | os.PathLike) -> UserError:
        return UserError(f"{path} is missing: {directory} is not a directory of {self.what}")

    def read_header(self, directory: str | os.PathLike) -> dict:
        """The header, checked to be a JSON object of this store's format."""
        path = Path(directory) / self.header
        if not path.is_file():
            raise self._missing(path, directory)
        try:
            doc = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"{path} is not valid JSON ({e.__class__.__name__}); it is truncated or corrupted") from None
        if not isinstance(doc, dict) or doc.get("format") != self.format:
            raise UserError(f"{path} is not an {self.header_what} (format {self.format} expected)")
        return doc

    def read_tensors(self, directory: str | os.PathLike) -> dict[str, Tensor]:
        """The tensors, on the CPU, read whole (not memory-mapped: the file may be replaced later)."""
        from safetensors import SafetensorError
        from safetensors.torch import load

        path = Path(directory) / self.weights
        if not path.is_file():
            raise self._missing(path, directory)
        try:
            return load(path.read_bytes())
        except (SafetensorError, ValueError, OSError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"{path} is truncated or corrupted and cannot be read as safetensors ({first})") from None
