"""Text corpora read with a model's tokenizer instead of bytes: the contract and its helpers.

data.py reads corpora as bytes for hetrain's own models; given a `Tokenizer` (a Hugging Face
model's, hetrain.model.hf_io.HFTokenizer), it tokenizes the same documents with it and caches
the token arrays on disk, named by `cache_name`. This module holds what that needs and no
more: it must not read corpora or know about transformers.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np


class Tokenizer:
    """What build_data needs of a tokenizer other than bytes (hetrain.model.hf_io.HFTokenizer):
    `vocab_size`, `fingerprint` (changes whenever the tokenizer would encode differently; keys
    the token cache), `name`, `encode_documents(docs) -> np.ndarray` (documents joined by its
    own separator tokens) and `decode(ids) -> str`."""

    vocab_size: int
    fingerprint: str
    name: str

    def encode_documents(self, docs: Iterable[str]) -> np.ndarray:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError


def capped_docs(chunks: Iterable[bytes], max_bytes: int, cut: list[bool], separator_bytes: int) -> Iterator[str]:
    """Documents as text until their bytes (with `separator_bytes` between them, as the byte
    corpora count) reach max_bytes, the last one cut there; sets cut[0] when anything was left out."""
    total, first = 0, True
    for chunk in chunks:
        if total >= max_bytes:
            cut[0] = True
            return
        if not first:
            total += separator_bytes
        first = False
        if total + len(chunk) > max_bytes:
            chunk, cut[0] = chunk[:max(0, max_bytes - total)], True
        total += len(chunk)
        yield chunk.decode("utf-8", errors="ignore")


def cache_name(kind: str, parts: list, tokenizer: Tokenizer) -> str:
    """The cache file of a corpus read with `tokenizer`: its kind, the tokenizer and a digest of
    `parts` (whatever the tokens depend on: files read, cap, text field)."""
    key = hashlib.sha256(json.dumps([kind, tokenizer.fingerprint, *parts], default=str).encode()).hexdigest()[:16]
    return f"{kind}-tok{tokenizer.fingerprint[:8]}-{key}.npy"


def file_stats(files: list[Path]) -> list:
    """(path, size, modification time) of each file: a cache key changes when any of them does."""
    return [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
