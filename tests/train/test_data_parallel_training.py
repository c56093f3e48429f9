"""`torchrun --nproc_per_node 2 -m hetrain.cli train` (gloo on CPU) trains the model that one
process trains with twice the gradient accumulation, and resumes from its checkpoint."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from hetrain.train.trainer import Trainer
from tests_support import cli_args


def torchrun(args: list[str], cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "hetrain.cli", "train"] + args
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow
def test_two_ranks_train_the_model_of_one_process_and_resume(tmp_path, corpus, tiny_config):
    budget = {"memory.device_budget": "70%", "hardware.device_kind": "cpu", "run.threads": "1"}
    one = Trainer(tiny_config(tmp_path / "one", **budget, **{"train.grad_accum": 2})).fit()
    done = torchrun(cli_args(tmp_path / "two", corpus, **budget), tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "data parallel over 2 ranks" in done.stdout and done.stdout.count("hetrain: done") == 1
    two = losses(tmp_path / "two")
    assert [two[s] for s in sorted(one.losses)] == pytest.approx([one.losses[s] for s in sorted(one.losses)],
                                                                   rel=1e-6)
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    for key in a:  # the norms of sharded layers add partial squares: equal to rounding
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)
    # Resumed from step 5 under torchrun: the same steps 6-10.
    step5 = tmp_path / "two" / "checkpoints" / "step_00000005"
    done = torchrun(cli_args(tmp_path / "resumed", corpus, **budget, **{"run.resume": step5}), tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = losses(tmp_path / "resumed")
    assert [resumed[s] for s in range(6, 11)] == pytest.approx([two[s] for s in range(6, 11)], rel=1e-6)
    # The two ranks' checkpoint resumed by one process, plainly (twice the accumulation): the same steps.
    alone = Trainer(tiny_config(tmp_path / "alone", **{"train.grad_accum": 2, "run.resume": step5,
                                                       "memory.device_budget": "none"})).fit()
    assert [alone.losses[s] for s in range(6, 11)] == pytest.approx([two[s] for s in range(6, 11)], rel=1e-6)


@pytest.mark.slow
def test_two_ranks_train_a_hugging_face_model_like_one_process(tmp_path, corpus, tiny_config):
    pytest.importorskip("transformers")
    from tests_support import save_tiny_hf

    path = save_tiny_hf(tmp_path / "llama", "llama")
    budget = {"memory.device_budget": "70%", "hardware.device_kind": "cpu", "run.threads": "1",
              "hf.path": str(path), "train.steps": 6}
    one = Trainer(tiny_config(tmp_path / "one", **budget, **{"train.grad_accum": 2})).fit()
    done = torchrun(cli_args(tmp_path / "two", corpus, **budget), tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "data parallel over 2 ranks" in done.stdout
    two = losses(tmp_path / "two")
    assert [two[s] for s in sorted(one.losses)] == pytest.approx([one.losses[s] for s in sorted(one.losses)],
                                                                   rel=1e-6)
    assert (tmp_path / "two" / "hf_model" / "model.safetensors").is_file()
