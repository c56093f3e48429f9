"""Recomputation in cluster runs, on demand and inside gradient waits, trains exactly the model without it.

Two CPU processes (gloo, one thread each) train a 5-block tiny GPT with dropout 0.1 on 8 sequences
per step for 6 steps, as PP 2 (3 + 2 blocks, 4 micro-batches of 2). Every run is compared with the
same layout without recomputation (with dropout on, each rank draws its own random numbers, so the
reference is the layout, not one process): the loss of every step and every parameter after the last
must be bitwise equal. The policies cover every family: whole blocks on demand, whole blocks and
units recomputed while the stage waits for a gradient, units on demand, regions whose last step
reruns, a window policy on the last stage (which has no wait: its backward recomputes them), and
interleaved chunks.
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cluster_support import losses, one_group_cluster, pipeline, torchrun, write_plan

pytestmark = pytest.mark.slow
STEPS = 6
ALL = ["norm1", "qkv", "attn", "proj", "norm2", "up", "act"]


def args(run_dir, corpus) -> list[str]:
    values = {"run.dir": run_dir, "run.threads": 1, "data.source": "text", "data.path": corpus,
              "data.cache_dir": "", "train.steps": STEPS, "train.warmup_steps": 2, "train.eval_every": 3,
              "train.eval_batches": 2, "train.log_every": 1, "train.ckpt_every": 0, "log.progress": "false",
              "log.tensorboard": "false", "log.peak_flops": 1e11, "log.trace_steps": 2}
    return [a for k, v in values.items() for a in (f"--{k}", str(v))]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}  # line {i}\n" for i in range(6000)))
    return path


def train(tmp_path: Path, corpus, name: str, pipe=None, **options) -> tuple[Path, str]:
    pipe = pipe or pipeline(["cpu-a"], [3, 2], **options)
    plan = write_plan(tmp_path / f"{name}.json", one_group_cluster(2), [pipe], dropout=0.1)
    run_dir = tmp_path / name
    done = torchrun(2, ["--plan.file", str(plan)] + args(run_dir, corpus), tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return run_dir, done.stdout


def assert_bitwise(run_dir: Path, ref_dir: Path) -> None:
    assert losses(run_dir) == losses(ref_dir)
    a, b = load_file(ref_dir / "model.safetensors"), load_file(run_dir / "model.safetensors")
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_every_recompute_policy_trains_bitwise_the_model_without_recomputation(tmp_path, corpus):
    ref, _ = train(tmp_path, corpus, "none")
    whole, out = train(tmp_path, corpus, "whole", recompute=[3, 2])
    assert_bitwise(whole, ref)
    assert "ms on demand" in out and "0 regions ahead" in out

    overlapped, out = train(tmp_path, corpus, "units", policies=[
        [{"first_block": 0, "n_blocks": 1, "window": ALL, "demand": []},
         {"first_block": 1, "n_blocks": 2, "window": ["norm1", "qkv", "attn"], "demand": ["up", "act"]}],
        [{"first_block": 3, "n_blocks": 1, "window": [], "demand": ["qkv"]},
         {"first_block": 4, "n_blocks": 1, "window": ["act"], "demand": []}]])
    assert_bitwise(overlapped, ref)
    stage0 = next(line for line in out.splitlines() if "P0 S0:" in line and "ms ahead" in line)
    assert "inside waits" in stage0 and " 0 regions ahead" not in stage0  # stage 0 recomputed inside its waits
    stage1 = next(line for line in out.splitlines() if "P0 S1:" in line and "ms ahead" in line)
    assert "0.00 ms ahead" in stage1 and "0 regions ahead, 24 left" in stage1  # no wait on the last stage

    ref_chunks, _ = train(tmp_path, corpus, "interleaved-none", virtual_stages=2)
    pipe = pipeline(["cpu-a"], [3, 2], virtual_stages=2)
    for st in pipe.stages:  # every chunk: its first block whole in a window, the others' MLP on demand
        st.recompute = {"blocks": [{"first_block": st.first_block, "n_blocks": 1, "window": ALL, "demand": []}]}
        if st.n_blocks > 1:
            st.recompute["blocks"].append({"first_block": st.first_block + 1, "n_blocks": st.n_blocks - 1,
                                           "window": [], "demand": ["up", "act"]})
    chunks, out = train(tmp_path, corpus, "interleaved", pipe)
    assert_bitwise(chunks, ref_chunks)
    assert "schedule interleaved 1F1B" in out  # (its random numbers come in another order than 1F1B's)


def test_a_resume_with_dropout_draws_the_masks_of_the_run_it_resumes(tmp_path, corpus):
    """Every rank saves its random state under its place and layout: resuming step 3 under the same
    plan gives bitwise the losses and parameters of the uninterrupted run; under another layout
    the run says its masks differ (each rank re-seeds)."""
    plan = write_plan(tmp_path / "plan.json", one_group_cluster(2), [pipeline(["cpu-a"], [3, 2], recompute=[1, 0])],
                      dropout=0.1)
    full = tmp_path / "full"
    done = torchrun(2, ["--plan.file", str(plan)] + args(full, corpus) + ["--train.ckpt_every", "3"], tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    step3 = full / "checkpoints" / "step_00000003"
    again = tmp_path / "again"
    done = torchrun(2, ["--plan.file", str(plan)] + args(again, corpus) + ["--run.resume", str(step3)], tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "random state restored" in done.stdout
    want = losses(full)
    assert losses(again) == {s: want[s] for s in (4, 5, 6)}
    a, b = load_file(full / "model.safetensors"), load_file(again / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = write_plan(tmp_path / "other.json", one_group_cluster(2), [pipeline(["cpu-a"], [2, 3])], dropout=0.1)
    done = torchrun(2, ["--plan.file", str(other)] + args(tmp_path / "other", corpus) + ["--run.resume", str(step3)],
                    tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "random state re-seeded" in done.stdout
