"""Corpora (built-in KJV, local text, Hugging Face datasets), tokenisation and fixed-length blocks."""

from __future__ import annotations

from typing import TYPE_CHECKING

from attnkit.common.lazy import lazy_exports

# name -> the module that defines it, imported on first use (see attnkit.common.lazy)
_EXPORTS = {
    "batched_blocks": "attnkit.common.data.blocks",
    "encode_documents": "attnkit.common.data.blocks",
    "random_blocks": "attnkit.common.data.blocks",
    "split_blocks": "attnkit.common.data.blocks",
    "BUILTIN_CORPORA": "attnkit.common.data.corpus",
    "DEFAULT_CORPUS": "attnkit.common.data.corpus",
    "Corpus": "attnkit.common.data.corpus",
    "load_corpus": "attnkit.common.data.corpus",
    "load_hf_corpus": "attnkit.common.data.corpus",
    "load_local_corpus": "attnkit.common.data.corpus",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # what type checkers and the API reference read
    from attnkit.common.data.blocks import batched_blocks, encode_documents, random_blocks, split_blocks
    from attnkit.common.data.corpus import BUILTIN_CORPORA, Corpus, DEFAULT_CORPUS, load_corpus, load_hf_corpus, load_local_corpus
