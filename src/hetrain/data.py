"""Training data: a byte-level tokenizer, corpus loaders and deterministic token streams.

Every corpus ends as one or more flat arrays of token ids ("shards": np.uint16 or np.uint32,
memory-mapped when they come from .bin files or the cache), split into train and validation.
`build_data(cfg, seed)` turns a DataConfig into a `Data` that serves (x, y) batches. Text is
read as bytes (the byte tokenizer of hetrain's own models), or with a tokenizer the caller
passes (a Hugging Face model's, hetrain.model.hf_io), whose token arrays are cached on disk. The
embedded default corpus is the Python standard library source found on this machine at run
time, so nothing is downloaded or committed. The train stream's reading position is a few
plain integers (`TokenStream.state_dict`), so a checkpoint resumes it exactly. This module
must not know about models, devices or the training loop: it returns CPU int64 tensors and
leaves placement to the caller. Bad input raises ConfigError before any data is read.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from hetrain.errors import ConfigError
from hetrain.tokens import Tokenizer, cache_name, capped_docs, file_stats

SOURCES = ("stdlib", "text", "bin", "hf")
BIN_DTYPES = {"uint16": np.uint16, "uint32": np.uint32}
BYTE_VOCAB = 256
# Joins files and documents, so the model sees where one ends and the next begins.
SEPARATOR = b"\n\n"
# Directories left out of the stdlib corpus: installed packages, bytecode, and the test
# suites (large and repetitive; leaving them out keeps loading to about a second).
STDLIB_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"})


@dataclass
class DataConfig:
    """The training corpus and how it is read."""

    source: str = "stdlib"
    """Corpus: 'stdlib' (Python standard library source on this machine), 'text' (.txt/.jsonl file or directory), 'bin' (pre-tokenized uint16/uint32 .bin), 'hf' (datasets.save_to_disk folder)."""
    path: str = ""
    """File or directory read by 'text', 'bin' and 'hf'; a directory is read in sorted path order ('text': .jsonl files parsed, other files read as text; 'bin': its *.bin files)."""
    val_path: str = ""
    """Separate validation file or directory for 'text' and 'bin'; empty = hold out the last val_fraction of the tokens."""
    text_field: str = "text"
    """Field that holds the text in .jsonl lines and in Hugging Face datasets."""
    bin_dtype: str = "uint16"
    """Token id type of .bin files: 'uint16' (vocabularies up to 65536) or 'uint32'."""
    bin_vocab: int = 0
    """Vocabulary size of .bin token ids (e.g. 50304 for GPT-2 tokens); 0 = 256 (byte tokens)."""
    val_fraction: float = 0.05
    """Fraction of tokens at the end of the corpus held out for validation, when there is no separate validation set."""
    max_bytes: int = 64 * 2**20
    """Cap on the text read by 'stdlib', 'text' and 'hf', in bytes (default 64 MiB); the corpus is cut there, before the train/validation split."""
    cache_dir: str = "~/.cache/hetrain"
    """Where tokenized corpora are cached (.npy keyed by the files read, the cap and the tokenizer): the stdlib corpus, and any text corpus read with a Hugging Face model's tokenizer; empty = no cache."""


class ByteTokenizer:
    """UTF-8 bytes as tokens: ids 0..255, no special tokens, every string encodable."""

    vocab_size = BYTE_VOCAB

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids) -> str:
        # A window may start or end inside a multi-byte character: those bytes become U+FFFD.
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= BYTE_VOCAB):
            raise ValueError(f"byte token ids must be in 0..255, got {ids.min()}..{ids.max()}")
        return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------- batches


class _Windows:
    """All windows of seq_len + 1 consecutive tokens inside shards, numbered 0..count-1.

    A window never crosses from one shard into the next (shards are separate files).
    """

    def __init__(self, shards: list[np.ndarray], seq_len: int):
        self.shards, self.seq_len = shards, seq_len
        self.per_shard = np.array([max(len(s) - seq_len, 0) for s in shards], dtype=np.int64)
        self.ends = np.cumsum(self.per_shard)  # ends[i] = windows in shards 0..i
        self.count = int(self.ends[-1]) if len(shards) else 0

    def fetch(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        shard_of = np.searchsorted(self.ends, idx, side="right")
        starts = idx - (self.ends[shard_of] - self.per_shard[shard_of])
        rows = np.stack([self.shards[s][o : o + self.seq_len + 1] for s, o in zip(shard_of, starts)])
        rows = torch.from_numpy(rows.astype(np.int64))  # (B, T+1)
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()  # x, y: (B, T), y[t] = x[t+1]


def _windows(shards: list[np.ndarray], seq_len: int, split: str) -> _Windows:
    """Windows of one split, or a ConfigError saying how many tokens seq_len needs."""
    if seq_len < 1:
        raise ConfigError(f"sequence length must be >= 1, got {seq_len}")
    windows = _Windows(shards, seq_len)
    if windows.count == 0:
        n = sum(len(s) for s in shards)
        longest = max((len(s) for s in shards), default=0)
        piece = f" (longest file {longest})" if len(shards) > 1 else ""
        more = "raise --data.val_fraction, add validation data" if split == "validation" else "add data"
        raise ConfigError(
            f"the {split} split has {n} tokens{piece}, but sequence length {seq_len} needs at least "
            f"{seq_len + 1} in one piece; {more} or use a shorter sequence"
        )
    return windows


class TokenStream:
    """Training batches from uniformly random windows, reproducible from (seed, rank, batches served).

    Batch i draws its offsets from a generator seeded with (seed, rank, i), so the reading
    position is a counter: state_dict() is plain ints, and after load_state_dict() the
    stream serves exactly the batches an uninterrupted one would (for the same batch_size
    and seq_len). Each data-parallel rank passes its own rank and reads different windows;
    all ranks share the same counter, so one saved state restores every rank.
    """

    def __init__(self, shards: list[np.ndarray], seed: int, rank: int = 0):
        if seed < 0 or rank < 0:
            raise ConfigError(f"seed and rank must be >= 0, got seed {seed}, rank {rank}")
        self.shards = list(shards)
        self.seed, self.rank = int(seed), int(rank)
        self.batches_served = 0
        self.num_tokens = sum(len(s) for s in self.shards)

    def next_batch(self, batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (x, y), int64 CPU tensors of shape (batch_size, seq_len), y = x shifted by one."""
        windows = _windows(self.shards, seq_len, "train")
        rng = np.random.default_rng([self.seed, self.rank, self.batches_served])
        idx = rng.integers(0, windows.count, size=batch_size)
        self.batches_served += 1
        return windows.fetch(idx)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "batches_served": self.batches_served, "num_tokens": self.num_tokens}

    def load_state_dict(self, state: dict) -> None:
        if int(state["num_tokens"]) != self.num_tokens:
            raise ConfigError(
                f"the checkpoint's data position is for a train split of {int(state['num_tokens'])} tokens, "
                f"but this one has {self.num_tokens}; resume with the same --data settings"
            )
        self.seed, self.batches_served = int(state["seed"]), int(state["batches_served"])


@dataclass
class Data:
    """A loaded corpus: the train stream, the validation tokens, and how to read them."""

    train: TokenStream
    val_shards: list[np.ndarray]
    vocab_size: int
    tokenizer: ByteTokenizer | Tokenizer | None  # None for .bin ids from some other tokenizer
    summary: str  # where the tokens came from, e.g. "stdlib: 734 files, 12.1 MB"

    @property
    def num_val_tokens(self) -> int:
        return sum(len(s) for s in self.val_shards)

    def describe(self) -> str:
        return f"{self.summary}, {_count(self.train.num_tokens)} train / {_count(self.num_val_tokens)} val tokens"

    def check(self, seq_len: int) -> None:
        """Raises ConfigError unless both splits hold at least one window of seq_len + 1 tokens."""
        _windows(self.train.shards, seq_len, "train")
        _windows(self.val_shards, seq_len, "validation")

    def val_batches(self, batch_size: int, seq_len: int, n_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The same n_batches (x, y) batches on every call: windows spread evenly over the validation split."""
        windows = _windows(self.val_shards, seq_len, "validation")
        idx = np.linspace(0, windows.count - 1, batch_size * n_batches).round().astype(np.int64)
        return [windows.fetch(chunk) for chunk in idx.reshape(n_batches, batch_size)]


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


# ----------------------------------------------------------------------------- corpora


@dataclass
class _Corpus:
    train: list[np.ndarray]
    val: list[np.ndarray] | None  # None: split the tail of train
    summary: str


def _join_capped(chunks: Iterable[bytes], max_bytes: int) -> tuple[np.ndarray, bool]:
    """Byte tokens of chunks joined by SEPARATOR and cut at max_bytes, and whether anything was cut.

    Stops pulling chunks once the cap is reached, so a capped corpus reads only what it uses.
    """
    parts, total, cut = [], 0, False
    for chunk in chunks:
        if total >= max_bytes:
            cut = True
            break
        if parts:
            parts.append(SEPARATOR)
            total += len(SEPARATOR)
        parts.append(chunk)
        total += len(chunk)
    data = b"".join(parts)
    cut = cut or len(data) > max_bytes
    return np.frombuffer(data[:max_bytes], dtype=np.uint8).astype(np.uint16), cut


def _encode(chunks: Iterable[bytes], max_bytes: int, tokenizer: Tokenizer | None) -> tuple[np.ndarray, bool]:
    """Tokens of documents, capped at max_bytes of text: bytes joined by SEPARATOR without a
    tokenizer, else the tokenizer's ids (documents joined by its separator tokens)."""
    if tokenizer is None:
        return _join_capped(chunks, max_bytes)
    cut = [False]
    tokens = tokenizer.encode_documents(capped_docs(chunks, max_bytes, cut, len(SEPARATOR)))
    return tokens, cut[0]


def _size_note(n_bytes: int, cut: bool) -> str:
    return f"first {n_bytes / 1e6:.1f} MB (--data.max_bytes)" if cut else f"{n_bytes / 1e6:.1f} MB"


def _sorted_files(root: Path, keep: Callable[[Path], bool], skip_dirs=frozenset()) -> list[Path]:
    """Files under root that keep() accepts, sorted by relative path; hidden names are skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs and not d.startswith(".")]
        found += [Path(dirpath, f) for f in filenames if not f.startswith(".") and keep(Path(dirpath, f))]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _load_or_build(cache_dir: str, name: str, build: Callable[[], np.ndarray]) -> np.ndarray:
    """Memory-maps cache_dir/name if present, else builds it and writes it atomically (temp + rename)."""
    if not cache_dir:
        return build()
    path = Path(cache_dir).expanduser() / name
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError):  # missing, or unreadable: build it again
        pass
    tokens = build()
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=name, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.save(f, tokens)
        os.replace(tmp, path)
    except OSError:  # a read-only cache only costs a rebuild next time
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return tokens


def _stdlib_corpus(cfg: DataConfig, tokenizer: Tokenizer | None = None) -> _Corpus:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = _sorted_files(root, lambda p: p.suffix == ".py", STDLIB_SKIP_DIRS)
    if not files:
        raise ConfigError(f"found no .py files in the Python standard library at '{root}'; use --data.source text")
    # The key changes when Python, the file list, a file's size or mtime, or the cap changes.
    stats = [(f.relative_to(root).as_posix(), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    key = hashlib.sha256(json.dumps([sys.version, str(root), cfg.max_bytes, stats]).encode()).hexdigest()[:16]
    name = f"stdlib-py{sys.version_info.major}.{sys.version_info.minor}-{key}.npy"
    if tokenizer is not None:
        name = cache_name("stdlib", [key], tokenizer)
    tokens = _load_or_build(cfg.cache_dir, name,
                            lambda: _encode((f.read_bytes() for f in files), cfg.max_bytes, tokenizer)[0])
    text_bytes = sum(size for _, size, _ in stats) + len(SEPARATOR) * (len(files) - 1)
    cut = text_bytes > cfg.max_bytes
    size = _size_note(len(tokens), cut) if tokenizer is None else _tokens_note(len(tokens), min(text_bytes, cfg.max_bytes), cut)
    return _Corpus([tokens], None, f"stdlib: {len(files)} files, {size}")


def _tokens_note(n_tokens: int, n_bytes: int, cut: bool) -> str:
    return f"{_size_note(n_bytes, cut)} of text, {n_tokens:,} tokens"


def _doc_bytes(text, where: str, field: str) -> bytes:
    if not isinstance(text, str):
        raise ConfigError(f"{where}: field '{field}' holds {type(text).__name__}, not text; set --data.text_field")
    return text.encode("utf-8")


def _jsonl_docs(path: Path, field: str) -> Iterator[bytes]:
    """One document per non-blank line of a .jsonl file."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{lineno} is not valid JSON ({e.msg}); fix or remove that line") from None
            if not isinstance(record, dict) or field not in record:
                has = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
                raise ConfigError(
                    f"{path}:{lineno} has no '{field}' field (it has: {has}); "
                    "set --data.text_field to the field that holds the text"
                )
            yield _doc_bytes(record[field], f"{path}:{lineno}", field)


def _read_text(path: Path, cfg: DataConfig, option: str, tokenizer: Tokenizer | None = None
               ) -> tuple[np.ndarray, int, bool]:
    """Tokens of a file or a directory of files (.jsonl parsed, anything else read as UTF-8 text);
    returns (tokens, number of files, whether max_bytes cut the text). With a tokenizer the
    tokens are cached under cache_dir, keyed by the files' paths, sizes and times, the cap, the
    text field and the tokenizer."""
    files = [path] if path.is_file() else _sorted_files(path, lambda p: True)
    if not files:
        raise ConfigError(f"data path '{path}' holds no files; set {option} to a non-empty file or directory")

    def chunks() -> Iterator[bytes]:
        for f in files:
            if f.suffix == ".jsonl":
                yield from _jsonl_docs(f, cfg.text_field)
            else:
                yield f.read_bytes()

    if tokenizer is None:
        tokens, cut = _join_capped(chunks(), cfg.max_bytes)
        return tokens, len(files), cut
    cut = [False]
    name = cache_name("text", [file_stats(files), cfg.max_bytes, cfg.text_field], tokenizer)
    tokens = _load_or_build(cfg.cache_dir, name, lambda: tokenizer.encode_documents(
        capped_docs(chunks(), cfg.max_bytes, cut, len(SEPARATOR))))
    return tokens, len(files), cut[0]


def _text_corpus(cfg: DataConfig, tokenizer: Tokenizer | None = None) -> _Corpus:
    tokens, n_files, cut = _read_text(Path(cfg.path), cfg, "--data.path", tokenizer)
    size = _size_note(len(tokens), cut) if tokenizer is None else f"{len(tokens):,} tokens"
    summary = f"text: {n_files} file{'s' * (n_files != 1)}, {size}"
    val = None
    if cfg.val_path:
        val_tokens, _, _ = _read_text(Path(cfg.val_path), cfg, "--data.val_path", tokenizer)
        val = [val_tokens]
        summary += f" + validation '{cfg.val_path}'"
    return _Corpus([tokens], val, summary)


def _bin_shards(path: Path, cfg: DataConfig, option: str) -> list[np.ndarray]:
    """Memory-maps a .bin file, or every *.bin in a directory (sorted), after checking size and id range."""
    dtype, vocab = BIN_DTYPES[cfg.bin_dtype], cfg.bin_vocab or BYTE_VOCAB
    files = sorted(path.glob("*.bin")) if path.is_dir() else [path]
    if not files:
        raise ConfigError(f"data path '{path}' holds no .bin files; set {option} to a .bin file or a folder of them")
    shards = []
    for f in files:
        size = f.stat().st_size
        if size % np.dtype(dtype).itemsize:
            raise ConfigError(f"'{f}' is {size} bytes, not a whole number of {cfg.bin_dtype} ids; set --data.bin_dtype to the type it was written with")
        if size == 0:
            continue  # np.memmap cannot map an empty file, and it holds no tokens anyway
        shard = np.memmap(f, dtype=dtype, mode="r")
        top = int(shard[: 1 << 20].max())  # a cheap check of the first 1M ids catches a wrong dtype or vocab
        if top >= vocab:
            raise ConfigError(
                f"'{f}' holds token id {top}, outside vocabulary size {vocab}; set --data.bin_vocab to the "
                "tokenizer's vocabulary size and check --data.bin_dtype"
            )
        shards.append(shard)
    return shards


def _bin_corpus(cfg: DataConfig, tokenizer: Tokenizer | None = None) -> _Corpus:  # ids already: no tokenizer
    train = _bin_shards(Path(cfg.path), cfg, "--data.path")
    val = _bin_shards(Path(cfg.val_path), cfg, "--data.val_path") if cfg.val_path else None
    n = len(train)
    summary = f"bin: {n} file{'s' * (n != 1)}, {cfg.bin_dtype}, vocab {cfg.bin_vocab or BYTE_VOCAB}"
    return _Corpus(train, val, summary + (f" + validation '{cfg.val_path}'" if cfg.val_path else ""))


def _hf_corpus(cfg: DataConfig, tokenizer: Tokenizer | None = None) -> _Corpus:
    import datasets  # optional dependency; its presence was checked in _check_config

    try:
        ds = datasets.load_from_disk(cfg.path)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"'{cfg.path}' is not a dataset saved with save_to_disk ({e}); set --data.path to such a folder") from None
    val_split = None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ConfigError(f"dataset '{cfg.path}' has splits {sorted(ds)} but no 'train'; save one named 'train'")
        val_split = next((s for s in ("validation", "test") if s in ds), None)
        train_ds, val_ds = ds["train"], ds[val_split] if val_split else None
    else:
        train_ds, val_ds = ds, None
    for d in (train_ds, val_ds):
        if d is not None and cfg.text_field not in d.column_names:
            raise ConfigError(
                f"dataset '{cfg.path}' has no column '{cfg.text_field}' (it has: {', '.join(d.column_names)}); "
                "set --data.text_field to the column that holds the text"
            )

    def docs(d) -> Iterator[bytes]:
        texts = (text for batch in d.iter(batch_size=1024) for text in batch[cfg.text_field])
        for row, text in enumerate(texts):
            yield _doc_bytes(text, f"dataset '{cfg.path}' row {row}", cfg.text_field)

    if tokenizer is None:
        train, cut = _join_capped(docs(train_ds), cfg.max_bytes)
        val = [_join_capped(docs(val_ds), cfg.max_bytes)[0]] if val_ds is not None else None
        size = _size_note(len(train), cut)
    else:  # keyed by the dataset folder's files, the split, the cap, the field and the tokenizer
        stats = file_stats(_sorted_files(Path(cfg.path), lambda p: True))
        cut_flags = [False]

        def encoded(d, split: str, cut: list[bool]) -> np.ndarray:
            name = cache_name("hf", [stats, split, cfg.max_bytes, cfg.text_field], tokenizer)
            return _load_or_build(cfg.cache_dir, name, lambda: tokenizer.encode_documents(
                capped_docs(docs(d), cfg.max_bytes, cut, len(SEPARATOR))))

        train = encoded(train_ds, "train", cut_flags)
        val = [encoded(val_ds, val_split, [False])] if val_ds is not None else None
        size = f"{len(train):,} tokens"
    summary = f"hf: {len(train_ds)} documents, {size}"
    return _Corpus([train], val, summary + (f" + '{val_split}' split" if val_split else ""))


_LOADERS = {"stdlib": _stdlib_corpus, "text": _text_corpus, "bin": _bin_corpus, "hf": _hf_corpus}


# ----------------------------------------------------------------------------- entry point


def _check_config(cfg: DataConfig) -> None:
    """Everything that can be checked without reading data, so a bad setting fails at once."""
    if cfg.source not in SOURCES:
        raise ConfigError(f"unknown data source '{cfg.source}'; set --data.source to one of: {', '.join(SOURCES)}")
    if cfg.source == "stdlib" and cfg.path:
        raise ConfigError(f"--data.path is set but the source is 'stdlib'; add --data.source text (or bin, hf) to read '{cfg.path}'")
    if cfg.val_path and cfg.source not in ("text", "bin"):
        raise ConfigError(f"--data.val_path works with sources 'text' and 'bin', not '{cfg.source}'; remove it")
    if cfg.source != "stdlib" and not cfg.path:
        raise ConfigError(f"data source '{cfg.source}' needs a path; set --data.path to a file or directory")
    for option, p in (("--data.path", cfg.path), ("--data.val_path", cfg.val_path)):
        if p and not os.path.exists(p):
            raise ConfigError(f"data path '{p}' does not exist; set {option} to a file or directory")
    if cfg.bin_dtype not in BIN_DTYPES:
        raise ConfigError(f"unknown --data.bin_dtype '{cfg.bin_dtype}'; use one of: {', '.join(BIN_DTYPES)}")
    max_vocab = np.iinfo(BIN_DTYPES[cfg.bin_dtype]).max + 1
    if not 0 <= cfg.bin_vocab <= max_vocab:
        raise ConfigError(f"--data.bin_vocab {cfg.bin_vocab} does not fit {cfg.bin_dtype} ids (at most {max_vocab}); use --data.bin_dtype uint32")
    if not 0 < cfg.val_fraction < 1:
        raise ConfigError(f"--data.val_fraction must be between 0 and 1 (exclusive), got {cfg.val_fraction}")
    if cfg.max_bytes <= 0:
        raise ConfigError(f"--data.max_bytes must be positive, got {cfg.max_bytes}")
    if cfg.source == "hf" and importlib.util.find_spec("datasets") is None:
        raise ConfigError("data source 'hf' needs the datasets package; install it with pip install 'hetrain[hf]'")


def _split_tail(shards: list[np.ndarray], val_fraction: float) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The last int(n * val_fraction) tokens become validation; slices of memmaps stay memmaps."""
    total = sum(len(s) for s in shards)
    cut = total - int(total * val_fraction)  # global index where validation starts
    train, val, start = [], [], 0
    for s in shards:
        end = start + len(s)
        if end <= cut:
            train.append(s)
        elif start >= cut:
            val.append(s)
        else:
            train.append(s[: cut - start])
            val.append(s[cut - start :])
        start = end
    return train, val


def build_data(cfg: DataConfig, seed: int, *, seq_len: int | None = None, rank: int = 0,
               tokenizer: Tokenizer | None = None) -> Data:
    """Loads the corpus that cfg names and splits it (validation = a separate set if one is given,
    else the last val_fraction of the tokens). Text sources are read as bytes, or with
    `tokenizer` when one is given ('bin' holds ids already and ignores it). Given seq_len, also
    checks that both splits are long enough. Raises ConfigError, with the fix, on bad settings
    or an empty corpus."""
    _check_config(cfg)
    tokenizer = None if cfg.source == "bin" else tokenizer
    corpus = _LOADERS[cfg.source](cfg, tokenizer)
    train, val = corpus.train, corpus.val
    if sum(len(s) for s in train) == 0:
        raise ConfigError(f"the {cfg.source} corpus{f' at {cfg.path!r}' if cfg.path else ''} has no tokens; set --data.path to non-empty data")
    if val is None:
        train, val = _split_tail(train, cfg.val_fraction)
    if tokenizer is not None:
        vocab_size, summary = tokenizer.vocab_size, f"{corpus.summary}, tokenized by {tokenizer.name}"
    else:
        vocab_size = (cfg.bin_vocab or BYTE_VOCAB) if cfg.source == "bin" else BYTE_VOCAB
        tokenizer = ByteTokenizer() if vocab_size == BYTE_VOCAB else None
        summary = corpus.summary
    data = Data(TokenStream(train, seed, rank), val, vocab_size, tokenizer, summary)
    if seq_len is not None:
        data.check(seq_len)
    return data
