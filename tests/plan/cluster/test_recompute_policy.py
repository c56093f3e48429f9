"""Recompute units, the schedule with recomputation ahead of backwards, HEU against OPT, and plans.

The unit model's bytes are checked against what a block really keeps under every unit set (torch's
checkpoint, saved-tensor hooks); the schedule recurrence against the discrete-event simulator the
predictor uses (step and peak memory per stage); HEU against the exact MILP on small cases; and the
plan's policies through plan.json and placement.
"""

import dataclasses
import itertools
import math
import random
import time

import pytest
import torch

from hetrain.errors import ConfigError
from hetrain.hardware.cluster import cluster_to_dict, parse_cluster
from hetrain.memory import MemoryAccountant
from hetrain.model.gpt import GPT
from hetrain.model.presets import get_preset
from hetrain.pipeline.placement import place_plan
from hetrain.pipeline.unit_recompute import Recomputations, apply_unit_recompute
from hetrain.plan.cluster.planner import plan_cluster
from hetrain.plan.cluster.cost import PredictorOptions
from hetrain.plan.cluster.plan import ClusterPlan, PipelinePlan, StagePlan
from hetrain.plan.cluster.plan_prediction import predict_plan
from hetrain.plan.cluster.predict import build_stages, context_for, plan_stages, shape_of
from hetrain.plan.cluster.search import Pins, SearchOptions
from hetrain.plan.cluster.recompute_plan import (COLLECTIVE, DEMAND, STEPS, UNITS, WINDOW, BlockPolicy, block_policies,
                                               policy_groups)
from hetrain.plan.cluster.recompute_policy import StageProblem, choice_of, heuristic, optimal
from hetrain.plan.cluster.one_f_one_b import StageTimes, simulate
from hetrain.plan.cluster.recompute_split import Pricer, stage_recompute
from hetrain.plan.cluster.recompute_units import block_units, policy_cost, reruns_row_parallel

from .test_search import CASES, OPTIONS


@pytest.mark.parametrize("variant", [{}, {"pos": "rope", "norm": "rmsnorm", "mlp": "swiglu", "n_kv_head": 2},
                                     {"dropout": 0.1}, {"pos": "rope", "dropout": 0.1, "mlp": "swiglu"},
                                     {"dropout": 0.1, "dropout_attention": False},
                                     {"pos": "rope", "dropout": 0.1, "dropout_attention": False}],
                         ids=["gpt", "llama", "gpt-dropout", "rope-swiglu-dropout", "gpt-residual-dropout",
                              "rope-residual-dropout"])
def test_unit_bytes_are_what_the_block_keeps_under_every_unit_set(variant):
    cfg = dataclasses.replace(get_preset("tiny"), n_layer=1, **variant)
    torch.manual_seed(0)
    model = GPT(cfg)
    h = torch.randn(2, 16, cfg.d_model, requires_grad=True)
    units = block_units(cfg, 2, 16, 4)
    policies = []
    for mask in range(2 ** len(UNITS)):
        place = WINDOW if mask % 2 else DEMAND
        policies.append(BlockPolicy(tuple(place if mask >> k & 1 else None for k in range(len(UNITS)))))
    policies.append(BlockPolicy.whole())  # on demand: torch's checkpoint of the block (the mask above is in a window)
    for policy in policies:
        handle = apply_unit_recompute([model.blocks[0]], [policy], Recomputations())
        acct = MemoryAccountant(model)
        with acct.track_activations():
            out = model.blocks[0](h, model.rope())
        kept = acct.act_bytes
        del out
        acct.close()
        handle.remove()
        assert kept == units.total_bytes - policy_cost(policy, units, [1.0] * 8).freed_bytes, policy.describe()


def test_recompute_cost_follows_the_region_rules():
    units = block_units(get_preset("gpt2-small"), 1, 1024, 2)
    t = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0]  # one bit per step: which steps rerun
    assert policy_cost(BlockPolicy.whole(), units, t).demand_s == 127  # down skipped: it saves only its input
    assert policy_cost(BlockPolicy.of(demand=["qkv"]), units, t).demand_s == 2 + 4  # attn reruns for its lse
    assert policy_cost(BlockPolicy.of(demand=["act"]), units, t).demand_s == 64
    # With dropout a region ending at proj or down keeps that step's mask (keeps_tail) and does
    # not rerun it; a whole block on demand is torch's checkpoint of the block and does.
    with_dropout = block_units(dataclasses.replace(get_preset("gpt2-small"), dropout=0.1), 1, 1024, 2)
    mask = with_dropout.steps[STEPS.index("down")].int_bytes
    assert mask > 0
    act, act_plain = (policy_cost(BlockPolicy.of(demand=["act"]), u, t) for u in (with_dropout, units))
    assert act.demand_s == 64 and act.freed_bytes == act_plain.freed_bytes
    assert policy_cost(BlockPolicy.of(demand=["attn"]), with_dropout, t).demand_s == 4
    assert policy_cost(BlockPolicy.whole(), with_dropout, t).demand_s == 127 + 128
    assert policy_cost(BlockPolicy.whole(WINDOW), with_dropout, t).window_s == 127
    assert (policy_cost(BlockPolicy.whole(), with_dropout, t).freed_bytes
            == policy_cost(BlockPolicy.whole(WINDOW), with_dropout, t).freed_bytes + mask)


def _heu_plan(name="recompute"):
    cfg, cluster, global_batch, seq_len = CASES[name]
    return plan_cluster(cfg, cluster, global_batch, seq_len, OPTIONS, SearchOptions(upper_bound=False))


def test_schedule_recurrence_and_memory_equal_the_event_simulator():
    plan = _heu_plan()
    assert any(st.recompute for pipe in plan.pipelines for st in pipe.stages), "the case must use unit policies"
    assert any(g.get("collective") for pipe in plan.pipelines for st in pipe.stages
               for g in (st.recompute or {}).get("blocks", [])), "and collective regions (held by the backward)"
    ctx = context_for(plan)
    pred, events = predict_plan(plan, ctx)
    ahead = any(x.recompute_ahead_s for x in pred.stages)
    assert ahead == ("recompute" in {e.cat for e in events})  # ahead of a backward: a task of its own
    for p, pipe in enumerate(plan.pipelines):
        stages = plan_stages(ctx, plan, pipe)
        times, extra = [], []
        for s, (st, sp) in enumerate(zip(stages, pipe.stages)):
            policies = block_policies(sp.recompute, sp.first_block, sp.n_blocks, sp.n_recompute_blocks)
            ahead, demand, freed, held = stage_recompute(ctx, st, pipe.micro_batch, policies, s == len(stages) - 1)
            times.append(StageTimes(st.fwd_s(sp.n_blocks), st.bwd_s(sp.n_blocks, sp.n_recompute_blocks), ahead,
                                    demand))
            extra.append((freed, held))
        ends = simulate(times, pipe.n_microbatches).ends_s
        step = max(e + st.sync_s(sp.n_blocks) + st.optim_s(sp.n_blocks) for e, st, sp in zip(ends, stages, pipe.stages))
        assert step == pytest.approx(pred.pipeline_step_s[p], rel=1e-12)
        for s, (st, sp, (freed, held)) in enumerate(zip(stages, pipe.stages, extra)):
            got = next(x for x in pred.stages if x.pipeline == p and x.stage == s).peak_bytes
            assert got == st.peak_bytes(sp.n_blocks, sp.n_recompute_blocks) - st.inflight * freed + held
            assert got <= st.capacity_bytes


def _walk(stages: list[StageTimes], m: int):
    """The schedule of one_f_one_b.simulate, walked operation by operation in 1F1B order."""
    from hetrain.plan.cluster.one_f_one_b import one_f_one_b_orders

    S, orders = len(stages), one_f_one_b_orders(len(stages), m)
    fwd_end, bwd_end = {}, {}
    clock, pos = [0.0] * S, [0] * S
    windows = [[0.0] * m for _ in range(S)]
    hidden, exposed = [0.0] * S, [0.0] * S
    while any(p < len(o) for p, o in zip(pos, orders)):
        for s, st in enumerate(stages):
            while pos[s] < len(orders[s]):
                fwd, i = orders[s][pos[s]]
                if fwd:
                    if s > 0 and (s - 1, i) not in fwd_end:
                        break
                    clock[s] = fwd_end[s, i] = max(clock[s], fwd_end.get((s - 1, i), 0.0)) + st.fwd_s
                elif s == S - 1:
                    exposed[s] += st.window_s + st.demand_s
                    clock[s] = bwd_end[s, i] = clock[s] + st.window_s + st.bwd_s + st.demand_s
                else:
                    if (s + 1, i) not in bwd_end:
                        break
                    arrival = bwd_end[s + 1, i]
                    windows[s][i] = max(0.0, arrival - clock[s])
                    hidden[s] += min(windows[s][i], st.window_s)
                    exposed[s] += max(0.0, st.window_s - windows[s][i]) + st.demand_s
                    clock[s] = bwd_end[s, i] = max(clock[s] + st.window_s, arrival) + st.bwd_s + st.demand_s
                pos[s] += 1
    return clock, windows, hidden, exposed


def test_schedule_rounds_equal_the_walk_of_the_operations():
    """simulate works round by round over all stages at once; a walk of each stage's operations
    in 1F1B order gives the same ends, windows, hidden and exposed seconds (fewer micro-batches than
    stages included)."""
    rng = random.Random(7)
    for _ in range(300):
        S, m = rng.randint(1, 8), rng.randint(1, 12)
        stages = [StageTimes(rng.uniform(0.1, 2.0), rng.uniform(0.1, 4.0), rng.choice([0.0, rng.uniform(0, 1.5)]),
                             rng.choice([0.0, rng.uniform(0, 0.5)])) for _ in range(S)]
        got = simulate(stages, m)
        ends, windows, hidden, exposed = _walk(stages, m)
        assert got.ends_s == pytest.approx(ends, rel=1e-12, abs=1e-12)
        assert got.hidden_s == pytest.approx(hidden, rel=1e-12, abs=1e-12)
        assert got.exposed_s == pytest.approx(exposed, rel=1e-12, abs=1e-12)
        for row, want in zip(got.windows_s, windows):
            assert row == pytest.approx(want, rel=1e-12, abs=1e-12)


def test_windows_hide_recomputation_ahead_and_not_on_demand():
    stages = [StageTimes(1.0, 2.0, 0.5, 0.0), StageTimes(1.0, 2.0)]
    ahead = simulate(stages, 4)
    demand = simulate([StageTimes(1.0, 2.0, 0.0, 0.5), StageTimes(1.0, 2.0)], 4)
    plain = simulate([StageTimes(1.0, 2.0), StageTimes(1.0, 2.0)], 4)
    assert ahead.windows_s[0][0] == pytest.approx(2.0)  # the warm-up bubble before the first backward
    assert ahead.hidden_s[0] > 0 and ahead.step_s < demand.step_s
    assert plain.step_s <= ahead.step_s
    assert simulate([StageTimes(1.0, 2.0), StageTimes(1.0, 2.0, 0.5)], 4).exposed_s[1] == 4 * 0.5  # last stage


def _problems():
    """Small stage problems: two model shapes, tight and loose memory, short and long windows, with
    and without tensor-parallel all-reduces to recompute in (their window per block)."""
    for preset, n, frac, windows, collective in itertools.product(
            ["gpt2-small", "tiny-llama"], (3, 4), (0.3, 0.6), ((0.05,) * 6, (2.0, 0.4, 0.4, 0.4, 0.4, 1.0), ()),
            (0.0, 4.0)):
        if collective and len(windows) == 6 and windows[0] == 2.0:
            continue  # 40 cases are enough for the MILP's time
        cfg = get_preset(preset)
        units = block_units(cfg, 1, min(cfg.max_seq_len, 1024), 2)
        steps = tuple(i + 1.0 for i in range(8))
        yield StageProblem(n, units, steps, 3, frac * 3 * n * units.total_bytes, len(windows) or 6, windows,
                           collective, tp=2 if collective else 1)


def test_with_dropout_heu_prices_a_whole_block_ahead_as_it_runs():
    """A whole block recomputed ahead keeps its last dropout mask (keeps_tail) where one on demand
    frees it: HEU must price the ahead blocks so, or it takes plans that do not fit for ones that
    do. With residual dropout, pipeline windows and tight memory, HEU fits wherever the MILP
    does and is never better than it."""
    units = block_units(dataclasses.replace(get_preset("gpt2-small"), dropout=0.1, dropout_attention=False),
                        1, 1024, 2)
    ahead = policy_cost(BlockPolicy.whole(WINDOW), units, [1.0] * 8)
    assert ahead.freed_bytes < policy_cost(BlockPolicy.whole(), units, [1.0] * 8).freed_bytes
    fitted = 0
    for frac in (0.06, 0.08, 0.1, 0.12, 0.15, 0.2, 0.3):
        problem = StageProblem(4, units, tuple(i + 1.0 for i in range(8)), 4, frac * 4 * 4 * units.total_bytes, 8,
                               (50.0,) * 8)
        heu, opt = heuristic(problem), optimal(problem)
        assert heu.fits == opt.fits, frac
        if opt.fits:
            fitted += 1
            assert heu.cost_s >= opt.cost_s - 1e-9
    assert fitted >= 3


def test_collective_regions_hide_in_the_next_blocks_all_reduces():
    units = block_units(get_preset("gpt2-small"), 1, 1024, 2)
    steps = tuple(i + 1.0 for i in range(8))  # norm2, up, act rerun: 5 + 6 + 7 = 18 s
    policy = BlockPolicy.of(collective=["norm2", "up", "act"])
    alone = policy_cost(policy, units, list(steps))
    assert alone.collective_s == 18 and alone.demand_s == 0 and alone.window_s == 0
    problem = StageProblem(3, units, steps, 2, math.inf, 4, (), collective_window_s=10.0)
    choice = choice_of(problem, [policy] * 3)
    # blocks 0 and 1 hide 10 s each in the next block's all-reduces; the last block has no next
    # block, so its MLP side is on demand (and written so)
    assert choice.policies[-1] == BlockPolicy.of(demand=["norm2", "up", "act"]) and choice.policies[0] == policy
    assert choice.collective_s == 2 * 18 and choice.collective_hidden_s == 2 * 10
    assert choice.demand_s == 2 * (18 - 10) + 18 and choice.cost_s == 4 * choice.demand_s
    assert choice.held_bytes == alone.collective_freed_bytes == alone.freed_bytes > 0
    # the attention side (norm1, qkv, attn: 1 + 2 + 3 s) of the last block runs inside its own MLP's
    # all-reduce, half the window
    attention = BlockPolicy.of(collective=["norm1", "qkv", "attn"])
    own = choice_of(problem, [attention] * 3)
    assert own.collective_s == 18 and own.collective_hidden_s == 6 + 6 + 5 and own.demand_s == 1
    # a block's attention side waits for its backward while its MLP all-reduce restores the block before
    assert own.held_bytes == 2 * policy_cost(attention, units, list(steps)).collective_freed_bytes
    without = choice_of(dataclasses.replace(problem, collective_window_s=0.0), [policy] * 3)  # no TP: on demand
    assert without.demand_s == 3 * 18 and without.collective_hidden_s == 0 and without.held_bytes == 0
    with pytest.raises(ValueError, match="row-parallel"):
        BlockPolicy.of(collective=["proj"])


def test_no_tensor_parallel_all_reduce_is_recomputed_ahead():
    """proj reruns a row-parallel all-reduce; each TP rank stops recomputing ahead when its own
    gradient arrives, so at tp > 1 neither HEU nor OPT places it in a window (at tp 1 OPT does here)."""
    units = block_units(get_preset("gpt2-small"), 1, 1024, 2)
    problem = StageProblem(3, units, tuple(i + 1.0 for i in range(8)), 3, 0.2 * 3 * 3 * units.total_bytes, 6,
                           (200.0,) * 6)
    proj = UNITS.index("proj")
    assert any(p.places[proj] == WINDOW for p in optimal(problem).policies)
    tp2 = dataclasses.replace(problem, tp=2)
    for choice in (heuristic(tp2), optimal(tp2)):
        assert choice.fits and not any(p.places[proj] == WINDOW for p in choice.policies)
        assert choice.window_s > 0  # what needs no all-reduce is still recomputed ahead


def test_with_dropout_the_mlp_side_may_still_hide_inside_all_reduces():
    """With dropout, a region ending at proj or down keeps that projection's mask outside it and
    does not rerun the projection (its all-reduce under TP), so MLP-side units may be recomputed
    inside all-reduces as without dropout; only dropping proj's output reruns one."""
    cfg = dataclasses.replace(get_preset("gpt2-small"), dropout=0.1)
    units = block_units(cfg, 1, 1024, 2)
    assert reruns_row_parallel(3, 4) and reruns_row_parallel(0, 7)
    assert not reruns_row_parallel(2, 3) and not reruns_row_parallel(4, 7)
    placed = set()
    # Matmul steps slow, the others fast (as on a GPU): GELU's large output is the cheapest to drop.
    for frac, steps in itertools.product((0.2, 0.4, 0.6), [tuple(i + 1.0 for i in range(8)),
                                                          (0.5, 8.0, 4.0, 8.0, 0.5, 8.0, 0.5, 8.0)]):
        problem = StageProblem(3, units, steps, 3, frac * 9 * units.total_bytes, 6,
                               (200.0,) * 6, collective_window_s=10.0, tp=2)
        heu, opt = heuristic(problem), optimal(problem)
        assert heu.fits and opt.fits and heu.cost_s >= opt.cost_s - 1e-9
        for choice in (heu, opt):
            for p in choice.policies:
                assert not any(reruns_row_parallel(a, b) for a, b, place in p.regions() if place != DEMAND)
                placed |= set(p.units_at(COLLECTIVE))
    assert "act" in placed  # a region ending at down, inside an all-reduce


def test_heu_is_close_to_the_milp_and_never_better():
    worst, used = 1.0, 0
    for problem in _problems():
        heu, opt = heuristic(problem), optimal(problem)
        assert heu.fits and opt.fits
        for choice in (heu, opt):
            assert all(p.places[UNITS.index("proj")] != COLLECTIVE for p in choice.policies)
            if problem.tp > 1:  # a TP all-reduce is never recomputed ahead (the ranks stop at different points)
                assert all(p.places[UNITS.index("proj")] != WINDOW for p in choice.policies)
            used += any(COLLECTIVE in p.places for p in choice.policies)
            if not problem.collective_window_s:
                assert not any(COLLECTIVE in p.places for p in choice.policies)
        assert heu.cost_s >= opt.cost_s - 1e-9  # OPT is optimal over a superset of HEU's choices
        total = problem.n_microbatches * problem.n_blocks * sum(problem.step_s) * 3  # stage work, roughly
        worst = max(worst, (total + heu.cost_s) / (total + opt.cost_s))
    assert worst < 1.03
    assert used >= 8  # both search the collective place where there is one


def test_heu_and_opt_predicted_steps_within_3_percent_on_a_pipeline():
    cfg = dataclasses.replace(get_preset("small"), n_layer=6)
    text = ('name = "cpu2"\n[[group]]\nname = "cpu"\nkind = "cpu"\nnodes = 1\ndevices_per_node = 2\n'
            'intra_node_gbytes_per_s = 0.05\ninter_node_gbytes_per_s = 0.05\nmemory_gib = {mem}\n'
            'peak_fp32_tflops = 0.1\npeak_bf16_tflops = 0.1\n')
    def plan_for(mem_gib):
        return plan_cluster(cfg, parse_cluster(text.format(mem=mem_gib)), 16, 128, PredictorOptions(),
                            SearchOptions(pins=Pins(pp=2, micro_batch=2), upper_bound=False, recompute="whole"))

    roomy = plan_for(64)
    ctx = context_for(roomy)
    stages = build_stages(ctx, shape_of(roomy.pipelines[0]), roomy.pipelines[0].n_microbatches)
    n = [st.n_blocks for st in roomy.pipelines[0].stages]
    low, high = (max(st.peak_bytes(k, r(k)) for st, k in zip(stages, n)) for r in (lambda k: k, lambda k: 0))
    plan = plan_for((low + 0.4 * (high - low)) / 0.92 / 2**30)  # between all and no blocks recomputed
    pipe = plan.pipelines[0]
    assert sum(st.n_recompute_blocks for st in pipe.stages) > 0
    ctx = context_for(plan)
    stages = build_stages(ctx, shape_of(pipe), pipe.n_microbatches)
    n = [st.n_blocks for st in pipe.stages]
    heu_s, _ = Pricer(ctx, stages, pipe.n_microbatches, pipe.micro_batch, "heu").price(n)
    opt_s, _ = Pricer(ctx, stages, pipe.n_microbatches, pipe.micro_batch, "opt").price(n)
    whole_s = Pricer(ctx, stages, pipe.n_microbatches, pipe.micro_batch, "heu").whole_block_s(
        n, [st.n_recompute_blocks for st in pipe.stages])
    assert opt_s <= heu_s <= 1.03 * opt_s
    assert heu_s < whole_s


def test_heu_on_a_96_block_model_is_fast():
    cfg = dataclasses.replace(get_preset("gpt3-2.7b"), n_layer=96)
    text = ('name = "a100x8"\n[[group]]\nname = "a100"\nkind = "A100-40GB"\nnodes = 1\ndevices_per_node = 8\n'
            'intra_node_gbytes_per_s = 50\ninter_node_gbytes_per_s = 12.5\n')
    plan = plan_cluster(cfg, parse_cluster(text), 64, 2048, PredictorOptions(),
                        SearchOptions(pins=Pins(pp=8, tp=1, micro_batch=2), upper_bound=False, recompute="whole"))
    pipe = plan.pipelines[0]
    ctx = context_for(plan)
    pricer = Pricer(ctx, build_stages(ctx, shape_of(pipe), pipe.n_microbatches), pipe.n_microbatches,
                     pipe.micro_batch, "heu")
    start = time.perf_counter()
    step, rec = pricer.price([st.n_blocks for st in pipe.stages])
    assert time.perf_counter() - start < 1.0  # 0.02 s measured; the goal is under 0.2 s on a shared 2-core CPU
    assert math.isfinite(step) and any(ch.freed_bytes for ch in rec.choices)


def test_plans_without_memory_pressure_are_left_alone():
    cfg, cluster, global_batch, seq_len = CASES["separate-pipelines"]
    a = plan_cluster(cfg, cluster, global_batch, seq_len, OPTIONS, SearchOptions(upper_bound=False))
    b = plan_cluster(cfg, cluster, global_batch, seq_len, OPTIONS, SearchOptions(upper_bound=False, recompute="whole"))
    assert a.pipelines == b.pipelines
    assert not any(st.recompute or st.n_recompute_blocks for p in a.pipelines for st in p.stages)


def test_policies_round_trip_through_plan_json_and_placement(tmp_path):
    policies = [BlockPolicy.whole(WINDOW), BlockPolicy.whole(WINDOW), BlockPolicy.keep(),
                BlockPolicy.of(window=["norm1"], demand=["up", "act"])]
    groups = policy_groups(policies, 2)
    assert groups[0] == {"first_block": 2, "n_blocks": 2, "window": list(UNITS), "demand": []}
    assert block_policies({"blocks": groups}, 2, 4, 0) == policies
    collective = [BlockPolicy.of(collective=["norm1", "qkv", "attn"], demand=["up"])] * 2 + [BlockPolicy.keep()]
    assert policy_groups(collective, 0) == [{"first_block": 0, "n_blocks": 2, "window": [], "demand": ["up"],
                                             "collective": ["norm1", "qkv", "attn"]}]
    assert block_policies({"blocks": policy_groups(collective, 0)}, 0, 3, 0) == collective
    with pytest.raises(ValueError, match="row-parallel"):
        block_policies({"blocks": [{"first_block": 0, "n_blocks": 1, "collective": ["proj"]}]}, 0, 3, 0)
    assert block_policies({}, 0, 3, 2) == [BlockPolicy.whole(), BlockPolicy.whole(), BlockPolicy.keep()]
    model = dataclasses.asdict(dataclasses.replace(get_preset("tiny"), n_layer=6))
    cluster = cluster_to_dict(parse_cluster('name = "c"\n[[group]]\nname = "cpu"\nkind = "cpu"\nnodes = 1\n'
                                            'devices_per_node = 2\nintra_node_gbytes_per_s = 1\n'
                                            'inter_node_gbytes_per_s = 1\n'))
    stages = [StagePlan("cpu", "cpu", 1, 0, 2, 0, embedding=True),
              StagePlan("cpu", "cpu", 1, 2, 4, 0, head=True, recompute={"blocks": groups})]
    plan = ClusterPlan(model, cluster, 4, 32, {}, [PipelinePlan(["cpu"], [1], 1, 1, 4, stages)])
    plan.save(tmp_path / "plan.json")
    layout = place_plan(ClusterPlan.load(tmp_path / "plan.json"))
    assert list(layout.places[1].chunks[0].policies) == policies
    bad = dataclasses.replace(stages[1], recompute={"blocks": [{"first_block": 2, "n_blocks": 1, "window": ["mlp"]}]})
    with pytest.raises(ConfigError, match="recompute units must be distinct names"):
        place_plan(dataclasses.replace(plan, pipelines=[PipelinePlan(["cpu"], [1], 1, 1, 4, [stages[0], bad])]))
    both = dataclasses.replace(stages[1], n_recompute_blocks=1)
    with pytest.raises(ConfigError, match="both n_recompute_blocks and a recompute policy"):
        place_plan(dataclasses.replace(plan, pipelines=[PipelinePlan(["cpu"], [1], 1, 1, 4, [stages[0], both])]))
