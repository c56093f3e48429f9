"""Recomputation inside tensor-parallel all-reduces (COLLECTIVE regions) trains exactly the model without it.

One process (fast): a 3-block tiny GPT whose blocks are sharded by hetrain's Megatron-style
functions over a 1-rank gloo group (the all-reduces are real calls that sum one rank; the
emulated link prices them as a 2-rank ring so that they last), with norm1,qkv,attn and
norm2,up,act COLLECTIVE in every block: losses and every gradient bitwise those of the plain
model, with windows long, cut short, absent, and without tensor parallelism, with and without
residual dropout; the all-reduces are the plain model's four per block and micro-batch (no
recomputation reruns one).

Two processes under torchrun (slow): TP 2 on one stage, CPU fp32, no dropout, every block's
units COLLECTIVE, against the same layout without recomputation: losses and final parameters
bitwise equal, with the real all-reduces and with an emulated TP link slow enough that every
region of every block but the stage's last, and the last block's attention side, is recomputed
inside an all-reduce.
"""

import dataclasses
import re
import time

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from cluster_support import N_LAYER, one_group_cluster, pipeline, torchrun, write_plan
from hetrain.model.gpt import GPT
from hetrain.model.presets import get_preset
from hetrain.pipeline.tensor_parallel import InFlight, TPLink, shard_block
from hetrain.pipeline.unit_recompute import Recomputations, apply_unit_recompute
from hetrain.plan.cluster.recompute_plan import COLLECTIVE, DEMAND, BlockPolicy
from test_recompute_training import assert_bitwise

ATTN, MLP = ["norm1", "qkv", "attn"], ["norm2", "up", "act"]
POLICY = BlockPolicy.of(collective=ATTN + MLP)
MICRO_BATCHES, BLOCKS = 2, 3


@pytest.fixture(scope="module")
def one_rank():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def _model(dropout: float = 0.0) -> GPT:
    """With dropout, on the residual branches only (what tensor parallelism allows)."""
    torch.manual_seed(0)
    return GPT(dataclasses.replace(get_preset("tiny"), n_layer=BLOCKS, dropout=dropout, dropout_attention=False))


def _step(model: GPT, ledger: Recomputations | None):
    """Both micro-batches' forwards, then their backwards (as a pipeline stage holds them)."""
    torch.manual_seed(1)
    idx = torch.randint(0, 256, (MICRO_BATCHES, 2, 16), generator=torch.Generator().manual_seed(3))
    targets = torch.roll(idx, -1, dims=-1)
    losses = []
    for m in range(MICRO_BATCHES):
        with ledger.forward(0, m) if ledger else torch.enable_grad():
            losses.append(model(idx[m], targets[m]))
    for m in range(MICRO_BATCHES):
        with ledger.backward(0, m) if ledger else torch.enable_grad():
            losses[m].backward()
    grads = {n: (p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad).clone()
             for n, p in model.named_parameters()}
    return [v.detach() for v in losses], grads


def _one_region_then_none(ledger: Recomputations):
    """A window that recomputes one region in mlp.up's all-reduce and none in attn.qkv's."""
    calls = []

    def window(chunk: int, position: int, side: str, in_flight) -> int:
        calls.append(position)
        allowed = iter([True] if side == "mlp" else [])
        return ledger.collective(chunk, position, side, lambda: next(allowed, False))
    return window


# window -> (regions recomputed inside all-reduces, regions left to the backward), per step: blocks 0
# and 1 two regions each, and block 2 (the last, no next block) its attention side inside its own
# MLP all-reduce (its MLP side is on demand), for both micro-batches. "one region then none": block
# 2's own attention, then one of block 0's.
WINDOWS = {"emulated link": (10, 0), "one region then none": (4, 6), "never in flight": (0, 10),
           "no tensor parallelism": (0, 10)}


@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["no dropout", "residual dropout"])
@pytest.mark.parametrize("window", list(WINDOWS))
def test_collective_regions_match_the_plain_model_bitwise(one_rank, monkeypatch, window, dropout):
    """With residual dropout too: the regions ending at proj and down keep its masks outside, so
    none reruns a projection's all-reduce and the masks are those of the plain model."""
    want_losses, want_grads = _step(_model(dropout), None)
    model, ledger = _model(dropout), Recomputations()
    reduces = []
    real_all_reduce = dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: reduces.append(1) or real_all_reduce(*a, **k))
    if window != "no tensor parallelism":
        callback = {"emulated link": lambda chunk, position, side, in_flight: ledger.collective(
                        chunk, position, side, in_flight, in_flight.ended_s),
                    "one region then none": _one_region_then_none(ledger),
                    "never in flight": lambda chunk, position, side, in_flight: ledger.collective(
                        chunk, position, side, lambda: False)}[window]
        # 2 * (2 - 1) * (8 KiB / 2) * s_per_byte: 5 ms per all-reduce of a (2, 16, 64) fp32 tensor.
        link = TPLink(one_rank, 2, 5e-3 / 8192 if window == "emulated link" else 0.0, callback)
        mesh = DeviceMesh.from_group(one_rank, "cpu")
        for j, block in enumerate(model.blocks):
            shard_block(block, mesh, link, (0, j))
    apply_unit_recompute(list(model.blocks), [POLICY] * BLOCKS, ledger)
    places, seconds, ran = [], [], ledger._ran  # where each region's recomputation ran, how long
    ledger._ran = lambda s: (places.append(ledger._place), seconds.append(s), ran(s))
    got_losses, got_grads = _step(model, ledger)
    assert all(torch.equal(a, b) for a, b in zip(got_losses, want_losses))
    for name, g in want_grads.items():
        assert torch.equal(got_grads[name], g), name
    inside, left = WINDOWS[window]
    assert (ledger.regions_collective, ledger.collective_left) == (inside, left)
    # Each region recomputed once: inside an all-reduce, or by the backward (the backward reuses the former).
    assert (places.count(COLLECTIVE), places.count(DEMAND)) == (inside, 2 * BLOCKS * MICRO_BATCHES - inside)
    assert len(reduces) == (0 if window == "no tensor parallelism" else 4 * BLOCKS * MICRO_BATCHES)
    assert ledger.demand_s > 0  # the last block's MLP side (and the regions left) on demand
    # Every second recomputed inside an all-reduce counts once: before it ended (hidden) or after.
    inside_s = sum(s for p, s in zip(places, seconds) if p == COLLECTIVE)
    assert ledger.collective_hidden_s + ledger.collective_after_s == pytest.approx(inside_s)
    if window == "emulated link":
        assert ledger.collective_hidden_s > 0
    else:  # in flight at no region's end, and no end time given: nothing counts as hidden
        assert ledger.collective_hidden_s == 0



@pytest.mark.parametrize("dropout", [0.0, 0.2], ids=["no dropout", "residual dropout"])
@pytest.mark.parametrize("full_rerun", [False, True], ids=["early stop", "full rerun"])
def test_whole_blocks_on_demand_rerun_the_all_reduces_they_reach(one_rank, monkeypatch, full_rerun, dropout):
    """Whole blocks recomputed on demand under TP (torch's checkpoint of the block): early stop
    reruns proj's all-reduce only, and down's too with a residual dropout mask after it;
    run.recompute_full_rerun reruns both (the Megatron-LM baseline). Bitwise the plain model
    every way."""
    want_losses, want_grads = _step(_model(dropout), None)
    model, ledger = _model(dropout), Recomputations(full_rerun)
    reduces = []
    real_all_reduce = dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda *a, **k: reduces.append(1) or real_all_reduce(*a, **k))
    link = TPLink(one_rank, 2, 1e-3 / 8192, None)
    mesh = DeviceMesh.from_group(one_rank, "cpu")
    for j, block in enumerate(model.blocks):
        shard_block(block, mesh, link, (0, j))
    apply_unit_recompute(list(model.blocks), [BlockPolicy.whole(DEMAND)] * BLOCKS, ledger)
    got_losses, got_grads = _step(model, ledger)
    assert all(torch.equal(a, b) for a, b in zip(got_losses, want_losses))
    for name, g in want_grads.items():
        assert torch.equal(got_grads[name], g), name
    reruns = 2 if full_rerun or dropout else 1
    assert len(reduces) == (4 + reruns) * BLOCKS * MICRO_BATCHES

def test_an_all_reduce_in_flight_says_when_it_ended(one_rank):
    """InFlight: in flight until both the work and the emulated deadline are done; its end is
    never before the deadline nor after it was seen ended."""
    deadline = time.perf_counter() + 0.05
    flight = InFlight(dist.all_reduce(torch.ones(4), group=one_rank, async_op=True), deadline)
    assert flight() and flight.ended_s() is None
    while flight():
        time.sleep(0.005)
    seen = time.perf_counter()
    assert deadline <= flight.ended_s() <= seen


def test_an_all_reduce_past_its_deadline_ends_when_its_work_did(one_rank):
    """With the deadline long past, the end is the work future's stamp, not the deadline."""
    before = time.perf_counter()
    flight = InFlight(dist.all_reduce(torch.ones(4), group=one_rank, async_op=True), before - 1.0)
    while flight():
        time.sleep(0.001)
    seen = time.perf_counter()
    assert before <= flight.ended_s() <= seen


# --- two processes -------------------------------------------------------------------------------

STEPS = 4


def _args(run_dir, corpus, **extra) -> list[str]:
    values = {"run.dir": run_dir, "run.threads": 1, "data.source": "text", "data.path": corpus,
              "data.cache_dir": "", "train.steps": STEPS, "train.warmup_steps": 2, "train.eval_every": 0,
              "train.log_every": 1, "train.ckpt_every": 0, "log.progress": "false", "log.tensorboard": "false",
              "log.peak_flops": 1e11, "log.trace_steps": 1, **extra}
    return [a for k, v in values.items() for a in (f"--{k}", str(v))]


def _train(tmp_path, corpus, name: str, collective: bool, **extra):
    policies = [[{"first_block": 0, "n_blocks": N_LAYER, "window": [], "demand": [], "collective": ATTN + MLP}]]
    pipe = pipeline(["cpu-a"], [N_LAYER], tp=2, policies=policies if collective else None)
    plan = write_plan(tmp_path / f"{name}.json", one_group_cluster(2), [pipe])
    done = torchrun(2, ["--plan.file", str(plan)] + _args(tmp_path / name, corpus, **extra), tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return tmp_path / name, done.stdout


def _collective_figures(out: str) -> tuple[float, float, int, int]:
    """(ms inside all-reduces, of it before they ended, regions, left) of stage 0 (TP rank 0)."""
    found = re.search(r"P0 S0: .*?([\d.]+) ms inside all-reduces \(([\d.]+) ms before they ended\), .*; (\d+) "
                      r"regions inside all-reduces, (\d+) left to their backward", out)
    assert found, out[-3000:]
    return float(found.group(1)), float(found.group(2)), int(found.group(3)), int(found.group(4))


@pytest.mark.slow
def test_tp2_recomputes_inside_its_all_reduces_and_trains_bitwise_the_model_without(tmp_path, corpus):
    ref, _ = _train(tmp_path, corpus, "none", collective=False)
    # two regions of every block but the last, the last's attention side, 4 micro-batches a step
    every = (2 * (N_LAYER - 1) + 1) * 4 * STEPS

    run, out = _train(tmp_path, corpus, "real", collective=True)
    assert_bitwise(run, ref)
    _, _, inside, left = _collective_figures(out)
    assert inside + left == every

    # 2 * (2 - 1) * (16 KiB / 2) / 1.6 MB/s: 10 ms per all-reduce of a (2, 32, 64) fp32 tensor.
    slow, out = _train(tmp_path, corpus, "emulated", collective=True,
                       **{"run.emulate_tp_link_gbytes_per_s": 0.0016384})
    assert_bitwise(slow, ref)
    total_ms, before_ms, inside, left = _collective_figures(out)
    assert (inside, left) == (every, 0) and before_ms > 0 and total_ms >= before_ms
