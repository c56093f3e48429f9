"""Cluster plans run under torchrun (gloo, one thread per process) train the model one process trains.

Every layout is checked against one process training the same 5-block tiny model on the same
global batch (8 sequences of 32 tokens: `hetrain train --memory.device_budget none
--train.micro_batch 2 --train.grad_accum 4`): the loss of every one of 10 steps to 1e-5
relative, and every parameter after them (see `assert_same_params` for the tolerance).
Processes are started once per test and each run checks several things.
"""

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cluster_support import (LOCAL_CPU, N_LAYER, SEQ_LEN, env, local_cpu, losses, one_group_cluster, pipeline,
                             records, torchrun, torchrun_cmd, write_plan)
from hetrain.cli import main
from hetrain.config import load_config
from hetrain.trace import read_chrome_trace
from tests_support import assert_params_match
from hetrain.train.trainer import Trainer

pytestmark = pytest.mark.slow
STEPS = 10


def run_args(run_dir, corpus, **extra) -> list[str]:
    values = {"run.dir": run_dir, "run.threads": 1, "data.source": "text", "data.path": corpus, "data.cache_dir": "",
              "train.steps": STEPS, "train.warmup_steps": 2, "train.eval_every": 5, "train.eval_batches": 2,
              "train.log_every": 1, "train.ckpt_every": 5, "log.progress": "false", "log.tensorboard": "false",
              "log.peak_flops": 1e11, **extra}
    return [a for k, v in values.items() for a in (f"--{k}", str(v))]


def one_process_config(run_dir, corpus, **extra):
    """The reference: one process, plain PyTorch training, the plans' model and global batch."""
    values = dict(zip(*[iter(run_args(run_dir, corpus, **extra))] * 2))
    values = {k[2:]: v for k, v in values.items()}
    values.update({"model.preset": "tiny", "model.n_layer": str(N_LAYER), "train.seq_len": str(SEQ_LEN),
                   "memory.device_budget": "none", "train.micro_batch": "2", "train.grad_accum": "4"})
    return load_config(None, values)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}  # line {i}\n" for i in range(6000)))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus):
    run_dir = tmp_path_factory.mktemp("one") / "run"
    Trainer(one_process_config(run_dir, corpus)).fit()
    return run_dir


def assert_same_losses(run_dir, ref_dir, steps=range(1, STEPS + 1)):
    got, want = losses(run_dir), losses(ref_dir)
    assert [got[s] for s in steps] == pytest.approx([want[s] for s in steps], rel=1e-5)


def assert_same_params(run_dir, ref_dir):
    """Every element to 1e-5 relative or 1e-6 absolute, but 1 in 200 of each tensor that may
    differ by up to 1e-4 (lr / 30; tests_support.assert_params_match says why)."""
    a, b = load_file(Path(ref_dir) / "model.safetensors"), load_file(Path(run_dir) / "model.safetensors")
    assert_params_match(b, a, rtol=1e-5, atol=1e-6)


def check_run(done: subprocess.CompletedProcess, run_dir, ref_dir):
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert done.stdout.count("hetrain: done") == 1  # rank 0 speaks for all
    assert "compute: fp32; the plan was priced for bf16" in done.stdout
    assert_same_losses(run_dir, ref_dir)
    assert_same_params(run_dir, ref_dir)


def test_pipeline_1f1b_and_interleaved_1f1b_train_the_one_process_model(tmp_path, corpus, reference):
    """PP=2 (3 + 2 blocks, one recomputed), then the same stages as 2 x 2 interleaved chunks."""
    plain = write_plan(tmp_path / "pp2.json", one_group_cluster(2), [pipeline(["cpu-a"], [3, 2], recompute=[1, 0])])
    inter = write_plan(tmp_path / "pp2v.json", one_group_cluster(2),
                       [pipeline(["cpu-a"], [3, 2], recompute=[1, 0], virtual_stages=2)])
    done = torchrun(2, ["--plan.file", plain] + run_args(tmp_path / "1f1b", corpus), tmp_path)
    check_run(done, tmp_path / "1f1b", reference)
    assert "schedule 1F1B" in done.stdout
    done = torchrun(2, ["--plan.file", inter] + run_args(tmp_path / "inter", corpus), tmp_path)
    check_run(done, tmp_path / "inter", reference)
    assert "schedule interleaved 1F1B" in done.stdout
    assert losses(tmp_path / "inter") == pytest.approx(losses(tmp_path / "1f1b"), rel=1e-6)
    val = {r["step"]: r["val_loss"] for r in records(tmp_path / "inter") if r["val_loss"] is not None}
    want = {r["step"]: r["val_loss"] for r in records(reference) if r["val_loss"] is not None}
    assert val == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("layout", ["pp2", "tp2"])
def test_bf16_trains_the_one_process_bf16_model(tmp_path, corpus, reference, layout):
    """--train.dtype bf16: every stage reads one bf16 copy of its fp32 weights per step and computes
    under autocast, bf16 activations crossing between stages, as one process does with --train.dtype
    bf16 (hetrain.precision); recomputation reruns with the same copy and autocast state.

    Not bitwise: a pipeline adds the tied matrix's two gradients (and TP its shards' sums) in
    another order, and bf16 turns those 1e-7 differences of the weights into different roundings
    of their bf16 copies; TP also sums its ranks' bf16 partial outputs (one more rounding, into a
    bf16 residual stream). Measured over 10 steps (2026-12-05): PP within 7e-5 relative for every
    loss, parameters within 0.03% of their norm; TP within 2e-3 over the first 6 steps, then 1.1%
    at step 7, where the one-process bf16 run's loss jumps 1.3% above fp32 training's and the TP
    run's stays within 0.2% of it; parameters within 0.7% of their norm. On an AMD EPYC
    (2026-12-06; other bf16 kernels) PP within 3.1e-4 over the first 6 steps and 5.8e-4 over all
    (bf16 itself moved the losses up to 6.6e-3 from fp32's there), TP within 2.4e-3 and 7.9e-3.
    Held at: PP 5e-4 for the first 6 and 2e-3 for all; TP 3e-3 for the first 6 and 2e-2 for all;
    1% of the norm for the parameters; and the run must differ from fp32 training (bf16 really
    ran)."""
    bf16 = {"train.dtype": "bf16"}
    Trainer(one_process_config(tmp_path / "one", corpus, **bf16)).fit()
    pipe = pipeline(["cpu-a"], [3, 2], recompute=[1, 0]) if layout == "pp2" else pipeline(["cpu-a"], [N_LAYER], tp=2)
    plan = write_plan(tmp_path / "plan.json", one_group_cluster(2), [pipe])
    done = torchrun(2, ["--plan.file", plan] + run_args(tmp_path / "run", corpus, **bf16), tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "compute: bf16 (one bf16 copy of the fp32 weights per step" in done.stdout
    got, want, fp32 = losses(tmp_path / "run"), losses(tmp_path / "one"), losses(reference)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    early = [s for s in want if s <= 6]
    assert [got[s] for s in early] == pytest.approx([want[s] for s in early], rel=5e-4 if layout == "pp2" else 3e-3)
    assert [got[s] for s in want] == pytest.approx([want[s] for s in want], rel=2e-3 if layout == "pp2" else 2e-2)
    assert max(abs(got[s] - fp32[s]) / fp32[s] for s in got) > 1e-4  # bf16 really ran
    a, b = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "run" / "model.safetensors")
    assert sorted(a) == sorted(b)
    want_all, got_all = torch.cat([a[k].flatten() for k in a]), torch.cat([b[k].flatten() for k in a])
    assert float((got_all - want_all).norm() / want_all.norm()) < 1e-2


@pytest.mark.parametrize("layout", ["tp2", "pp4-uneven"])
def test_tensor_parallel_and_an_uneven_pipeline_train_the_one_process_model(tmp_path, corpus, reference, layout):
    if layout == "tp2":
        nproc, pipe = 2, pipeline(["cpu-a"], [N_LAYER], tp=2)
    else:  # 2 + 1 + 1 + 1 blocks, the second stage recomputing its block
        nproc, pipe = 4, pipeline(["cpu-a"], [2, 1, 1, 1], recompute=[0, 1, 0, 0])
    plan = write_plan(tmp_path / "plan.json", one_group_cluster(nproc), [pipe])
    check_run(torchrun(nproc, ["--plan.file", plan] + run_args(tmp_path / "run", corpus), tmp_path),
              tmp_path / "run", reference)
    if layout == "tp2":  # a TP 2 x PP 2 run resumes the TP 2 run's step 5: TP checkpoint into TP
        step5 = tmp_path / "run" / "checkpoints" / "step_00000005"
        other = write_plan(tmp_path / "tp2pp2.json", one_group_cluster(4), [pipeline(["cpu-a"], [3, 2], tp=2)])
        done = torchrun(4, ["--plan.file", other] + run_args(tmp_path / "again", corpus, **{"run.resume": step5}),
                        tmp_path)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
        assert "resumed from" in done.stdout
        assert_same_losses(tmp_path / "again", reference, steps=range(6, STEPS + 1))
        assert_same_params(tmp_path / "again", reference)


def test_tensor_parallel_with_residual_dropout_trains_the_one_process_model(tmp_path, corpus, reference):
    """Dropout on the residual branches only (--model.dropout_attention false) under TP 2 in one
    stage and one replica: both ranks seed alike and draw, for the replicated activations after
    each all-reduce, the masks one process draws. Dropout on the attention probabilities is refused before any group exists,
    naming that fix: a rank holds only its heads' probabilities."""
    drop = {"model.dropout": 0.1, "model.dropout_attention": "false"}
    Trainer(one_process_config(tmp_path / "one", corpus, **drop)).fit()
    pipe = [pipeline(["cpu-a"], [N_LAYER], tp=2)]
    plan = write_plan(tmp_path / "plan.json", one_group_cluster(2), pipe, dropout=0.1, dropout_attention=False)
    check_run(torchrun(2, ["--plan.file", plan] + run_args(tmp_path / "run", corpus), tmp_path),
              tmp_path / "run", tmp_path / "one")
    assert losses(tmp_path / "run")[STEPS] != pytest.approx(losses(reference)[STEPS], rel=1e-3)  # dropout ran
    both = write_plan(tmp_path / "both.json", one_group_cluster(2), pipe, dropout=0.1)
    done = torchrun(2, ["--plan.file", both] + run_args(tmp_path / "refused", corpus), tmp_path)
    assert done.returncode != 0 and "--model.dropout_attention false" in done.stdout + done.stderr
    assert not (tmp_path / "refused" / "checkpoints").exists()


def test_gradient_reduction_inside_the_backward_equals_it_after_to_the_bit(tmp_path, corpus, reference):
    """DP 2 x interleaved PP 2 (one block recomputed): each block's bucket is all-reduced as its last
    backward ends, and the run is the one that reduces after the backward, bit for bit. (CPU
    processes reduce after the backward unless told otherwise: run.cpu_overlap_grad_reduce.)"""
    pipe = pipeline(["cpu-a"], [3, 2], recompute=[1, 0], dp=2, n_microbatches=2, virtual_stages=2)
    runs = {}
    for overlap in (True, False):
        plan = write_plan(tmp_path / f"plan-{overlap}.json", one_group_cluster(4), [pipe],
                          options={"overlap_grad_reduce": overlap})
        run_dir = tmp_path / f"overlap-{overlap}"
        done = torchrun(4, ["--plan.file", plan] + run_args(run_dir, corpus, **{"run.cpu_overlap_grad_reduce": "true"}),
                        tmp_path)
        check_run(done, run_dir, reference)
        runs[overlap] = (run_dir, done.stdout)
    on, off = runs[True], runs[False]
    # Every chunk's units are buckets (blocks, the embedding, the head), all reduced inside the backward.
    found = re.search(r"(\d+) of (\d+) buckets all-reduced inside the backward", on[1])
    assert found and found.group(1) == found.group(2) and int(found.group(2)) >= 3
    assert "inside the backward" not in off[1]
    assert losses(on[0]) == losses(off[0])
    a, b = load_file(Path(on[0]) / "model.safetensors"), load_file(Path(off[0]) / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_zero1_shards_adamw_state_and_trains_the_same_model(tmp_path, corpus, reference):
    """TP 2 x DP 2 with ZeRO-1: each replica holds AdamW state for its share only, the run is the one
    without sharding (losses and weights, bit for bit), one process resumes its checkpoint, and it
    resumes one process's."""
    pipe = pipeline(["cpu-a"], [N_LAYER], tp=2, dp=2, n_microbatches=2)
    runs = {}
    for zero in (True, False):
        plan = write_plan(tmp_path / f"plan-{zero}.json", one_group_cluster(4), [pipe],
                          options={"distributed_optimizer": zero})
        run_dir = tmp_path / f"zero-{zero}"
        done = torchrun(4, ["--plan.file", plan] + run_args(run_dir, corpus), tmp_path)
        check_run(done, run_dir, reference)
        runs[zero] = run_dir
        found = re.search(r"sharded over 2 replicas \(ZeRO-1\): this rank updates ([\d,]+) of its ([\d,]+)", done.stdout)
        assert bool(found) == zero
        if zero:  # about half each
            mine, every = (int(g.replace(",", "")) for g in found.groups())
            assert 0.4 * every < mine < 0.6 * every
    assert losses(runs[True]) == losses(runs[False])
    a, b = load_file(Path(runs[True]) / "model.safetensors"), load_file(Path(runs[False]) / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    step5 = runs[True] / "checkpoints" / "step_00000005"
    Trainer(one_process_config(tmp_path / "one", corpus, **{"run.resume": step5})).fit()
    assert_same_losses(tmp_path / "one", reference, steps=range(6, STEPS + 1))
    assert_same_params(tmp_path / "one", reference)
    # ... and the sharded run resumes one process's checkpoint, each replica loading its share.
    plan = tmp_path / "plan-True.json"
    ref5 = reference / "checkpoints" / "step_00000005"
    done = torchrun(4, ["--plan.file", plan] + run_args(tmp_path / "resumed", corpus, **{"run.resume": ref5}), tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    assert_same_losses(tmp_path / "resumed", reference, steps=range(6, STEPS + 1))
    assert_same_params(tmp_path / "resumed", reference)


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_zero1_in_bf16_shards_the_fp32_masters_and_trains_the_same_model(tmp_path, corpus, layout):
    """bf16 with ZeRO-1 over 2 replicas, under TP 2 (DTensor masters) and PP 2 (the tied matrix on two
    stages; the reduction inside the backward): each replica keeps the fp32 masters of its share
    only and bf16 weights of the rest, broadcast in bf16 by their owners, and each gradient is
    reduced to its owner; the run is the bf16 run without sharding (all-reduced after the
    backward), bit for bit (every loss, every weight), and that run resumes the sharded run's
    checkpoint (written by the owners) as if it had not stopped."""
    if layout == "tp2":
        pipe = pipeline(["cpu-a"], [N_LAYER], tp=2, dp=2, n_microbatches=2)
    else:
        pipe = pipeline(["cpu-a"], [3, 2], recompute=[1, 0], dp=2, n_microbatches=2)
    bf16 = {"train.dtype": "bf16"}
    runs = {}
    for zero in (True, False):
        plan = write_plan(tmp_path / f"plan-{zero}.json", one_group_cluster(4), [pipe],
                          options={"distributed_optimizer": zero})
        run_dir = tmp_path / f"zero-{zero}"
        overlap = {"run.cpu_overlap_grad_reduce": "true"} if zero and layout == "pp2" else {}
        done = torchrun(4, ["--plan.file", plan] + run_args(run_dir, corpus, **bf16, **overlap), tmp_path)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
        found = re.search(r"this rank updates ([\d,]+) of its ([\d,]+) parameters; it keeps the fp32 masters of "
                          r"those only .* \(([\d,]+) bytes of fp32 weights freed\); gradients are reduced to the "
                          r"replica that updates them", done.stdout)
        assert bool(found) == zero
        inside = re.search(r"(\d+) of (\d+) buckets reduced to their owners inside the backward", done.stdout)
        assert bool(inside) == bool(overlap) and (not inside or inside.group(1) == inside.group(2))
        if zero:  # rank 0 freed the fp32 weights of what the other replica updates: about half of its own
            mine, every, freed = (int(g.replace(",", "")) for g in found.groups())
            local = every // 2 if layout == "tp2" else every  # TP 2 halves the matrices, not the norms
            assert 0.4 * local * 4 < freed < 0.6 * every * 4
        runs[zero] = run_dir
    assert losses(runs[True]) == losses(runs[False])
    a, b = load_file(runs[True] / "model.safetensors"), load_file(runs[False] / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    step5 = runs[True] / "checkpoints" / "step_00000005"
    done = torchrun(4, ["--plan.file", tmp_path / "plan-False.json"]
                    + run_args(tmp_path / "resumed", corpus, **bf16, **{"run.resume": step5}), tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    got, want = losses(tmp_path / "resumed"), losses(runs[False])
    assert [got[s] for s in range(6, STEPS + 1)] == [want[s] for s in range(6, STEPS + 1)]
    c = load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(c[k], b[k]) for k in b)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, corpus):
    """`hetrain plan --cluster local-cpu.toml --plan.pp 2 --plan.dp 2 ...`, then torchrun of its plan.json."""
    root = tmp_path_factory.mktemp("cli")
    code = main(["plan", "--cluster", str(LOCAL_CPU), "--model.preset", "tiny", "--model.n_layer", str(N_LAYER),
                 "--train.seq_len", str(SEQ_LEN), "--plan.pp", "2", "--plan.dp", "2", "--plan.global_batch", "8",
                 "--plan.micro_batch", "2", "--run.dir", str(root / "plan")])
    assert code == 0
    done = torchrun(4, ["--plan.file", str(root / "plan" / "plan.json")] + run_args(root / "run", corpus), root)
    return root, done


def test_planned_pp2_dp2_across_two_kinds_runs_like_one_process(cli_run, reference):
    root, done = cli_run
    check_run(done, root / "run", reference)
    out = done.stdout
    assert "cpu-a -> cpu-b, 2 stages, dp 2" in out and "host pipeline lane" in out
    assert re.search(r"predicted vs measured: step [\d.]+ ms vs [\d.]+ ms median", out)
    assert all(r["predicted_step_s"] > 0 for r in records(root / "run"))
    events = read_chrome_trace(root / "run" / "trace.json")
    links = {e.lane for e in events if e.cat == "comm"}
    assert links and all("(host)" in lane for lane in links)  # one lane per link, over host memory
    assert all(e.args["bytes"] == 2 * SEQ_LEN * 64 * 4 for e in events if e.cat == "comm")
    assert len({e.lane for e in events if e.cat == "fwd"}) == 4  # every rank traced its stage


@pytest.mark.parametrize("virtual_stages", [1, 2])
def test_a_pipeline_against_the_cluster_files_group_order_runs_like_one_process(tmp_path, corpus, reference,
                                                                               virtual_stages):
    """Stage 0 on cpu-b (ranks 2-3), stage 1 on cpu-a (ranks 0-1): the lane's process-group ranks
    run against the stage order, which torch's stage-to-rank map must be told (1F1B and
    interleaved)."""
    plan = write_plan(tmp_path / "ba.json", local_cpu(),
                      [pipeline(["cpu-b", "cpu-a"], [3, 2], dp=2, n_microbatches=2, stage_groups=["cpu-b", "cpu-a"],
                                virtual_stages=virtual_stages)])
    done = torchrun(4, ["--plan.file", plan] + run_args(tmp_path / "run", corpus), tmp_path)
    check_run(done, tmp_path / "run", reference)
    assert "cpu-b -> cpu-a, 2 stages" in done.stdout


def test_resume_under_another_layout_is_exact(tmp_path, cli_run, corpus, reference):
    """One process resumes the 4-process run's step 5; TP 2 x PP 2 across kinds resumes one process's."""
    root, _ = cli_run
    step5 = root / "run" / "checkpoints" / "step_00000005"
    Trainer(one_process_config(tmp_path / "one", corpus, **{"run.resume": step5})).fit()
    assert_same_losses(tmp_path / "one", reference, steps=range(6, STEPS + 1))
    assert_same_params(tmp_path / "one", reference)

    plan = write_plan(tmp_path / "tp2pp2.json", local_cpu(),
                      [pipeline(["cpu-a", "cpu-b"], [3, 2], tp=2, stage_groups=["cpu-a", "cpu-b"])])
    ref5 = reference / "checkpoints" / "step_00000005"
    done = torchrun(4, ["--plan.file", plan] + run_args(tmp_path / "tp", corpus, **{"run.resume": ref5}), tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "resumed from" in done.stdout and "tp 2" in done.stdout
    assert_same_losses(tmp_path / "tp", reference, steps=range(6, STEPS + 1))
    assert_same_params(tmp_path / "tp", reference)


def test_two_pipelines_of_two_kinds_share_the_batch_on_two_nodes(tmp_path, corpus, reference):
    """cpu-a: PP 2 on 6 sequences; cpu-b: TP 2 on 2; two torchrun 'nodes' meeting on 127.0.0.1."""
    plan = write_plan(tmp_path / "two.json", local_cpu(), [pipeline(["cpu-a"], [2, 3], n_microbatches=3),
                                                           pipeline(["cpu-b"], [N_LAYER], tp=2, n_microbatches=1)])
    args = ["--plan.file", str(plan)] + run_args(tmp_path / "run", corpus)
    port = 29400 + os.getpid() % 500
    nodes = [subprocess.Popen(torchrun_cmd(2, args, node=(i, 2, port)), cwd=tmp_path, env=env(), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in range(2)]
    outs = [node.communicate(timeout=240) for node in nodes]
    for node, (out, err) in zip(nodes, outs):
        assert node.returncode == 0, err[-4000:]
    assert "P0: cpu-a, 2 stages" in "".join(o for o, _ in outs) and "P1: cpu-b, 1 stages, dp 1, tp 2" in "".join(
        o for o, _ in outs)
    assert_same_losses(tmp_path / "run", reference)
    assert_same_params(tmp_path / "run", reference)


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGSTOP"])
def test_a_dead_or_hung_rank_ends_the_job_naming_it(tmp_path, corpus, sig):
    timeout_s = 6.0
    plan = write_plan(tmp_path / "pp2.json", one_group_cluster(2), [pipeline(["cpu-a"], [3, 2])])
    args = ["--plan.file", str(plan)] + run_args(tmp_path / "run", corpus, **{
        "train.steps": 100000, "train.eval_every": 0, "train.ckpt_every": 10, "run.dist_timeout_s": timeout_s})
    job = subprocess.Popen(torchrun_cmd(2, args), cwd=tmp_path, env=env(), text=True, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT)
    victim = None
    try:
        deadline = time.time() + 120
        while not (tmp_path / "run" / "checkpoints" / "step_00000010" / "meta.json").exists():
            assert time.time() < deadline and job.poll() is None
            time.sleep(0.2)
        workers = {}
        for pid in subprocess.run(["pgrep", "-P", str(job.pid)], capture_output=True, text=True).stdout.split():
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            workers[int(next(v for v in environ if v.startswith(b"RANK="))[5:])] = int(pid)
        victim, survivor = workers[1], workers[0]
        stopped_at = time.time()
        os.kill(victim, getattr(signal, sig))
        while _alive(survivor):  # the healthy rank gives up within the timeout
            assert time.time() - stopped_at < timeout_s + 10
            time.sleep(0.1)
        if sig == "SIGSTOP":  # torchrun waits 30 s for a stopped process to take SIGTERM: spare the test that
            os.kill(victim, signal.SIGKILL)
        out, _ = job.communicate(timeout=60)
    finally:
        if job.poll() is None:
            job.kill()
        if victim and _alive(victim):
            os.kill(victim, signal.SIGKILL)
    assert job.returncode != 0
    if sig == "SIGSTOP":  # our roll call names it
        assert re.search(r"hetrain: error: no answer from rank 1 \(cpu-a, stage 1\) within "
                         r"run.dist_timeout_s=6 s", out), out
    else:  # torchrun sees the process die and names it, or our roll call does
        assert re.search(r"rank\s*:\s*1 \(local_rank: 1\)\s*\n\s*exitcode\s*:\s*-9|no answer from rank 1", out), out
    assert (tmp_path / "run" / "checkpoints" / "step_00000010" / "meta.json").exists()  # still loadable
    shutil.rmtree(tmp_path / "run", ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().split()
    except FileNotFoundError:
        return False
    return stat[2] != "Z"
