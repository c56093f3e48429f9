"""Two gloo processes with sharded host optimizer state train the same model as one process.

Each rank takes one of the two micro-batches of every step of test_engine's reference run, so
the averaged gradient equals the reference's accumulated one. Losses (averaged over ranks),
parameters (to 1e-6 but the few elements tests_support.assert_params_match allows) and the AdamW
state gathered by state_dict must equal one process's.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from hetrain.model.gpt import GPT
from hetrain.offload import apply_plan
from hetrain.offload.sharded import DataParallel, ShardedHostLayer
from hetrain.plan.offload.plan import OffloadPlan
from test_engine import BATCHES, CFG, OPTIM, STEPS, lr_at, reference
from tests_support import assert_params_match

WORLD = 2


def mixed_plan() -> OffloadPlan:
    # embedding on the host optimizer (its flat straddles the chunk boundary), block 0 recomputed
    # and streamed with a host optimizer, block 1 streamed with a device optimizer, block 2
    # native, block 3 on the host optimizer, the head native.
    plan = OffloadPlan.resident(4)
    for name, act, weights, optim in (("embedding", "keep", "device", "host"), ("block.0", "recompute", "host", "host"),
                                      ("block.1", "keep", "host", "device"), ("block.3", "keep", "device", "host")):
        layer = next(l for l in plan.layers if l.name == name)
        layer.act, layer.weights, layer.optim = act, weights, optim
    return plan


def _rank_main(rank: int, store_dir: str, plan_path: str, clip: float, out: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_dir}/store", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = GPT(CFG)
        plan = OffloadPlan.load(plan_path)
        engine = apply_plan(model, plan, OPTIM, "cpu", data_parallel=DataParallel.create())
        assert any(isinstance(l.host, ShardedHostLayer) for l in engine.layers)
        losses = []
        for step in range(STEPS):
            stats = engine.train_step([BATCHES[step][rank]], lr_at(step), clip)
            loss = torch.tensor(stats.loss)
            dist.all_reduce(loss)
            losses.append(loss.item() / WORLD)
        state = engine.state_dict()
        engine.close()
        if rank == 0:
            torch.save({"losses": losses, "params": {k: v.clone() for k, v in model.state_dict().items()},
                        "state": state}, out)
        # Both ranks done with every group before either tears its groups down (a rank that
        # destroyed its gloo groups while the other still used them aborted, rarely, at exit).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_two_ranks(tmp_path, plan: OffloadPlan, clip: float) -> dict:
    out, plan_path = tmp_path / "rank0.pt", tmp_path / "plan.json"
    plan.save(plan_path)
    mp.spawn(_rank_main, args=(str(tmp_path), str(plan_path), clip, str(out)), nprocs=WORLD, join=True)
    return torch.load(out, weights_only=False)


def single_process_state(plan: OffloadPlan, clip: float) -> dict:
    torch.manual_seed(0)
    engine = apply_plan(GPT(CFG), plan, OPTIM, "cpu")
    for step in range(STEPS):
        engine.train_step(BATCHES[step], lr_at(step), clip)
    state = engine.state_dict()
    engine.close()
    return state


@pytest.mark.parametrize("clip", [1.0, 0.0])
def test_two_gloo_ranks_with_sharded_host_state_match_one_process(tmp_path, clip):
    plan = mixed_plan()
    got = run_two_ranks(tmp_path, plan, clip)
    ref_losses, ref_params = reference(CFG, clip)
    assert got["losses"] == pytest.approx(ref_losses, rel=1e-6)
    assert_params_match(got["params"], ref_params)
    one = single_process_state(plan, clip)
    for name, entries in one["optim"]["state"].items():
        for k, t in entries.items():
            scale = float(t.abs().max()) if t.numel() else 0.0  # near-zero moments: relative to the tensor
            torch.testing.assert_close(got["state"]["optim"]["state"][name][k], t, rtol=1e-5, atol=1e-6 * scale)


def test_sharded_host_bytes_shrink_with_ranks():
    from hetrain.predict.state_bytes import host_layer_bytes

    one = host_layer_bytes(10_000, 4, 2, False, world=1)
    four = host_layer_bytes(10_000, 4, 2, False, world=4)
    assert four < 0.45 * one  # 16 of the 20 bytes per element are split four ways


def test_data_parallel_needs_an_initialised_process_group():
    with pytest.raises(ValueError, match="torch.distributed initialised"):
        DataParallel.create()
