import dataclasses
import math
import random
import textwrap

import pytest

from hetrain.config import load_config
from hetrain.hardware.cluster import parse_cluster
from hetrain.model.describe import describe_model
from hetrain.plan.cluster.planner import SearchOptions, plan_cluster
from hetrain.plan.cluster.cost import CostContext, Path, PredictorOptions, dp_path, ring_allreduce_s
from hetrain.plan.cluster.recompute_plan import DEMAND, BlockPolicy
from hetrain.plan.cluster.recompute_units import policy_cost, stage_steps
from hetrain.predict.cost import RooflineCost
from hetrain.predict.roofline import Efficiency, layer_seconds
from hetrain.train.job import describe, predict_job
from hetrain.plan.cluster.one_f_one_b import one_f_one_b_end_s, one_f_one_b_orders
from hetrain.plan.cluster.plan_prediction import TIME_USES, predict_plan
from hetrain.plan.cluster.predict import (PipelineShape, build_stages, context_for, pipeline_step_s, plan_stages,
                                           shape_of)

from .test_search import CASES, model, two_kinds


def test_uniform_1f1b_is_m_plus_s_minus_1_slots():
    for n_stages in (1, 2, 4, 7):
        for m in (1, 3, 8, 20):
            ends = one_f_one_b_end_s([1.0] * n_stages, [2.0] * n_stages, m)
            assert max(ends) == pytest.approx((m + n_stages - 1) * 3.0)
            assert ends[0] == max(ends)  # the first stage runs the last backward


def test_1f1b_bottleneck_sets_the_steady_state():
    # Last stage twice as slow: warm-up fills it, then it sets the pace.
    ends = one_f_one_b_end_s([1.0, 1.0, 2.0], [2.0, 2.0, 4.0], 10)
    assert max(ends) == pytest.approx(3 + 3 + 10 * 6)  # its first input after 2 forwards; back through 2 backwards


def _plan(name, recompute="whole"):
    """The search's plan; with recompute='whole' as the search prices it (what the recurrence models)."""
    cfg, cluster, global_batch, seq_len = CASES[name]
    return plan_cluster(cfg, cluster, global_batch, seq_len, PredictorOptions(max_micro_batch=4),
                        SearchOptions(upper_bound=False, recompute=recompute))


@pytest.mark.parametrize("name", ["separate-pipelines", "16-devices"])
def test_device_time_adds_up_to_the_step_on_every_device(name):
    """device_s splits step_s x devices: each stage's busy seconds by category, weighted by its
    devices (dp x tp), and the rest idle; in a 1F1B pipeline each stage idles at least its
    (S - 1) fill-and-drain slots' worth of the other stages' work."""
    plan = _plan(name)
    ctx = context_for(plan)
    pred, events = predict_plan(plan, ctx)
    n_devices = sum(g.devices for g in ctx.cluster.groups)
    assert sum(pred.device_s.values()) == pytest.approx(pred.step_s * n_devices, rel=1e-9)
    devices_of = {f"P{p} S{s} {st.group} tp{st.tp}": pipe.dp * st.tp
                  for p, pipe in enumerate(plan.pipelines) for s, st in enumerate(pipe.stages)}
    busy = sum(e.dur_s * devices_of[e.lane] for e in events)
    assert pred.device_s["idle"] == pytest.approx(pred.step_s * n_devices - busy, rel=1e-9)
    for pipe, step in zip(plan.pipelines, pred.pipeline_step_s):
        stages = [sp for sp in pred.stages if sp.group in pipe.groups]
        slots = min(sp.fwd_s + sp.bwd_s for sp in stages) * (len(stages) - 1)
        lanes = {sp.stage: sum(e.dur_s for e in events if e.lane.startswith(f"P{sp.pipeline} S{sp.stage} "))
                 for sp in stages}
        assert all(pred.step_s - b >= slots - 1e-12 for b in lanes.values())
    assert set(pred.device_s) <= set(TIME_USES) and pred.device_s["idle"] > 0


def test_the_report_explains_fill_and_drain_with_the_textbook_share():
    """Each pipeline whose 1F1B fill and drain is 5% of the step or more gets a line with
    (S - 1) / (m + S - 1); interleaving V chunks divides S - 1 by V."""
    from hetrain.plan.cluster.plan import interleave
    from hetrain.plan.cluster.report import FILL_AND_DRAIN_NOTE, fill_and_drain, format_report

    plan = _plan("per-group-micro-batch")  # one pipeline of one stage (no fill), one of 2 stages
    for want in (1, 2):
        chunks = [want if min(st.n_blocks for st in p.stages) >= want else 1 for p in plan.pipelines]
        trial = dataclasses.replace(plan, pipelines=[interleave(p, v) for p, v in zip(plan.pipelines, chunks)])
        lines = fill_and_drain(trial)
        expected = []
        for p, (pipe, v) in enumerate(zip(plan.pipelines, chunks)):
            S, m = len(pipe.stages), pipe.n_microbatches
            share = (S - 1) / v / (m + (S - 1) / v)
            if share >= FILL_AND_DRAIN_NOTE:
                expected.append(f"P{p}: {'interleaved 1F1B' if v > 1 else '1F1B'} over {S} stages and {m} "
                                f"micro-batches idles about {100 * share:.0f}%")
        assert len(lines) == len(expected) and all(line.startswith(e) for line, e in zip(lines, expected))
        assert want == 1 or any("interleaved 1F1B" in line for line in lines)
    assert fill_and_drain(plan), "the case must have a pipeline that fills and drains"
    assert fill_and_drain(plan)[0] in format_report(plan)


@pytest.mark.parametrize("name", ["separate-pipelines", "recompute", "16-devices"])
def test_recurrence_equals_event_simulation(name):
    plan = _plan(name)
    ctx = context_for(plan)
    pred, events = predict_plan(plan, ctx)
    for p, pipe in enumerate(plan.pipelines):
        stages = plan_stages(ctx, plan, pipe)
        n = [s.n_blocks for s in pipe.stages]
        r = [s.n_recompute_blocks for s in pipe.stages]
        assert pipeline_step_s(stages, n, r, pipe.n_microbatches) == pytest.approx(pred.pipeline_step_s[p], rel=1e-12)
        # Peak memory: the simulator's allocations against the 1F1B in-flight formula.
        for s, (st, k, rk) in enumerate(zip(stages, n, r)):
            sp = next(x for x in pred.stages if x.pipeline == p and x.stage == s)
            assert sp.peak_bytes == st.peak_bytes(k, rk)
            assert sp.peak_bytes <= sp.capacity_bytes
            assert st.inflight == min(pipe.n_microbatches, len(stages) - s)
    assert pred.step_s == max(pred.pipeline_step_s)
    assert max(e.end_s for e in events) == pytest.approx(pred.step_s, rel=1e-12)
    cats = {e.cat for e in events}
    assert {"fwd", "bwd", "optim"} <= cats
    if name == "recompute":
        assert "recompute" in cats


def test_single_device_step_is_work_plus_optimizer():
    cluster = parse_cluster(textwrap.dedent("""\
        [[group]]
        name = "g"
        kind = "H100-SXM"
        nodes = 1
        devices_per_node = 1
        intra_node_gbytes_per_s = 450
        inter_node_gbytes_per_s = 50
        """))
    ctx = CostContext(describe_model(model(1024, 4), 1, 1024), cluster, PredictorOptions())
    (st,) = build_stages(ctx, PipelineShape(("g",), (1,), 1, 2), 5)
    assert st.embedding and st.head and st.send_fwd_s == st.send_bwd_s == 0.0 and st.sync_s(4) == 0.0
    expected = 5 * (st.fwd_s(4) + st.bwd_s(4, 0)) + st.optim_s(4)
    assert pipeline_step_s([st], [4], [0], 5) == pytest.approx(expected)
    # One roofline for every planner: the cluster planner prices a layer on one device exactly
    # as the single-device cost model does, and the whole step within the few terms only the
    # single-device step graph has (gradient clipping, per-call overheads).
    kit = ctx.kit(cluster.groups[0], 1, 2)
    desc = describe_model(model(1024, 4), 2, 1024)
    single = RooflineCost(desc, cluster.groups[0].kind, "bf16")
    for layer, costs in ((desc.blocks[0], kit.block), (desc.embedding, kit.embedding), (desc.head, kit.head)):
        assert costs.fwd_s == pytest.approx(single.fwd_s(layer)) and costs.bwd_s == pytest.approx(single.bwd_s(layer))
    assert kit.block.recompute_s == pytest.approx(single.recompute_s(desc.blocks[0]))
    shape = {f"model.{k}": str(v) for k, v in dataclasses.asdict(model(1024, 4)).items() if k != "preset"}
    cfg = load_config(None, {**shape, "train.micro_batch": "2", "train.seq_len": "1024", "train.grad_accum": "5",
                             "train.dtype": "bf16", "hardware.device_kind": "H100-SXM"})
    assert describe(cfg).total_params == desc.total_params
    assert pipeline_step_s([st], [4], [0], 5) == pytest.approx(predict_job(cfg).step_s, rel=0.02)  # 1.3% on 2026-12-06


def test_tensor_parallel_divides_compute_and_adds_allreduces():
    cluster = two_kinds(1, 4, 1, 4)
    ctx = CostContext(describe_model(model(4096, 4), 1, 2048), cluster, PredictorOptions())
    a = cluster.group("a")
    one, four = ctx.kit(a, 1, 1), ctx.kit(a, 4, 1)
    allreduce = ring_allreduce_s(ctx.desc.blocks[0].boundary_bytes, 4, ctx.intra_path(a))
    compute = layer_seconds(ctx.desc, ctx.desc.blocks[0], a.kind, "bf16", Efficiency(), tp=4)
    assert four.block.fwd_s == pytest.approx(compute.fwd_s + 2 * allreduce)
    # Each device runs a quarter of every matmul: a quarter of the time, but the fixed costs stay.
    assert one.block.fwd_s / 4 < compute.fwd_s < one.block.fwd_s / 2
    assert four.block.params == -(-one.block.params // 4)
    assert four.block.act_bytes == one.block.act_bytes // 4
    # Recomputed whole, a block stops before its down projection (torch's early stop), so it
    # reruns proj's all-reduce and not down's; with dropout both, and the whole forward.
    assert four.block.recompute_s == pytest.approx(compute.recompute_s + allreduce)
    assert compute.fwd_s - compute.recompute_s > 0.1 * compute.fwd_s  # down: a quarter of the matmuls
    dropped = CostContext(describe_model(dataclasses.replace(model(4096, 4), dropout=0.1), 1, 2048), cluster,
                          PredictorOptions())
    assert dropped.kit(a, 4, 1).block.recompute_s == pytest.approx(dropped.kit(a, 4, 1).block.fwd_s)
    # The unit model splits the same forward over a block's steps, so a whole block on demand is
    # priced alike by `--plan.recompute whole` and by a unit policy.
    for c in (ctx, dropped):
        for tp in (1, 4):
            units, times, _ = stage_steps(c, a, tp, 1)
            assert sum(times) == pytest.approx(c.kit(a, tp, 1).block.fwd_s)
            whole = policy_cost(BlockPolicy.whole(DEMAND), units, times).demand_s
            assert whole == pytest.approx(c.kit(a, tp, 1).block.recompute_s)


def test_links_direct_beats_host_staged_and_rings_leave_the_node():
    staged = CostContext(None, two_kinds(1, 4, 1, 4), PredictorOptions())
    linked = CostContext(None, two_kinds(1, 4, 1, 4, link=True), PredictorOptions())
    a, b = staged.cluster.group("a"), staged.cluster.group("b")
    assert staged.cross_path(a, b).time_s(1e8) > linked.cross_path(a, b).time_s(1e8)
    # Host-staged: device->host, network, host->device one after the other.
    expected = (1 / a.kind.host_link_bytes_per_s + 1 / (12.5e9 / 4) + 1 / b.kind.host_link_bytes_per_s) / 0.7
    assert staged.cross_path(a, b).s_per_byte == pytest.approx(expected)
    # Two groups of one kind talk over the network directly (their own collective library).
    same = CostContext(None, parse_cluster(textwrap.dedent("""\
        [[group]]
        name = "x"
        kind = "H100-SXM"
        nodes = 1
        devices_per_node = 8
        intra_node_gbytes_per_s = 450
        inter_node_gbytes_per_s = 400
        [[group]]
        name = "y"
        kind = "H100-SXM"
        nodes = 1
        devices_per_node = 8
        intra_node_gbytes_per_s = 450
        inter_node_gbytes_per_s = 400
        """)), PredictorOptions())
    x, y = same.cluster.groups
    assert same.cross_path(x, y).s_per_byte == pytest.approx(1 / (400e9 / 8 * 0.7))
    # Gradient ring: inside one node while the replicas fit it, over the network beyond.
    group = two_kinds(4, 4, 1, 4).group("a")
    ctx = CostContext(None, two_kinds(4, 4, 1, 4), PredictorOptions())
    assert dp_path(ctx, group, 4, 1, 0) == ctx.intra_path(group)
    assert dp_path(ctx, group, 8, 1, 0).s_per_byte > ctx.intra_path(group).s_per_byte


def test_ring_allreduce_formula():
    path = Path(s_per_byte=1e-9, latency_s=1e-6)
    assert ring_allreduce_s(1e9, 1, path) == 0.0
    assert ring_allreduce_s(1e9, 4, path) == pytest.approx(2 * 3 * (1e-6 + 0.25))
    assert math.isclose(ring_allreduce_s(0, 8, path), 0.0)


def _reference_1f1b(fwd, bwd, m):
    """Walk each stage's 1F1B operation list, starting an operation once its input exists."""
    n_stages = len(fwd)
    orders = one_f_one_b_orders(n_stages, m)
    end = {}
    clock, pos = [0.0] * n_stages, [0] * n_stages
    while any(p < len(o) for p, o in zip(pos, orders)):
        for s in range(n_stages):
            while pos[s] < len(orders[s]):
                is_fwd, i = orders[s][pos[s]]
                dep = (("F", s - 1, i) if s > 0 else None) if is_fwd else (("B", s + 1, i) if s < n_stages - 1 else None)
                if dep is not None and dep not in end:
                    break
                start = max(clock[s], end.get(dep, 0.0))
                clock[s] = end[("F" if is_fwd else "B", s, i)] = start + (fwd[s] if is_fwd else bwd[s])
                pos[s] += 1
    return clock


def test_1f1b_recurrence_matches_a_plain_walk_of_the_schedule():
    rng = random.Random(0)
    for _ in range(300):
        n_stages, m = rng.randint(1, 8), rng.choice([rng.randint(1, 10), rng.randint(10, 200)])
        fwd = [rng.uniform(0.1, 2.0) for _ in range(n_stages)]
        bwd = [rng.uniform(0.1, 4.0) for _ in range(n_stages)]
        if rng.random() < 0.3:  # equal stages reach a periodic regime that the recurrence skips
            fwd, bwd = [1.0] * n_stages, [2.0] * n_stages
        expected = _reference_1f1b(fwd, bwd, m)
        assert one_f_one_b_end_s(fwd, bwd, m) == pytest.approx(expected, rel=1e-12)


def test_lower_bound_behind_the_pruning_holds():
    # Stage s cannot finish before the earlier stages' work plus m times its own; the
    # search's lower bound is built on this.
    rng = random.Random(1)
    for _ in range(500):
        n_stages, m = rng.randint(1, 8), rng.randint(1, 40)
        fwd = [rng.uniform(0.1, 2.0) for _ in range(n_stages)]
        bwd = [rng.uniform(0.1, 4.0) for _ in range(n_stages)]
        work = [f + b for f, b in zip(fwd, bwd)]
        bound = max(sum(work[:s]) + m * work[s] for s in range(n_stages))
        assert max(one_f_one_b_end_s(fwd, bwd, m)) >= bound * (1 - 1e-12)


def test_distributed_optimizer_and_overlapped_reduction_are_priced():
    """ZeRO-1 in bf16 (as the runtime runs it) shards the fp32 masters and AdamW moments over the
    replicas, reduces each gradient to its owner instead of all-reducing it, shares AdamW's work
    and the weight copy, and adds the owners' broadcasts of the updated bf16 weights, one after
    another; overlapping leaves exposed only what the backward of the blocks before a bucket cannot
    hide, with either reduction. Every collective pays the ring's latency: inside the backward one
    per gradient tensor, after it one per 25 MB bucket (under ZeRO-1 per owner)."""
    from hetrain.predict.state_bytes import GRADIENT_BUCKET_BYTES as BUCKET

    cluster = two_kinds(2, 4, 1, 4)
    desc = describe_model(model(2048, 8), 1, 2048)
    shape = PipelineShape(("a",), (1,), 8, 1)
    plain_ctx = CostContext(desc, cluster, PredictorOptions(overlap_grad_reduce=False))
    (plain,) = build_stages(plain_ctx, shape, 4)
    zero_ctx = CostContext(desc, cluster, PredictorOptions(distributed_optimizer=True, overlap_grad_reduce=False))
    (zero,) = build_stages(zero_ctx, shape, 4)
    over_ctx = CostContext(desc, cluster, PredictorOptions(overlap_grad_reduce=True))
    (over,) = build_stages(over_ctx, shape, 4)
    n = 8
    params = plain.params(n)
    # Memory: 18 bytes per parameter, against bf16 weights 2 + fp32 gradient 4 + (master 4 + moments 8) / 8
    # (and nothing else changes).
    assert plain.block_state_bytes == 18 * plain.block_params
    assert zero.block_state_bytes == math.ceil(plain.block_params * (6 + 12 / 8))
    assert plain.peak_bytes(n, 0) - zero.peak_bytes(n, 0) == pytest.approx(params * 12 * 7 / 8, rel=1e-6)
    # Communication after the backward, 8 replicas on one ring (latency lat, s seconds a byte):
    # all-reduced, 2 x 7 hops of an eighth per 25 MB bucket; reduced to the owners, each rank sends
    # every byte once and each owner's buckets pay the ring's 7 hops: about half.
    path = plain.dp_path
    lat, sec = path.latency_s, path.s_per_byte
    grad_bytes = params * 4
    assert plain.sync_s(n) == pytest.approx(2 * 7 * (math.ceil(grad_bytes / BUCKET) * lat + grad_bytes / 8 * sec))
    tensors = zero.fixed_tensors + n * zero.block_tensors
    assert tensors >= 8 and zero.tied_params == 0  # every replica owns something; model() is untied
    owner_reduces = 8 + grad_bytes // BUCKET
    assert zero.sync_s(n) == pytest.approx(owner_reduces * 7 * lat + grad_bytes * sec, rel=1e-12)
    assert 0.45 < zero.sync_s(n) / plain.sync_s(n) < 0.65
    # With tied embeddings the tied matrix is all-reduced (its tie sum needs it whole), the rest reduced.
    tied_desc = describe_model(dataclasses.replace(model(2048, 8), tie_embeddings=True), 1, 2048)
    (tied,) = build_stages(CostContext(tied_desc, cluster, zero_ctx.options), shape, 4)
    whole = tied.tied_params * 4
    assert whole == tied_desc.vocab_size * 2048 * 4
    rest = tied.params(n) * 4 - whole
    assert tied.sync_s(n) == pytest.approx(2 * 7 * (math.ceil(whole / BUCKET) * lat + whole / 8 * sec)
                                           + (8 + rest // BUCKET) * 7 * lat + rest * sec, rel=1e-12)
    # The optimizer: each replica's share of AdamW and of the cast, then 8 broadcasts of a share of
    # the bf16 weights, one after another.
    own = plain.adam_s_per_param + plain.weight_copy_s_per_param  # what each replica does for its share
    assert plain.weight_copy_s_per_param > 0
    broadcasts = 8 * 7 * lat + params * 2 * sec
    assert zero.optim_s(n) == pytest.approx(params * (own / 8 + plain.grad_pass_s_per_param) + broadcasts)
    assert plain.optim_s(n) == pytest.approx(params * (own + plain.grad_pass_s_per_param))
    # In fp32 the forward reads the masters: they stay whole, the moments are sharded, the fp32
    # weights are broadcast and there is no copy.
    fp32_ctx = CostContext(desc, cluster, PredictorOptions(distributed_optimizer=True, overlap_grad_reduce=False,
                                                           compute_dtype="fp32"))
    (fp32,) = build_stages(fp32_ctx, shape, 4)
    assert fp32.block_state_bytes == math.ceil(fp32.block_params * (8 + 8 / 8))
    assert fp32.weight_copy_s_per_param == 0
    assert fp32.optim_s(n) == pytest.approx(params * (fp32.adam_s_per_param / 8 + fp32.grad_pass_s_per_param)
                                            + 8 * 7 * lat + params * 4 * sec)
    # Overlap: a walk of the backward, bucket by bucket on one link (the head's first, then each
    # block's, one collective per gradient tensor; the embedding's after the backward), against the
    # closed form; all-reduced, and under ZeRO-1 reduced to the owners.
    zero_over_ctx = CostContext(desc, cluster, PredictorOptions(distributed_optimizer=True))
    (zero_over,) = build_stages(zero_over_ctx, shape, 4)
    for st, to_owners in ((over, False), (zero_over, True)):
        def inside_s(params, tensors):
            if not params:
                return 0.0
            if to_owners:
                return tensors * 7 * lat + params * 4 * sec
            return 2 * 7 * (tensors * lat + params * 4 / 8 * sec)

        def after_s(params, tensors):
            b = params * 4
            if to_owners:
                return (min(8, tensors) + b // BUCKET) * 7 * lat + b * sec if b else 0.0
            return 2 * 7 * (math.ceil(b / BUCKET) * lat + b / 8 * sec) if b else 0.0

        for blocks in (1, 2, n):
            link_free, clock = 0.0, 0.0
            layers = ([(st.lead_bwd_s, st.lead_params, st.lead_tensors)]
                      + [(st.block_bwd_s, st.block_params, st.block_tensors)] * blocks)
            for bwd_s, params, tensors in layers:
                clock += bwd_s
                link_free = max(link_free, clock) + inside_s(params, tensors)
            end = st.fixed_bwd_s + blocks * st.block_bwd_s
            rest = after_s(st.fixed_params - st.lead_params, st.fixed_tensors - st.lead_tensors)
            walked = max(link_free, end) + rest - end
            assert st.sync_s(blocks) == pytest.approx(walked, rel=1e-12)
            assert st.sync_s(blocks) >= rest
    # This link is slow next to a block's backward: a part is hidden (the head's bucket, some blocks').
    assert over.lead_params > 0 and over.sync_s(n) < plain.sync_s(n)
    assert zero_over.sync_s(n) < over.sync_s(n)


def test_gradient_accumulation_is_priced_inside_each_backward():
    """AccumulateGrad runs inside every backward after a step's first, as in the runtime and the
    single-device step graph: each backward carries (m - 1) / m of one accumulation of its
    stage's parameters (12 bytes each at the memory bandwidth), and the step's tail none of it."""
    from hetrain.predict.state_bytes import ACCUMULATE_TRAFFIC_BYTES_PER_PARAM

    cluster = two_kinds(2, 4, 1, 4)
    desc = describe_model(model(2048, 8), 1, 2048)
    ctx = CostContext(desc, cluster, PredictorOptions())
    shape = PipelineShape(("a", "b"), (1, 1), 2, 1)
    for m in (2, 8):
        one, many = build_stages(ctx, shape, 1), build_stages(ctx, shape, m)
        assert {st.group for st in many} == {"a", "b"}
        for st1, stm in zip(one, many):
            kind = cluster.group(stm.group).kind
            per_param = ACCUMULATE_TRAFFIC_BYTES_PER_PARAM / (kind.mem_bw_bytes_per_s * ctx.options.memory_bw_efficiency)
            assert stm.block_bwd_s - st1.block_bwd_s == pytest.approx((m - 1) / m * stm.block_params * per_param)
            assert stm.bwd_s(3, 1) - st1.bwd_s(3, 1) == pytest.approx((m - 1) / m * stm.params(3) * per_param)
            assert stm.optim_s(3) == pytest.approx(st1.optim_s(3)) and stm.fwd_s(3) == st1.fwd_s(3)


@pytest.mark.parametrize("options", [dict(distributed_optimizer=True), dict(overlap_grad_reduce=False),
                                     dict(distributed_optimizer=True, overlap_grad_reduce=False)])
def test_priced_options_predict_alike_in_recurrence_and_simulation(options):
    cfg, cluster, global_batch, seq_len = CASES["16-devices"]
    plan = plan_cluster(cfg, cluster, global_batch, seq_len, PredictorOptions(max_micro_batch=4, **options),
                        SearchOptions(upper_bound=False, recompute="whole"))
    assert all(plan.options[k] == v for k, v in options.items())
    ctx = context_for(plan)
    pred, events = predict_plan(plan, ctx)
    for p, pipe in enumerate(plan.pipelines):
        stages = build_stages(ctx, shape_of(pipe), pipe.n_microbatches, (), len(plan.pipelines))
        if len(plan.pipelines) > 1:
            continue  # the exchange between pipelines is checked by test_recurrence_equals_event_simulation
        n = [s.n_blocks for s in pipe.stages]
        r = [s.n_recompute_blocks for s in pipe.stages]
        assert pipeline_step_s(stages, n, r, pipe.n_microbatches) == pytest.approx(pred.pipeline_step_s[p], rel=1e-12)
    assert max(e.end_s for e in events) == pytest.approx(pred.step_s, rel=1e-12)


def test_the_report_says_where_gradients_are_reduced():
    import pathlib

    from hetrain.hardware.cluster import load_cluster
    from hetrain.plan.cluster.report import format_report

    accelerators = _plan("16-devices")
    assert "block by block inside the backward" in format_report(accelerators)
    cpus = plan_cluster(model(512, 4), load_cluster(pathlib.Path(__file__).parents[3] / "configs/clusters/local-cpu.toml"),
                        8, 256, PredictorOptions(max_micro_batch=4), SearchOptions(upper_bound=False))
    report = format_report(cpus)
    assert "after the backward on CPU processes" in report and "inside the backward" not in report
    assert "after the backward" in format_report(
        plan_cluster(*CASES["recompute"], PredictorOptions(overlap_grad_reduce=False),
                     SearchOptions(upper_bound=False, recompute="whole")))


def test_auto_keeps_the_faster_of_with_and_without_zero1():
    cfg, cluster, global_batch, seq_len = CASES["16-devices"]
    steps, bounds = {}, {}
    for zero in (False, True):
        p = plan_cluster(cfg, cluster, global_batch, seq_len, PredictorOptions(max_micro_batch=4, distributed_optimizer=zero),
                         SearchOptions(recompute="whole"))
        steps[zero], bounds[zero] = p.prediction["step_s"], p.upper_bound["tokens_per_s"]
    auto = plan_cluster(cfg, cluster, global_batch, seq_len, PredictorOptions(max_micro_batch=4),
                        SearchOptions(recompute="whole", try_distributed_optimizer=True))
    assert auto.prediction["step_s"] == min(steps.values())
    assert auto.options["distributed_optimizer"] == (steps[True] < steps[False])
    assert auto.upper_bound["tokens_per_s"] == max(bounds.values())
    assert any("planned with and without ZeRO-1" in n for n in auto.search["notes"])
