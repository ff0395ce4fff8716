"""Corpora (built-in KJV, local text, Hugging Face datasets), tokenisation and fixed-length blocks."""

from attnkit.common.data.blocks import batched_blocks, encode_documents, random_blocks, split_blocks
from attnkit.common.data.corpus import BUILTIN_CORPORA, DEFAULT_CORPUS, Corpus, load_corpus, load_hf_corpus, load_local_corpus

__all__ = [
    "BUILTIN_CORPORA",
    "DEFAULT_CORPUS",
    "Corpus",
    "batched_blocks",
    "encode_documents",
    "load_corpus",
    "load_hf_corpus",
    "load_local_corpus",
    "random_blocks",
    "split_blocks",
]
