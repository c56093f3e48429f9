"""Shared fixtures: a small corpus and a fast config, so every trainer test runs in seconds on CPU."""

import os

# OpenMP threads spin while waiting by default, which stalls every parallel op when other
# processes hold the cores; read once when torch loads, so it is set before the import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

from hetrain.config import load_config  # noqa: E402
from tests_support import tiny_overrides  # noqa: E402


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Two threads on every machine: results must not depend on the core count of the runner.
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_tf32():
    """CUDA matmuls in full fp32 for the test (TF32 would differ from the CPU reference)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.fixture
def corpus(tmp_path):
    """A text corpus made in the test: a few hundred KB of varied lines."""
    lines = [f"def f{i}(x):\n    return x * {i} + {i % 7}  # line {i}\n" for i in range(6000)]
    path = tmp_path / "corpus.txt"
    path.write_text("".join(lines))
    return path


@pytest.fixture
def tiny_config(tmp_path, corpus):
    def make(run_dir=None, **extra):
        return load_config(None, tiny_overrides(run_dir or tmp_path / "run", corpus, **extra))
    return make
