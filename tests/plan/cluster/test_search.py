import dataclasses
import itertools
import math
import textwrap

import pytest

from hetrain.hardware.cluster import parse_cluster
from hetrain.model.describe import describe_model
from hetrain.model.gpt import ModelConfig
from hetrain.plan.cluster.cost import CostContext, PredictorOptions
from hetrain.plan.cluster.predict import PipelineShape, build_stages, pipeline_step_s
from hetrain.plan.cluster.planner import plan_cluster
from hetrain.plan.cluster.search import SearchOptions, divisors, pipeline_layouts, pipeline_shapes, search


# Exhaustive enumeration of the planner's space: the oracle of the search tests.
def compositions(total: int, parts: int):
    """Every way to write total as an ordered sum of `parts` positive integers."""
    for cuts in itertools.combinations(range(1, total), parts - 1):
        bounds = (0, *cuts, total)
        yield [bounds[i + 1] - bounds[i] for i in range(parts)]


def best_pipeline_step(ctx, shape, m, others, n_pipes):
    stages = build_stages(ctx, shape, m, others, n_pipes)
    best = math.inf
    for n in compositions(ctx.n_blocks, len(stages)):
        r = [st.min_recompute(k) for st, k in zip(stages, n)]
        if None in r:
            continue
        best = min(best, pipeline_step_s(stages, n, r, m))
    return best


def exhaustive_best_step(ctx, global_batch: int, pins=None) -> float:
    """The best predicted step over every layout, shape, batch allocation and layer split."""
    best = math.inf
    for layout in pipeline_layouts([g.name for g in ctx.cluster.groups]):
        options = []  # per pipeline: {samples: best step}
        for k, groups in enumerate(layout):
            others = tuple(g for j, gs in enumerate(layout) if j != k for g in gs)
            per_samples = {}
            for shape in pipeline_shapes(ctx, groups, pins):
                unit = shape.dp * shape.micro_batch
                for m in range(1, global_batch // unit + 1):
                    step = best_pipeline_step(ctx, shape, m, others, len(layout))
                    per_samples[unit * m] = min(per_samples.get(unit * m, math.inf), step)
            options.append(per_samples)
        for shares in itertools.product(*(sorted(o) for o in options)):
            if sum(shares) == global_batch:
                best = min(best, max(o[x] for o, x in zip(options, shares)))
    return best


MODEL = ModelConfig(preset="test-6", n_layer=6, d_model=1024, n_head=8, n_kv_head=8, d_ff=4096,
                    max_seq_len=2048, vocab_size=32000, pos="rope", norm="rmsnorm", mlp="swiglu",
                    tie_embeddings=False, bias=False)
OPTIONS = PredictorOptions(max_micro_batch=4)


def two_kinds(a_nodes, a_per_node, b_nodes, b_per_node, a_mem=None, b_mem=None, link=False):
    text = textwrap.dedent(f"""\
        name = "small"
        [[group]]
        name = "a"
        kind = "A100-40GB"
        nodes = {a_nodes}
        devices_per_node = {a_per_node}
        intra_node_gbytes_per_s = 300
        inter_node_gbytes_per_s = 25
        {f"memory_gib = {a_mem}" if a_mem else ""}
        [[group]]
        name = "b"
        kind = "MI250X-GCD"
        nodes = {b_nodes}
        devices_per_node = {b_per_node}
        intra_node_gbytes_per_s = 100
        inter_node_gbytes_per_s = 12.5
        {f"memory_gib = {b_mem}" if b_mem else ""}
        """)
    if link:
        text += '[[link]]\ngroups = ["a", "b"]\ngbytes_per_s = 25\n'
    return parse_cluster(text, "small.toml")


def model(d_model: int, n_layer: int) -> ModelConfig:
    return dataclasses.replace(MODEL, n_layer=n_layer, d_model=d_model, n_head=16, n_kv_head=8,
                               d_ff=int(3.5 * d_model))


CASES = {
    # name: (model, cluster, global batch, seq_len)
    "separate-pipelines": (model(512, 4), two_kinds(2, 2, 2, 2, link=True), 48, 2048),
    "recompute": (model(4096, 6), two_kinds(1, 4, 1, 4, a_mem=4, b_mem=4), 16, 1024),
    "cross-kind-pipeline": (model(4096, 8), two_kinds(2, 2, 1, 4), 16, 2048),
    "16-devices": (model(2048, 6), two_kinds(2, 4, 2, 4, a_mem=6, b_mem=4), 32, 2048),
    "per-group-micro-batch": (model(512, 6), two_kinds(1, 2, 2, 4, link=True), 48, 2048),
    # The b stage's replicas reduce gradients across nodes at 12.5 GB/s: the best split gives it
    # one block (7 + 1), not the compute-balanced 5 + 3.
    "slow-reduction-tail": (model(2048, 8), two_kinds(1, 4, 2, 2, a_mem=8, b_mem=64), 16, 2048),
}


def _search_case(name):
    cfg, cluster, global_batch, seq_len = CASES[name]
    ctx = CostContext(describe_model(cfg, 1, seq_len), cluster, OPTIONS)
    return ctx, global_batch, search(ctx, global_batch)[0]


@pytest.mark.parametrize("name", list(CASES))
def test_no_plan_beats_the_pooled_memory_bound(name):
    """The upper bound (each kind alone with the cluster's memory pooled over its devices) is at
    least the throughput of the plan, which the test below holds equal to the exhaustive optimum;
    every kind fits the model alone with that memory."""
    cfg, cluster, global_batch, seq_len = CASES[name]
    plan = plan_cluster(cfg, cluster, global_batch, seq_len, OPTIONS, SearchOptions())
    assert 0.3 < plan.upper_bound["efficiency"] <= 1.0
    assert all(v["fits"] for v in plan.upper_bound["kinds"].values())


@pytest.mark.parametrize("name", list(CASES))
def test_search_equals_exhaustive_enumeration(name):
    ctx, global_batch, cand = _search_case(name)
    assert ctx.cluster.devices <= 16 and len({g.kind.name for g in ctx.cluster.groups}) == 2
    best = exhaustive_best_step(ctx, global_batch)
    assert math.isfinite(best)
    assert cand.step_s == pytest.approx(best, rel=1e-12)


def test_exhaustive_cases_cover_the_space():
    chosen = {name: _search_case(name)[2] for name in CASES}
    assert len(chosen["separate-pipelines"].pipelines) == 2
    assert any(sum(p.n_recompute) for p in chosen["recompute"].pipelines)
    assert len(chosen["cross-kind-pipeline"].pipelines[0].shape.groups) == 2
    mbs = {p.shape.micro_batch for p in chosen["per-group-micro-batch"].pipelines}
    assert len(mbs) == 2
    (tail,) = chosen["slow-reduction-tail"].pipelines
    assert tail.shape.groups == ("a", "b") and tail.n_blocks == [7, 1]
    assert all(len(set(p.shape.tps)) == 1 for c in chosen.values() for p in c.pipelines)


def test_one_tp_degree_per_pipeline_unless_asked():
    """The pipeline runtime pairs neighbouring stages TP rank by TP rank: by default the search
    gives a pipeline one TP degree. `mixed_tp` widens the space (here to a faster plan, found
    exactly), and the report and the runtime's placement both say such a plan cannot run yet."""
    from hetrain.errors import ConfigError
    from hetrain.pipeline.placement import place_plan
    from hetrain.plan.cluster.planner import Pins, SearchOptions, format_report, plan_cluster

    cfg, cluster = model(4096, 8), two_kinds(1, 4, 1, 2, a_mem=8, b_mem=80)
    ctx = CostContext(describe_model(cfg, 1, 2048), cluster, OPTIONS)
    one, _ = search(ctx, 16)
    mixed_pins = Pins(mixed_tp=True)
    mixed, _ = search(ctx, 16, SearchOptions(pins=mixed_pins))
    assert all(len(set(p.shape.tps)) == 1 for p in one.pipelines)
    assert any(len(set(p.shape.tps)) > 1 for p in mixed.pipelines)
    assert mixed.step_s < one.step_s
    assert mixed.step_s == pytest.approx(exhaustive_best_step(ctx, 16, mixed_pins), rel=1e-12)
    assert one.step_s == pytest.approx(exhaustive_best_step(ctx, 16), rel=1e-12)

    plain = plan_cluster(cfg, cluster, 16, 2048, OPTIONS, SearchOptions(upper_bound=False))
    place_plan(plain)  # runnable
    assert "not runnable yet" not in format_report(plain)
    plan = plan_cluster(cfg, cluster, 16, 2048, OPTIONS, SearchOptions(upper_bound=False, pins=mixed_pins))
    assert "not runnable yet: P0 mix TP degrees" in format_report(plan)
    with pytest.raises(ConfigError, match="re-plan without --plan.mixed_tp"):
        place_plan(plan)


def megatron_uniform_best(ctx, global_batch) -> float:
    """Best uniform Megatron-style config: TP inside a node, PP dividing the blocks evenly, no or full recompute."""
    (group,) = ctx.cluster.groups
    best = math.inf
    for tp in divisors(group.devices_per_node):
        if ctx.desc.config.n_head % tp:
            continue
        for pp in divisors(ctx.n_blocks):
            if (group.devices // tp) % pp:
                continue
            dp = group.devices // (tp * pp)
            for b in (1, 2, 4, 8, 16):
                if global_batch % (dp * b):
                    continue
                m = global_batch // (dp * b)
                stages = build_stages(ctx, PipelineShape((group.name,), (tp,), dp, b), m)
                n = [ctx.n_blocks // pp] * pp
                for recompute_all in (False, True):
                    r = [k if recompute_all else 0 for k in n]
                    if all(st.peak_bytes(k, rk) <= st.capacity_bytes for st, k, rk in zip(stages, n, r)):
                        best = min(best, pipeline_step_s(stages, n, r, m))
    return best


@pytest.mark.parametrize("kind,nodes,per_node,preset_layers,memory_gib,global_batch", [
    ("A100-40GB", 2, 8, 30, 12, 64),  # 30 blocks: uniform stages cannot use 4 stages
    ("A100-80GB", 2, 8, 24, None, 64),
    ("H100-SXM", 4, 8, 32, 24, 128),
    ("RTX-4090", 2, 4, 12, None, 32),
])
def test_homogeneous_never_worse_than_uniform_megatron(kind, nodes, per_node, preset_layers, memory_gib, global_batch):
    cluster = parse_cluster(textwrap.dedent(f"""\
        [[group]]
        name = "g"
        kind = "{kind}"
        nodes = {nodes}
        devices_per_node = {per_node}
        intra_node_gbytes_per_s = 300
        inter_node_gbytes_per_s = 100
        {f"memory_gib = {memory_gib}" if memory_gib else ""}
        """), "homogeneous.toml")
    cfg = dataclasses.replace(MODEL, n_layer=preset_layers, d_model=4096, n_head=32, n_kv_head=32, d_ff=11008)
    ctx = CostContext(describe_model(cfg, 1, 2048), cluster, PredictorOptions())
    uniform = megatron_uniform_best(ctx, global_batch)
    cand, _ = search(ctx, global_batch)
    assert math.isfinite(uniform)
    assert cand.step_s <= uniform * (1 + 1e-12)


def test_pinned_degrees_are_kept_and_the_search_fills_in_the_rest(tmp_path, capsys):
    """`hetrain plan --cluster local-cpu.toml --plan.pp 2 --plan.dp 2 ...`: one pipeline across both
    kinds; an impossible pin is one line naming the pins."""
    import json
    from pathlib import Path

    from hetrain.cli import main

    cluster = Path(__file__).resolve().parents[3] / "configs/clusters/local-cpu.toml"
    base = ["plan", "--cluster", str(cluster), "--model.preset", "tiny", "--model.n_layer", "4", "--train.seq_len",
            "32", "--plan.global_batch", "8"]
    assert main(base + ["--plan.pp", "2", "--plan.dp", "2", "--plan.micro_batch", "2", "--run.dir",
                        str(tmp_path / "a")]) == 0
    (pipe,) = json.loads((tmp_path / "a" / "plan.json").read_text())["pipelines"]
    assert (pipe["groups"], pipe["dp"], pipe["micro_batch"], pipe["n_microbatches"]) == (["cpu-a", "cpu-b"], 2, 2, 2)
    assert [s["kind"] for s in pipe["stages"]] == ["cpu-a", "cpu-b"]
    assert main(base[:6] + ["6"] + base[7:] + ["--plan.tp", "2", "--plan.pp", "2", "--plan.virtual_stages", "2",
                                               "--run.dir", str(tmp_path / "b")]) == 0
    pipes = json.loads((tmp_path / "b" / "plan.json").read_text())["pipelines"]
    assert all(p["tp"] == [2] * len(p["groups"]) and len(p["stages"]) == 2 * 2 and p["virtual_stages"] == 2
               for p in pipes)
    from hetrain.plan.cluster.planner import load_plan, repredict

    interleaved = load_plan(tmp_path / "b" / "plan.json")  # priced as the 1F1B plan of its device stages
    assert repredict(interleaved).prediction["step_s"] == pytest.approx(interleaved.prediction["step_s"], rel=1e-12)
    capsys.readouterr()
    assert main(base + ["--plan.pp", "3", "--plan.dp", "2", "--run.dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "no plan with --plan.pp 3 --plan.dp 2 fits cluster 'local-cpu'" in err and err.count("\n") == 1


@pytest.mark.parametrize("n_stages, n_chunks, m", [(2, 2, 4), (4, 2, 8), (3, 3, 6), (4, 2, 3), (2, 3, 5)])
def test_interleaved_order_is_torchs(n_stages, n_chunks, m):
    """The predictor prices the order torch's ScheduleInterleaved1F1B runs, rank by rank."""
    from torch.distributed.pipelining import ScheduleInterleaved1F1B
    from torch.distributed.pipelining.schedules import _ComputationType

    from hetrain.plan.cluster.interleaved import interleaved_orders

    torch_schedule = object.__new__(ScheduleInterleaved1F1B)  # its order needs no process group
    torch_schedule.n_local_stages, torch_schedule.pp_group_size, torch_schedule._n_microbatches = n_chunks, n_stages, m
    torch_schedule.number_of_rounds = max(1, m // n_stages)
    torch_schedule.microbatches_per_round = m // torch_schedule.number_of_rounds
    ours = interleaved_orders(n_stages, n_chunks, m)
    for rank in range(n_stages):
        actions = [a for a in torch_schedule._calculate_single_rank_operations(rank) if a is not None]
        theirs = [(a.computation_type == _ComputationType.FORWARD, a.stage_index, a.microbatch_index) for a in actions]
        assert ours[rank] == theirs


def _a100_node(devices: int = 4, intra_gbytes_per_s: int = 300, inter_gbytes_per_s: int = 100, memory: str = ""):
    """One node of A100-80GB (memory: an extra `memory_gib = N` line)."""
    return parse_cluster(textwrap.dedent(f"""\
        [[group]]
        name = "a"
        kind = "A100-80GB"
        nodes = 1
        devices_per_node = {devices}
        intra_node_gbytes_per_s = {intra_gbytes_per_s}
        inter_node_gbytes_per_s = {inter_gbytes_per_s}
        {memory}
        """))


def _a100_node_and_model():
    """One node of 4 A100-80GB and a 16-block GPT-2 medium: with PP 4 pinned, interleaving pays."""
    from hetrain.model.presets import get_preset

    return _a100_node(), dataclasses.replace(get_preset("gpt2-medium"), n_layer=16, vocab_size=256)


def test_interleaving_shrinks_the_predicted_bubble():
    """Same stages and micro-batches: 2 interleaved chunks per stage cut the 1F1B bubble on fast links."""
    from hetrain.plan.cluster.planner import Pins, SearchOptions, plan_cluster, repredict
    from hetrain.plan.cluster.plan import interleave

    cluster, model = _a100_node_and_model()
    options = SearchOptions(upper_bound=False, pins=Pins(tp=1, pp=4, dp=1, micro_batch=1), interleave=False)
    plan = plan_cluster(model, cluster, 8, 1024, search_options=options)
    interleaved = dataclasses.replace(plan, pipelines=[interleave(p, 2) for p in plan.pipelines])
    one_f_one_b, inter = repredict(plan).prediction, repredict(interleaved).prediction
    assert inter["step_s"] < one_f_one_b["step_s"]
    assert [s["n_blocks"] for s in inter["stages"]] == [s["n_blocks"] for s in one_f_one_b["stages"]]
    # The planner tries it by itself, and keeps the fastest number of chunks that fits.
    chosen = plan_cluster(model, cluster, 8, 1024, search_options=dataclasses.replace(options, interleave=True))
    assert chosen.pipelines[0].virtual_stages > 1
    assert chosen.prediction["step_s"] <= inter["step_s"] * (1 + 1e-9)


def test_the_busiest_stage_bounds_every_schedule_and_an_interleaved_plan_bounds_its_kinds_interleaved():
    """No schedule of a plan's stages ends before its busiest stage's work (the planner skips
    trying interleaving when that leaves under 1% to gain); when the plan interleaves, each kind
    alone may interleave too (and the plan stays under its bound)."""
    from hetrain.plan.cluster.plan import interleave
    from hetrain.plan.cluster.planner import Pins, _bound_options, _busiest_stage_s, repredict
    from hetrain.plan.cluster.predict import context_for

    cluster, model = _a100_node_and_model()
    plain = plan_cluster(model, cluster, 8, 1024, search_options=SearchOptions(
        upper_bound=False, pins=Pins(tp=1, pp=4, dp=1, micro_batch=1), interleave=False))
    floor = _busiest_stage_s(plain, context_for(plain))
    for v in (1, 2, 4):
        trial = dataclasses.replace(plain, pipelines=[interleave(p, v) for p in plain.pipelines])
        assert repredict(trial).prediction["step_s"] >= floor * (1 - 1e-12)
    pins = Pins(tp=1, pp=4, dp=1, micro_batch=1)
    chosen = plan_cluster(model, cluster, 8, 1024, search_options=SearchOptions(pins=pins))
    assert any(p.virtual_stages > 1 for p in chosen.pipelines)
    assert chosen.upper_bound["efficiency"] <= 1.0
    # The kinds alone search every degree, and interleave when the plan does.
    assert _bound_options(SearchOptions(pins=pins), chosen) == SearchOptions(interleave=True)
    assert _bound_options(SearchOptions(pins=pins), plain) == SearchOptions(interleave=False)


@pytest.mark.parametrize("options", [dict(distributed_optimizer=True), dict(overlap_grad_reduce=False)])
@pytest.mark.parametrize("name", ["recompute", "16-devices", "separate-pipelines"])
def test_search_equals_exhaustive_enumeration_with_priced_options(name, options):
    """The pruning bounds stay bounds under a distributed optimizer, and with the reduction after
    the backward (the default overlaps it: test_search_equals_exhaustive_enumeration)."""
    cfg, cluster, global_batch, seq_len = CASES[name]
    ctx = CostContext(describe_model(cfg, 1, seq_len), cluster, dataclasses.replace(OPTIONS, **options))
    cand = search(ctx, global_batch)[0]
    assert cand.step_s == pytest.approx(exhaustive_best_step(ctx, global_batch), rel=1e-12)


def test_tp_degrees_are_those_the_runtime_can_shard():
    """The runtime shards heads, key/value heads and the MLP width, and refuses TP with dropout:
    the search offers only degrees it can run."""
    cfg, cluster, global_batch, seq_len = CASES["cross-kind-pipeline"]
    base, _ = search(CostContext(describe_model(cfg, 1, seq_len), cluster, OPTIONS), global_batch)
    assert max(t for p in base.pipelines for t in p.shape.tps) > 1
    for changed in (dataclasses.replace(cfg, dropout=0.1), dataclasses.replace(cfg, d_ff=4097 * 3)):
        cand, _ = search(CostContext(describe_model(changed, 1, seq_len), cluster, OPTIONS), global_batch)
        assert cand is not None and all(t == 1 for p in cand.pipelines for t in p.shape.tps)


def test_fp32_plans_price_fp32_activations_and_state():
    """--plan.dtype fp32: 4-byte activations and stage boundaries, and no bf16 copy of the weights
    (16 bytes a parameter, 8 + 8 / dp under ZeRO-1, where bf16 keeps 6 + 12 / dp), as the runtime
    runs fp32."""
    from hetrain.plan.cluster.planner import Pins, SearchOptions, plan_cluster

    fp32 = dataclasses.replace(OPTIONS, compute_dtype="fp32")
    assert (OPTIONS.state_bytes_at(4), fp32.state_bytes_at(4)) == (18, 16)
    assert dataclasses.replace(fp32, distributed_optimizer=True).state_bytes_at(4) == 4 + 4 + 8 / 4
    assert dataclasses.replace(OPTIONS, distributed_optimizer=True).state_bytes_at(4) == 2 + 4 + 12 / 4
    cfg, cluster, global_batch, seq_len = CASES["separate-pipelines"]
    pins = SearchOptions(upper_bound=False, interleave=False, pins=Pins(tp=1, pp=2, dp=2, micro_batch=2))
    plans = {o.compute_dtype: plan_cluster(cfg, cluster, global_batch, seq_len, o, pins) for o in (OPTIONS, fp32)}
    shapes = {d: [(p.groups, [s.n_blocks for s in p.stages]) for p in plan.pipelines] for d, plan in plans.items()}
    assert shapes["fp32"] == shapes["bf16"]  # the same plan, priced twice
    peak = {d: [s["peak_bytes"] for s in plan.prediction["stages"]] for d, plan in plans.items()}
    assert all(a > b for a, b in zip(peak["fp32"], peak["bf16"]))
    from hetrain.plan.cluster.planner import format_report

    assert "Priced in fp32, as hetrain's runtime runs" in format_report(plans["fp32"])
    assert "run it with --train.dtype bf16" in format_report(plans["bf16"])


def test_a_cluster_that_only_mixed_tp_fits_says_so():
    """Every plan that fits gives the two groups different TP degrees: the error says the runtime
    cannot run such plans and names --plan.mixed_tp, which then plans one."""
    from hetrain.errors import ConfigError
    from hetrain.plan.cluster.planner import Pins, SearchOptions, plan_cluster

    cfg, cluster = model(4096, 4), two_kinds(1, 8, 1, 2, a_mem=2, b_mem=8)
    with pytest.raises(ConfigError, match=r"different TP degrees, which the runtime cannot run yet; "
                                          r"`--plan.mixed_tp true` plans one"):
        plan_cluster(cfg, cluster, 16, 2048, OPTIONS, SearchOptions(upper_bound=False))
    plan = plan_cluster(cfg, cluster, 16, 2048, OPTIONS, SearchOptions(upper_bound=False, pins=Pins(mixed_tp=True)))
    assert sorted(plan.pipelines[0].tp) == [2, 8]


def test_the_bound_of_an_opt_plan_falls_back_to_heu_for_stages_too_large_for_the_milp():
    """--plan.recompute opt solves a MILP per stage of at most OPT_MAX_BLOCKS blocks; a kind alone
    may need larger stages that recompute (here 2 devices, 13 blocks a stage): its plan in the
    bound then takes HEU's policies instead of failing the planning."""
    from hetrain.model.presets import get_preset
    from hetrain.model.spec import ModelSpec
    from hetrain.plan.cluster.planner import _upper_bound
    from hetrain.plan.cluster.recompute_split import OPT_MAX_BLOCKS

    cluster = _a100_node(devices=2, intra_gbytes_per_s=8, inter_gbytes_per_s=10, memory="memory_gib = 2")
    model = ModelSpec.gpt(dataclasses.replace(get_preset("gpt2-small"), n_layer=26, vocab_size=256))
    ctx = CostContext(model.describe(1024, dtype_bytes=2), cluster, PredictorOptions())
    cand, _ = search(ctx, 8, SearchOptions())
    (pipe,) = cand.pipelines
    assert max(pipe.n_blocks) > OPT_MAX_BLOCKS and sum(pipe.n_recompute) > 0
    opt = _upper_bound(ctx, model, 8, SearchOptions(recompute="opt"))
    heu = _upper_bound(ctx, model, 8, SearchOptions(recompute="heu"))
    assert opt["kinds"]["A100-80GB"]["fits"] and opt["tokens_per_s"] == heu["tokens_per_s"]
