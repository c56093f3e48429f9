"""Shared fixtures: a small corpus and a fast config, so every trainer test runs in seconds on CPU."""

import pytest
import torch

from hetrain.config import load_config


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Two threads on every machine: results must not depend on the core count of the runner.
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def corpus(tmp_path):
    """A text corpus made in the test: a few hundred KB of varied lines."""
    lines = [f"def f{i}(x):\n    return x * {i} + {i % 7}  # line {i}\n" for i in range(6000)]
    path = tmp_path / "corpus.txt"
    path.write_text("".join(lines))
    return path


def tiny_overrides(run_dir, corpus, **extra) -> dict[str, str]:
    values = {
        "run.dir": str(run_dir), "run.threads": "2", "model.preset": "tiny",
        "data.source": "text", "data.path": str(corpus), "data.cache_dir": "",
        "train.steps": "10", "train.micro_batch": "4", "train.seq_len": "32",
        "train.warmup_steps": "2", "train.eval_every": "5", "train.eval_batches": "2",
        "train.log_every": "1", "train.ckpt_every": "5", "log.progress": "false",
        "log.tensorboard": "false", "log.peak_flops": "1e11",
    }
    values.update({k: str(v) for k, v in extra.items()})
    return values


@pytest.fixture
def tiny_config(tmp_path, corpus):
    def make(run_dir=None, **extra):
        return load_config(None, tiny_overrides(run_dir or tmp_path / "run", corpus, **extra))
    return make
