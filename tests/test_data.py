"""Tests for hetrain.data: tokenizer, every corpus source, splits, batches, resume and bad input."""

import json
import os

import numpy as np
import pytest
import torch

from hetrain.data import SEPARATOR, ByteTokenizer, DataConfig, TokenStream, build_data
from hetrain.errors import ConfigError

TEXT = "def f(x):\n    return x * 2  # naïve ✓\n" * 40  # 1,640 characters, multi-byte UTF-8 included


def tokens_of(data):
    """All tokens of a Data, train then validation, as one int64 array."""
    return np.concatenate([np.asarray(s, dtype=np.int64) for s in data.train.shards + data.val_shards])


def write_text(tmp_path, name="corpus.txt", text=TEXT):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- tokenizer


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode(TEXT)
    assert tok.vocab_size == 256
    assert len(ids) == len(TEXT.encode("utf-8")) > len(TEXT)  # multi-byte characters take several ids
    assert ids.max() < 256
    assert tok.decode(ids) == TEXT
    assert tok.decode(list(ids)) == TEXT
    assert tok.decode(torch.from_numpy(ids.astype(np.int64))) == TEXT
    # a window cut inside a character decodes with a replacement character, not an exception
    assert tok.decode(tok.encode("✓")[:2]) == "\ufffd"
    with pytest.raises(ValueError):
        tok.decode([300])


# ----------------------------------------------------------------------------- sources


def test_text_file_source_and_tail_split(tmp_path):
    path = write_text(tmp_path)
    data = build_data(DataConfig(source="text", path=str(path), val_fraction=0.25), seed=0)
    raw = TEXT.encode("utf-8")
    assert data.vocab_size == 256 and isinstance(data.tokenizer, ByteTokenizer)
    assert bytes(tokens_of(data).astype(np.uint8)) == raw
    # validation is exactly the last int(n * val_fraction) tokens
    n_val = int(len(raw) * 0.25)
    assert data.num_val_tokens == n_val
    assert data.train.num_tokens == len(raw) - n_val
    assert bytes(np.asarray(data.val_shards[0]).astype(np.uint8)) == raw[-n_val:]
    assert data.describe().startswith("text: 1 file, 0.0 MB, ")
    assert "train /" in data.describe() and "val tokens" in data.describe()


def test_text_directory_is_read_sorted_with_separator(tmp_path):
    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    write_text(folder, "b.txt", "second")
    write_text(folder / "sub", "c.txt", "third")
    write_text(folder, "a.txt", "first")
    write_text(folder, ".hidden", "skipped")
    data = build_data(DataConfig(source="text", path=str(folder), val_fraction=0.1), seed=0)
    joined = bytes(tokens_of(data).astype(np.uint8))
    assert joined == SEPARATOR.join([b"first", b"second", b"third"])
    assert data.describe().startswith("text: 3 files")


def test_jsonl_source_reads_the_text_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    lines = [{"body": "alpha", "id": 1}, {"body": "béta", "id": 2}, {"body": "gamma", "id": 3}]
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n\n", encoding="utf-8")
    data = build_data(DataConfig(source="text", path=str(path), text_field="body", val_fraction=0.2), seed=0)
    assert data.tokenizer.decode(tokens_of(data)) == "alpha\n\nbéta\n\ngamma"


def test_text_val_path_is_used_as_validation(tmp_path):
    train, val = write_text(tmp_path, "train.txt", "a" * 100), write_text(tmp_path, "val.txt", "b" * 30)
    data = build_data(DataConfig(source="text", path=str(train), val_path=str(val)), seed=0)
    assert data.train.num_tokens == 100 and data.num_val_tokens == 30
    assert set(np.asarray(data.val_shards[0]).tolist()) == {ord("b")}


def test_max_bytes_cuts_the_corpus(tmp_path):
    path = write_text(tmp_path)
    data = build_data(DataConfig(source="text", path=str(path), max_bytes=500, val_fraction=0.1), seed=0)
    assert len(tokens_of(data)) == 500
    assert bytes(tokens_of(data).astype(np.uint8)) == TEXT.encode("utf-8")[:500]
    assert "first 0.0 MB (--data.max_bytes)" in data.describe()


def test_bin_source_memmaps_and_splits(tmp_path):
    ids = (np.arange(5000) * 7 % 50000).astype(np.uint16)
    ids.tofile(tmp_path / "train.bin")
    cfg = DataConfig(source="bin", path=str(tmp_path / "train.bin"), bin_vocab=50304, val_fraction=0.1)
    data = build_data(cfg, seed=0)
    assert isinstance(data.train.shards[0], np.memmap)
    assert data.vocab_size == 50304 and data.tokenizer is None
    np.testing.assert_array_equal(tokens_of(data), ids)
    assert data.num_val_tokens == 500
    x, y = data.train.next_batch(4, 16)
    assert x.max() < 50304 and x.dtype == torch.int64
    assert data.describe().startswith("bin: 1 file, uint16, vocab 50304")


def test_bin_shards_val_path_and_uint32(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    a, b = np.arange(0, 300, dtype=np.uint32), np.arange(300, 500, dtype=np.uint32) + 70000
    b.tofile(shards / "001.bin")
    a.tofile(shards / "000.bin")
    val = np.full(50, 9, dtype=np.uint32)
    val.tofile(tmp_path / "val.bin")
    cfg = DataConfig(source="bin", path=str(shards), val_path=str(tmp_path / "val.bin"), bin_dtype="uint32", bin_vocab=100000)
    data = build_data(cfg, seed=0)
    assert [len(s) for s in data.train.shards] == [300, 200]  # sorted by name, not by write order
    np.testing.assert_array_equal(np.asarray(data.val_shards[0]), val)
    # a window never crosses from one file into the next: x[t+1] - x[t] is 1 inside each file
    for _ in range(20):
        x, y = data.train.next_batch(8, 32)
        assert torch.all(y - x == 1)


def test_tail_split_across_bin_shards(tmp_path):
    for i in range(3):
        np.full(100, i, dtype=np.uint16).tofile(tmp_path / f"{i}.bin")
    data = build_data(DataConfig(source="bin", path=str(tmp_path), val_fraction=0.5), seed=0)
    assert [len(s) for s in data.train.shards] == [100, 50]
    assert [len(s) for s in data.val_shards] == [50, 100]
    assert np.asarray(data.val_shards[0]).tolist() == [1] * 50


def test_hf_dataset_dict_uses_its_validation_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"content": ["first doc", "second doc"]}),
            "validation": datasets.Dataset.from_dict({"content": ["held out"]}),
        }
    )
    ds.save_to_disk(str(tmp_path / "ds"))
    data = build_data(DataConfig(source="hf", path=str(tmp_path / "ds"), text_field="content"), seed=0)
    tok = data.tokenizer
    assert tok.decode(data.train.shards[0]) == "first doc\n\nsecond doc"
    assert tok.decode(data.val_shards[0]) == "held out"
    assert data.describe().startswith("hf: 2 documents") and "'validation' split" in data.describe()

    # a plain Dataset (no splits) is split at the tail
    datasets.Dataset.from_dict({"text": ["x" * 90, "y" * 8]}).save_to_disk(str(tmp_path / "plain"))
    data = build_data(DataConfig(source="hf", path=str(tmp_path / "plain"), val_fraction=0.1), seed=0)
    assert data.num_val_tokens == 10 and tok.decode(data.val_shards[0]) == "\n\n" + "y" * 8


def test_stdlib_source_loads_deterministically_and_caches(tmp_path):
    cfg = DataConfig(max_bytes=200_000, cache_dir=str(tmp_path / "cache"))
    first = build_data(cfg, seed=0, seq_len=64)
    files = os.listdir(tmp_path / "cache")
    assert len(files) == 1 and files[0].startswith("stdlib-py") and files[0].endswith(".npy")
    cached = build_data(cfg, seed=0)  # served from the cache file
    uncached = build_data(DataConfig(max_bytes=200_000, cache_dir=""), seed=0)
    assert len(tokens_of(first)) == 200_000
    np.testing.assert_array_equal(tokens_of(first), tokens_of(cached))
    np.testing.assert_array_equal(tokens_of(first), tokens_of(uncached))
    assert first.describe() == cached.describe()
    assert first.describe().startswith("stdlib: ") and "first 0.2 MB (--data.max_bytes)" in first.describe()
    text = first.tokenizer.decode(tokens_of(first)[:20000])
    assert "def " in text and "import " in text  # it really is Python source
    assert not any(f.endswith(".tmp") for f in os.listdir(tmp_path / "cache"))  # written atomically


class WordTokenizer:
    """A stand-in for a model's tokenizer (hetrain.data.Tokenizer): one id per word, 0 ends a
    document; counts its calls, so a test can see the cache served the tokens."""

    vocab_size, fingerprint, name = 1000, "words-v1", "WordTokenizer"

    def __init__(self):
        self.calls = 0

    def encode_documents(self, docs):
        self.calls += 1
        ids = []
        for doc in docs:
            ids += [1 + sum(map(ord, w)) % 999 for w in doc.split()] + [0]
        return np.asarray(ids, dtype=np.uint16)

    def decode(self, ids):
        return " ".join(map(str, ids))


def test_text_with_a_tokenizer_is_cached_and_capped(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in ["one two", "three", "four five six"]), encoding="utf-8")
    cfg = DataConfig(source="text", path=str(path), cache_dir=str(tmp_path / "cache"), val_fraction=0.2)
    tok = WordTokenizer()
    data = build_data(cfg, seed=0, tokenizer=tok)
    assert data.vocab_size == 1000 and data.tokenizer is tok and "tokenized by WordTokenizer" in data.describe()
    assert len(tokens_of(data)) == 9 and list(tokens_of(data)).count(0) == 3  # each document ends with 0
    again = build_data(cfg, seed=0, tokenizer=tok)
    assert tok.calls == 1  # the second read came from the cache
    np.testing.assert_array_equal(tokens_of(again), tokens_of(data))
    other = WordTokenizer()
    other.fingerprint = "words-v2"  # another tokenizer: another cache entry
    build_data(cfg, seed=0, tokenizer=other)
    assert other.calls == 1 and len(os.listdir(tmp_path / "cache")) == 2
    capped = build_data(DataConfig(source="text", path=str(path), cache_dir="", max_bytes=12, val_fraction=0.2),
                        seed=0, tokenizer=WordTokenizer())
    # "one two" (7 bytes), then "thr" of "three" (12 with a separator's 2 bytes): 2 + 1 words, 2 ends
    assert len(tokens_of(capped)) == 5 and "5 tokens" in capped.describe()
    # .bin files hold ids already: no tokenizer reads them
    np.arange(100, dtype=np.uint16).tofile(tmp_path / "ids.bin")
    bin_data = build_data(DataConfig(source="bin", path=str(tmp_path / "ids.bin"), bin_vocab=100), seed=0,
                          tokenizer=WordTokenizer())
    assert bin_data.vocab_size == 100 and bin_data.tokenizer is None


# ----------------------------------------------------------------------------- batches


@pytest.fixture
def text_data(tmp_path):
    return build_data(DataConfig(source="text", path=str(write_text(tmp_path)), val_fraction=0.2), seed=3)


def test_batches_have_shape_and_shift(text_data):
    train = np.asarray(text_data.train.shards[0], dtype=np.int64)
    x, y = text_data.train.next_batch(5, 24)
    assert x.shape == y.shape == (5, 24) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row_x, row_y in zip(x.numpy(), y.numpy()):
        # each row is a real window of the train split, and y continues it by one token
        starts = [i for i in range(len(train) - 24) if np.array_equal(train[i : i + 24], row_x)]
        assert starts and np.array_equal(train[starts[0] + 1 : starts[0] + 25], row_y)


def test_batches_are_seeded_and_differ_between_steps_and_ranks(text_data):
    same = TokenStream(text_data.train.shards, seed=3)
    other_seed = TokenStream(text_data.train.shards, seed=4)
    other_rank = TokenStream(text_data.train.shards, seed=3, rank=1)
    a1, a2 = text_data.train.next_batch(4, 16)[0], text_data.train.next_batch(4, 16)[0]
    assert torch.equal(a1, same.next_batch(4, 16)[0]) and not torch.equal(a1, a2)
    assert not torch.equal(a1, other_seed.next_batch(4, 16)[0])
    assert not torch.equal(a1, other_rank.next_batch(4, 16)[0])


def test_state_dict_resumes_the_exact_stream(text_data):
    uninterrupted = TokenStream(text_data.train.shards, seed=7)
    expected = [uninterrupted.next_batch(4, 16) for _ in range(6)]

    stream = TokenStream(text_data.train.shards, seed=7)
    for _ in range(3):
        stream.next_batch(4, 16)
    state = json.loads(json.dumps(stream.state_dict()))  # plain python values survive a round trip
    assert all(isinstance(v, int) for v in state.values())

    resumed = TokenStream(text_data.train.shards, seed=999)  # the seed comes from the state
    resumed.load_state_dict(state)
    for x_exp, y_exp in expected[3:]:
        x, y = resumed.next_batch(4, 16)
        assert torch.equal(x, x_exp) and torch.equal(y, y_exp)


def test_state_from_another_corpus_is_refused(text_data):
    state = text_data.train.state_dict() | {"num_tokens": 12}
    with pytest.raises(ConfigError, match="same --data settings"):
        text_data.train.load_state_dict(state)


def test_val_batches_are_fixed(text_data):
    first = text_data.val_batches(3, 16, n_batches=4)
    text_data.train.next_batch(3, 16)  # training in between changes nothing
    second = text_data.val_batches(3, 16, n_batches=4)
    assert len(first) == 4
    for (x1, y1), (x2, y2) in zip(first, second):
        assert x1.shape == (3, 16) and torch.equal(x1, x2) and torch.equal(y1, y2)
        assert torch.equal(x1[:, 1:], y1[:, :-1])
    val = np.asarray(text_data.val_shards[0], dtype=np.int64)
    assert np.array_equal(first[0][0][0].numpy(), val[:16])  # the first window starts the split
    assert np.array_equal(first[-1][1][-1].numpy(), val[-16:])  # the last one ends it


# ----------------------------------------------------------------------------- bad input


def bad(tmp_path):
    """(config, words the message must contain) for every bad setting that needs no data."""
    missing = str(tmp_path / "nope")
    return [
        (DataConfig(source="csv"), ["unknown data source 'csv'", "stdlib, text, bin, hf"]),
        (DataConfig(source="text", path=missing), [f"data path '{missing}' does not exist", "set --data.path"]),
        (DataConfig(source="bin", path=str(tmp_path), val_path=missing), ["does not exist", "--data.val_path"]),
        (DataConfig(source="text"), ["needs a path", "--data.path"]),
        (DataConfig(path=str(tmp_path)), ["source is 'stdlib'", "--data.source text"]),
        (DataConfig(source="bin", path=str(tmp_path), bin_dtype="int8"), ["--data.bin_dtype 'int8'", "uint16, uint32"]),
        (DataConfig(source="bin", path=str(tmp_path), bin_vocab=70000), ["at most 65536", "uint32"]),
        (DataConfig(val_fraction=1.0), ["--data.val_fraction", "between 0 and 1"]),
        (DataConfig(max_bytes=0), ["--data.max_bytes must be positive"]),
    ]


def test_bad_settings_fail_before_reading(tmp_path):
    for cfg, words in bad(tmp_path):
        with pytest.raises(ConfigError) as err:
            build_data(cfg, seed=0)
        message = str(err.value)
        assert "\n" not in message
        for w in words:
            assert w in message, (cfg, message)


def test_empty_and_short_corpora(tmp_path):
    empty = write_text(tmp_path, "empty.txt", "")
    with pytest.raises(ConfigError, match="has no tokens; set --data.path"):
        build_data(DataConfig(source="text", path=str(empty)), seed=0)
    with pytest.raises(ConfigError, match="holds no files"):
        build_data(DataConfig(source="text", path=str((tmp_path / "void").mkdir() or tmp_path / "void")), seed=0)

    short = write_text(tmp_path, "short.txt", "x" * 100)  # 95 train / 5 val tokens
    cfg = DataConfig(source="text", path=str(short))
    with pytest.raises(ConfigError, match=r"validation split has 5 tokens.*needs at least 9"):
        build_data(cfg, seed=0, seq_len=8)
    with pytest.raises(ConfigError, match=r"train split has 95 tokens.*needs at least 129"):
        build_data(cfg, seed=0, seq_len=128)
    data = build_data(cfg, seed=0)  # without seq_len the check comes at the first batch
    with pytest.raises(ConfigError, match="needs at least 97"):
        data.train.next_batch(2, 96)
    with pytest.raises(ConfigError, match="needs at least 9"):
        data.val_batches(2, 8, 1)


def test_jsonl_without_the_field(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "fine"}\n{"body": "no text here", "id": 2}\n', encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        build_data(DataConfig(source="text", path=str(path)), seed=0)
    assert "docs.jsonl:2 has no 'text' field (it has: body, id)" in str(err.value)
    assert "--data.text_field" in str(err.value)

    path.write_text('{"text": "fine"}\nnot json\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="docs.jsonl:2 is not valid JSON"):
        build_data(DataConfig(source="text", path=str(path)), seed=0)


def test_bin_with_wrong_dtype_or_vocab(tmp_path):
    path = tmp_path / "odd.bin"
    path.write_bytes(b"\x01\x02\x03")  # 3 bytes: not a whole number of uint16 ids
    with pytest.raises(ConfigError, match="not a whole number of uint16 ids; set --data.bin_dtype"):
        build_data(DataConfig(source="bin", path=str(path)), seed=0)

    np.array([1, 2, 50000], dtype=np.uint16).tofile(path)  # GPT-2-sized ids read with the byte vocabulary
    with pytest.raises(ConfigError, match="token id 50000, outside vocabulary size 256; set --data.bin_vocab"):
        build_data(DataConfig(source="bin", path=str(path)), seed=0)

    np.arange(10, dtype=np.uint16).tofile(path)  # uint16 data read as uint32 gives huge ids
    with pytest.raises(ConfigError, match="--data.bin_dtype"):
        build_data(DataConfig(source="bin", path=str(path), bin_dtype="uint32"), seed=0)

    with pytest.raises(ConfigError, match="holds no .bin files"):
        build_data(DataConfig(source="bin", path=str((tmp_path / "empty").mkdir() or tmp_path / "empty")), seed=0)


def test_hf_errors(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"body": ["a"]}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(ConfigError, match=r"no column 'text' \(it has: body\); set --data.text_field"):
        build_data(DataConfig(source="hf", path=str(tmp_path / "ds")), seed=0)
    (tmp_path / "notds").mkdir()
    with pytest.raises(ConfigError, match="not a dataset saved with save_to_disk"):
        build_data(DataConfig(source="hf", path=str(tmp_path / "notds")), seed=0)

    # without the optional dependency the error names the extra to install
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "datasets" else real_find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"pip install 'hetrain\[hf\]'"):
        build_data(DataConfig(source="hf", path=str(tmp_path / "ds")), seed=0)
