"""Where each rank of a cluster plan runs, the plan checks made before any process starts, the
interleaved split, and tensor parallelism's row order (all in one process, no torch.distributed)."""

import dataclasses

import pytest
import torch

from cluster_support import N_LAYER, local_cpu, model, one_group_cluster, pipeline, write_plan
from hetrain.cli import main
from hetrain.errors import ConfigError
from hetrain.model.gpt import ModelConfig
from hetrain.pipeline.placement import check_device, check_world, place_plan
from hetrain.pipeline.tensor_parallel import from_canonical, to_canonical
from hetrain.plan.cluster.plan import ClusterPlan


def plan_of(cluster, pipelines) -> ClusterPlan:
    return ClusterPlan(model=model(), cluster=cluster, global_batch=sum(p.samples_per_step for p in pipelines),
                       seq_len=32, options={}, pipelines=pipelines)


def test_ranks_follow_the_planners_placement():
    """Group devices in file order; inside a group local stage j, replica r, TP rank k on (j*dp + r)*tp + k."""
    cluster = one_group_cluster(8)
    layout = place_plan(plan_of(cluster, [pipeline(["cpu-a"], [3, 2], tp=2, dp=2)]))
    for place in layout.places:
        assert place.rank == (place.stage * 2 + place.replica) * 2 + place.tp_rank
    assert layout.pipeline_lane(layout.places[5]) == [1, 5]  # replica 0, TP rank 1, stages 0 and 1
    assert layout.dp_ranks(layout.places[0]) == [0, 2] and layout.tp_ranks(layout.places[6]) == [6, 7]
    assert [p.sample_start for p in layout.places[:4]] == [0, 0, 8, 8]  # replica 1 takes the second 8


def test_two_pipelines_take_consecutive_shares_of_the_batch():
    plan = plan_of(local_cpu(), [pipeline(["cpu-a"], [2, 3], n_microbatches=3),
                                 pipeline(["cpu-b"], [N_LAYER], tp=2, n_microbatches=1)])
    layout = place_plan(plan)
    assert layout.pipeline_samples == (6, 2) and layout.read_unit == 2 and layout.global_batch == 8
    assert [(p.pipeline, p.stage, p.tp_rank, p.kind, p.sample_start) for p in layout.places] == [
        (0, 0, 0, "cpu-a", 0), (0, 1, 0, "cpu-a", 0), (1, 0, 0, "cpu-b", 6), (1, 0, 1, "cpu-b", 6)]


@pytest.mark.parametrize("change, message", [
    (lambda p: p.pipelines[0].stages.__setitem__(1, dataclasses.replace(p.pipelines[0].stages[1], tp=1)),
     "mixes tensor-parallel degrees"),
    (lambda p: p.pipelines[0].stages.__setitem__(1, dataclasses.replace(p.pipelines[0].stages[1], first_block=4)),
     "cover the blocks in order"),
    (lambda p: setattr(p, "global_batch", 12), "global_batch is 12"),
    (lambda p: (setattr(p.pipelines[0], "dp", 2), setattr(p, "global_batch", 16)),
     "has 4 devices but the plan gives it 2 stages x dp 2 x tp 2"),
])
def test_a_plan_that_cannot_run_is_one_clear_error(change, message):
    plan = plan_of(one_group_cluster(4), [pipeline(["cpu-a"], [3, 2], tp=2)])
    change(plan)
    with pytest.raises(ConfigError, match=message):
        place_plan(plan)


def test_units_inside_tensor_parallel_all_reduces_need_tensor_parallelism():
    group = [{"first_block": 0, "n_blocks": 3, "window": [], "demand": [], "collective": ["norm2", "up", "act"]}]
    with pytest.raises(ConfigError, match=r"chunk 0 recomputes units inside tensor-parallel all-reduces "
                                          r"\('collective'\) but runs at tp 1.*place them 'window' or 'demand'"):
        place_plan(plan_of(one_group_cluster(2), [pipeline(["cpu-a"], [3, 2], policies=[group, []])]))
    layout = place_plan(plan_of(one_group_cluster(4), [pipeline(["cpu-a"], [3, 2], tp=2, policies=[group, []])]))
    assert layout.places[0].chunks[0].policies[0].units_at("collective") == ["norm2", "up", "act"]


def test_a_tensor_parallel_all_reduce_is_never_recomputed_ahead():
    """Each TP rank stops recomputing ahead when its own gradient arrives: a region that reruns
    proj's all-reduce there would leave the ranks' all-reduces paired wrongly."""
    whole = [{"first_block": 0, "n_blocks": 1, "window": ["attn", "proj", "norm2"], "demand": []}]
    with pytest.raises(ConfigError, match=r"recomputes proj ahead of a backward \('window'\) at tp 2"):
        place_plan(plan_of(one_group_cluster(4), [pipeline(["cpu-a"], [3, 2], tp=2, policies=[whole, []])]))
    place_plan(plan_of(one_group_cluster(2), [pipeline(["cpu-a"], [3, 2], policies=[whole, []])]))  # tp 1: fine


def test_world_size_and_device_kind_are_checked_before_any_work(tmp_path, capsys):
    layout = place_plan(plan_of(local_cpu(), [pipeline(["cpu-a", "cpu-b"], [3, 2], stage_groups=["cpu-a", "cpu-b"],
                                                       dp=2)]))
    with pytest.raises(ConfigError, match=r"runs on 4 processes \(cpu-a: 2, cpu-b: 2\) but torchrun launched 2; "
                                          r"start it with torchrun --nproc_per_node 4"):
        check_world(layout, 2, "plan.json")
    gpu = dataclasses.replace(layout.places[0], device_type="cuda", kind="A100-80GB")
    with pytest.raises(ConfigError, match="no CUDA device for local rank 0"):
        check_device(gpu, 0, 0)
    # Through the command line: one process for a 4-process plan is one line on stderr, exit 2.
    plan = write_plan(tmp_path / "plan.json", local_cpu(),
                      [pipeline(["cpu-a", "cpu-b"], [3, 2], stage_groups=["cpu-a", "cpu-b"], dp=2)])
    assert main(["train", "--plan.file", str(plan), "--run.dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "this is one process (no torchrun)" in err
    assert not (tmp_path / "run").exists()


def test_interleave_spreads_each_stages_blocks_over_its_chunks():
    pipe = pipeline(["cpu-a"], [3, 2], recompute=[2, 0], virtual_stages=2)
    assert [(s.first_block, s.n_blocks, s.n_recompute_blocks, s.embedding, s.head) for s in pipe.stages] == [
        (0, 2, 2, True, False), (2, 1, 0, False, False), (3, 1, 0, False, False), (4, 1, 0, False, True)]
    assert pipe.virtual_stages == 2 and pipe.devices == 2
    layout = place_plan(plan_of(one_group_cluster(2), [pipe]))
    assert [c.index for c in layout.places[0].chunks] == [0, 2] and [c.index for c in layout.places[1].chunks] == [1, 3]
    with pytest.raises(ValueError, match="fewer than 3 virtual stages"):
        pipeline(["cpu-a"], [3, 2], virtual_stages=3)


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_tensor_parallel_row_order_gives_each_rank_its_own_heads(mlp):
    cfg = ModelConfig(n_layer=1, n_head=4, n_kv_head=2, d_model=16, d_ff=8, mlp=mlp)
    rows = 16 + 2 * 8
    qkv = torch.arange(rows, dtype=torch.float32)[:, None].repeat(1, 3)
    ordered = from_canonical("blocks.0.attn.qkv.weight", qkv, cfg, 2)
    # Shard 0 (first half of the rows) holds heads 0-1 of q and kv head 0 of k and v.
    assert ordered[:16, 0].tolist() == [*range(0, 8), *range(16, 20), *range(24, 28)]
    assert torch.equal(to_canonical("blocks.0.attn.qkv.weight", ordered, cfg, 2), qkv)
    up = torch.arange(16 if mlp == "swiglu" else 8, dtype=torch.float32)
    expect = [0, 1, 2, 3, 8, 9, 10, 11] if mlp == "swiglu" else list(range(8))
    assert from_canonical("blocks.0.mlp.up.weight", up, cfg, 2)[:8].tolist() == expect


def test_a_cluster_file_that_differs_from_the_plans_is_refused(tmp_path):
    from cluster_support import LOCAL_CPU
    from hetrain.train.cluster_launch import check_cluster

    plan = plan_of(local_cpu(), [pipeline(["cpu-a", "cpu-b"], [3, 2], stage_groups=["cpu-a", "cpu-b"], dp=2)])
    check_cluster(plan, str(LOCAL_CPU))
    other = tmp_path / "other.toml"
    other.write_text(LOCAL_CPU.read_text().replace("devices_per_node = 2", "devices_per_node = 4"))
    with pytest.raises(ConfigError, match="the plan runs group 'cpu-a' as 2 x cpu-a but cluster file .* has 4 x cpu-a"):
        check_cluster(plan, str(other))

