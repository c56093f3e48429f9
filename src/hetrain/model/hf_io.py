"""Weights and tokenizers between hetrain and Hugging Face folders.

`save_hf_model` writes a trained HFCausalLM back as a transformers folder (config, safetensors,
the source folder's tokenizer) that `AutoModelForCausalLM.from_pretrained` loads;
`load_hf_tokenizer` wraps the folder's tokenizer for data.py, which tokenizes text corpora
with it. Everything goes through transformers' own save_pretrained and AutoTokenizer, local
files only, remote code never trusted. This file must not train, build models or read corpora.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from hetrain.errors import ConfigError
from hetrain.model.hf import HFCausalLM, _import_transformers, quiet_progress

# Files whose presence means the folder has a tokenizer (fast, sentencepiece or BPE files).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def save_hf_model(model: HFCausalLM, out_dir: str | os.PathLike, source: str = "") -> Path:
    """Write `model` as a transformers folder that AutoModelForCausalLM.from_pretrained loads:
    config.json, model.safetensors (transformers' own save_pretrained, tied weights once) and,
    when the folder `source` has a tokenizer, its files (saved again by transformers). Written
    into a temporary sibling folder and renamed into place, so `out_dir` is never half written."""
    out = Path(out_dir)
    tmp, old = out.with_name(f"{out.name}.tmp{os.getpid()}"), out.with_name(f"{out.name}.old{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with quiet_progress(_import_transformers()):
        model.hf_model.save_pretrained(str(tmp), safe_serialization=True)
    tokenizer = _auto_tokenizer(source) if source else None
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def _has_tokenizer(path: str) -> bool:
    p = Path(path)
    return p.is_dir() and any((p / name).is_file() for name in TOKENIZER_FILES)


def _auto_tokenizer(path: str):
    if not _has_tokenizer(path):
        return None
    transformers = _import_transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"--hf.path {path} has tokenizer files that transformers cannot load ({exc}); fix or "
                          f"remove them (without a tokenizer, text is read as bytes)") from exc


class HFTokenizer:
    """A transformers tokenizer as data.py uses one: `encode_documents` turns documents into one
    token array, each document followed by the end-of-sequence token (the beginning-of-sequence
    token before it where there is no end token); `fingerprint` keys the token cache."""

    def __init__(self, tokenizer, fingerprint: str, name: str):
        self.tokenizer, self.fingerprint, self.name = tokenizer, fingerprint, name
        self.vocab_size = len(tokenizer)

    def encode_documents(self, docs: Iterable[str], batch: int = 256) -> np.ndarray:
        eos, bos = self.tokenizer.eos_token_id, self.tokenizer.bos_token_id
        dtype = np.uint16 if self.vocab_size <= 1 << 16 else np.uint32
        pieces, pending = [], []

        def flush():
            for ids in self.tokenizer(pending, add_special_tokens=False)["input_ids"]:
                if eos is None and bos is not None:
                    pieces.append(np.array([bos], dtype=dtype))
                pieces.append(np.asarray(ids, dtype=dtype))
                if eos is not None:
                    pieces.append(np.array([eos], dtype=dtype))
            pending.clear()

        for doc in docs:
            pending.append(doc)
            if len(pending) == batch:
                flush()
        if pending:
            flush()
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=dtype)

    def decode(self, ids) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return self.tokenizer.decode(list(np.asarray(ids).tolist()))


def load_hf_tokenizer(path: str) -> HFTokenizer | None:
    """The tokenizer of the HF folder `path`, or None when it has none (then text is read as
    bytes); ConfigError when its files cannot be loaded."""
    tokenizer = _auto_tokenizer(path)
    if tokenizer is None:
        return None
    digest = hashlib.sha256()
    for f in sorted(Path(path).iterdir()):
        if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens", "added_tokens")) or
                            f.name in ("vocab.json", "merges.txt", "vocab.txt")):
            digest.update(f.name.encode() + b"\0" + f.read_bytes())
    return HFTokenizer(tokenizer, digest.hexdigest()[:16], f"{type(tokenizer).__name__} of {path}")
