"""HETHUB-style cluster planner: the fastest hybrid-parallel plan for a cluster of mixed accelerators.

`plan_cluster` checks the input, searches the plan space (hetrain.plan.cluster.search)
under the cluster predictor (hetrain.plan.cluster.predict), predicts the chosen plan with
the discrete-event simulator, and measures it against the upper bound: the sum over device
kinds of the tokens/s that the best plan for that kind's devices alone reaches.
`run_cluster_planning` is what `hetrain plan --cluster FILE` calls: it also writes
plan.json, report.txt and timeline.png. This module plans, predicts and explains; it must
not execute a plan.
"""

from __future__ import annotations

import dataclasses
import os
import time

from hetrain.errors import ConfigError
from hetrain.hardware.cluster import Cluster, cluster_to_dict, load_cluster
from hetrain.model.gpt import ModelConfig
from hetrain.plan.cluster.cost import CostContext, PredictorOptions
from hetrain.plan.cluster.plan import ClusterPlan, PipelinePlan, StagePlan, fold, interleave
from hetrain.plan.cluster.plan_prediction import predict_plan
from hetrain.plan.cluster.predict import PipelineShape, build_stages, context_for, plan_stages
from hetrain.model.spec import ModelSpec
from hetrain.plan.cluster.report import format_report, write_timeline
from hetrain.plan.cluster.search import Candidate, Pins, SearchOptions, divisors, search
from hetrain.plan.cluster.split import split_blocks
from hetrain.predict.roofline import curve_for
from hetrain.plan.cluster.recompute_split import apply_recompute

__all__ = ["ClusterPlan", "Pins", "PredictorOptions", "SearchOptions", "plan_cluster", "run_cluster_planning",
           "format_report", "load_plan", "repredict"]


def _planned(model: ModelConfig | ModelSpec) -> ModelSpec:
    return model if isinstance(model, ModelSpec) else ModelSpec.gpt(model)


def _to_plan(cand: Candidate, ctx: CostContext, model: ModelSpec, global_batch: int) -> ClusterPlan:
    pipelines = []
    for p in cand.pipelines:
        stages, first = [], 0
        for st, n, r in zip(p.stages, p.n_blocks, p.n_recompute):
            stages.append(StagePlan(st.group, st.kind, st.tp, first, n, r, st.embedding, st.head))
            first += n
        pipelines.append(PipelinePlan(list(p.shape.groups), list(p.shape.tps), p.shape.dp,
                                      p.shape.micro_batch, p.n_microbatches, stages))
    used = {g for p in pipelines for g in p.groups}
    return ClusterPlan(
        model=dict(model.record), hf=dict(model.hf), cluster=cluster_to_dict(ctx.cluster),
        global_batch=global_batch, seq_len=ctx.seq_len, options=ctx.options.to_dict(),
        pipelines=pipelines, idle_groups=[g.name for g in ctx.cluster.groups if g.name not in used])


def _devices_to_fit(ctx: CostContext) -> str:
    """For each kind: how many of its devices (one pipeline, TP = node) would hold the model."""
    needs = []
    for group in ctx.cluster.groups:
        tp = max(t for t in divisors(group.devices_per_node) if ctx.desc.tp_heads % t == 0)
        found = None
        for nodes in range(1, ctx.n_blocks + 1):
            sized = dataclasses.replace(group, nodes=nodes)
            trial = CostContext(ctx.desc, Cluster("trial", [sized]), ctx.options)
            n_stages = nodes * group.devices_per_node // tp
            if n_stages > ctx.n_blocks:
                break
            shape = PipelineShape((group.name,), (tp,), 1, 1)
            if split_blocks(build_stages(trial, shape, n_stages), ctx.n_blocks) is not None:
                found = nodes
                break
        have = f"the cluster has {group.devices}"
        if found is None:
            needs.append(f"{group.kind.name}: no count (not even one block per stage of "
                         f"{tp} devices fits); {have}")
        else:
            needs.append(f"{group.kind.name}: at least {found * group.devices_per_node} "
                         f"({found} nodes of {group.devices_per_node}); {have}")
    return "; ".join(needs)


def _fits_some_batch(ctx: CostContext) -> list[int]:
    """Data-parallel degrees of one-group pipelines that fit memory at micro-batch 1 (any batch)."""
    fitting = set()
    for group in ctx.cluster.groups:
        for tp in divisors(group.devices_per_node):
            if ctx.desc.tp_heads % tp:
                continue
            for dp in divisors(group.devices // tp):
                n_stages = group.devices // (dp * tp)
                if n_stages > ctx.n_blocks or dp in fitting:
                    continue
                shape = PipelineShape((group.name,), (tp,), dp, 1)
                if split_blocks(build_stages(ctx, shape, n_stages), ctx.n_blocks) is not None:
                    fitting.add(dp)
    return sorted(fitting)


def _search_or_explain(ctx: CostContext, global_batch: int, opts: SearchOptions):
    cand, stats = search(ctx, global_batch, opts)
    if cand is not None:
        return cand, stats
    free_pins = Pins(mixed_tp=opts.pins.mixed_tp)  # mixing TP degrees widens the space: not a pin
    if opts.pins.tp and ctx.desc.tp_heads % opts.pins.tp:
        raise ConfigError(f"--plan.tp {opts.pins.tp}: this model splits tensor-parallel into divisors of "
                          f"{ctx.desc.tp_heads} only (1: not at all; see ModelDescription.tp_heads: heads, key/value "
                          f"heads and MLP width, none with attention dropout (--model.dropout_attention false keeps "
                          f"residual dropout only), transformers models of Llama's layout from "
                          f"transformers 4.48); pin another --plan.tp or drop it")
    if opts.pins != free_pins:
        free, _ = search(ctx, global_batch, dataclasses.replace(opts, pins=free_pins))
        hint = "; without them the planner finds a plan" if free is not None else ""
        raise ConfigError(f"no plan with {opts.pins.describe()} fits cluster '{ctx.cluster.name}' and divides the "
                          f"global batch {global_batch}{hint}; change or drop a pinned degree")
    if not opts.pins.mixed_tp:
        mixed, _ = search(ctx, global_batch, dataclasses.replace(opts, pins=Pins(mixed_tp=True)))
        if mixed is not None:
            raise ConfigError(f"no plan that the pipeline runtime can run fits cluster '{ctx.cluster.name}' with "
                              f"global batch {global_batch}: every plan that fits gives the groups of one pipeline "
                              f"different TP degrees, which the runtime cannot run yet; `--plan.mixed_tp true` "
                              f"plans one for prediction only, or add devices")
    name = getattr(ctx.desc.config, "preset", None) or getattr(ctx.desc.config, "model_type", "model")
    params_b = ctx.desc.total_params / 1e9
    fitting = _fits_some_batch(ctx)
    if fitting:
        raise ConfigError(
            f"global batch {global_batch} cannot be divided into micro-batches on cluster '{ctx.cluster.name}': "
            f"plans that fit need data-parallel degree x micro-batch to divide it, with data-parallel "
            f"degrees {', '.join(map(str, fitting))}; use a multiple of {fitting[0]}")
    raise ConfigError(
        f"model '{name}' ({params_b:.1f}B parameters, seq_len {ctx.seq_len}) fits no plan on cluster "
        f"'{ctx.cluster.name}'; devices of one kind that would hold it: {_devices_to_fit(ctx)}")


def plan_cluster(model: ModelConfig | ModelSpec, cluster: Cluster, global_batch: int, seq_len: int,
                 options: PredictorOptions = PredictorOptions(),
                 search_options: SearchOptions = SearchOptions()) -> ClusterPlan:
    """The fastest plan found that fits every device; ConfigError when none exists.

    The chosen plan is predicted with the discrete-event simulator (plan.prediction). With
    search_options.upper_bound, each device kind's devices are also planned alone for the
    same batch, and the plan's tokens/s is compared with the sum of theirs (plan.upper_bound).
    """
    if global_batch < 1:
        raise ConfigError(f"global batch must be >= 1, got {global_batch}")
    if search_options.try_distributed_optimizer:
        return _faster_with_or_without_zero1(model, cluster, global_batch, seq_len, options, search_options)
    start = time.perf_counter()
    model = _planned(model)
    ctx = CostContext(model.describe(seq_len, dtype_bytes=options.dtype_bytes), cluster, options)
    cand, stats = _search_or_explain(ctx, global_batch, search_options)
    plan, prediction, recompute, searched_at = _finish(cand, ctx, model, global_batch, search_options)
    search_s = searched_at - start
    plan.prediction = prediction.to_dict()
    plan.search = {"search_s": search_s, "predict_s": time.perf_counter() - start - search_s,
                   "layouts": stats.layouts, "shapes": stats.shapes, "shapes_split": stats.shapes_split,
                   "candidates_predicted": stats.candidates_predicted, "refine_moves": stats.refine_moves,
                   "notes": stats.notes, "recompute": recompute}
    if search_options.upper_bound:
        ub_start = time.perf_counter()
        # Each kind alone, searched freely: pinned degrees are a choice of this plan, not of the bound.
        plan.upper_bound = _upper_bound(ctx, model, global_batch, _bound_options(search_options, plan))
        plan.upper_bound["efficiency"] = prediction.tokens_per_s / plan.upper_bound["tokens_per_s"]
        plan.search["upper_bound_s"] = time.perf_counter() - ub_start
    return plan


def _finish(cand: Candidate, ctx: CostContext, model: ModelSpec, global_batch: int, search_options: SearchOptions):
    """The search's candidate as a plan with its recomputation policies (apply_recompute) and, where
    faster, interleaved; its prediction; what apply_recompute did; and the perf_counter when the
    recomputation was chosen (where the search's time ends and the prediction's begins)."""
    plan = _to_plan(cand, ctx, model, global_batch)
    # Units inside blocks are hetrain's GPT's steps: other models recompute whole blocks.
    recompute = apply_recompute(plan, ctx, search_options.recompute if model.unit_recompute else "whole")
    searched_at = time.perf_counter()
    prediction, _ = predict_plan(plan, ctx)
    if search_options.interleave:
        plan, prediction = _try_interleaving(plan, prediction, ctx)
    return plan, prediction, recompute, searched_at


def _faster_with_or_without_zero1(model, cluster: Cluster, global_batch: int, seq_len: int,
                                  options: PredictorOptions, search_options: SearchOptions) -> ClusterPlan:
    """The faster of the plans without and with ZeRO-1 (the one without on a tie), with the larger
    of their upper bounds (each bounds the plans of its setting; together, the plans of both)."""
    once = dataclasses.replace(search_options, try_distributed_optimizer=False)
    plans, errors = [], []
    for zero in (False, True):
        try:
            plans.append(plan_cluster(model, cluster, global_batch, seq_len,
                                      dataclasses.replace(options, distributed_optimizer=zero), once))
        except ConfigError as e:  # ZeRO-1 may fit where plain AdamW state does not
            errors.append(e)
    if not plans:
        raise errors[0]
    best = min(plans, key=lambda p: p.prediction["step_s"])
    bounds = [p.upper_bound for p in plans if p.upper_bound]
    if bounds:
        best.upper_bound = dict(max(bounds, key=lambda b: b["tokens_per_s"]))
        best.upper_bound["efficiency"] = best.prediction["tokens_per_s"] / best.upper_bound["tokens_per_s"]
    if best.search is not None:
        tried = ", ".join(f"{'with' if p.options.get('distributed_optimizer') else 'without'} "
                          f"{p.prediction['step_s']:.3f} s" for p in plans)
        best.search.setdefault("notes", []).append(f"planned with and without ZeRO-1: {tried}")
        for key in ("search_s", "predict_s", "upper_bound_s"):
            if all(key in (p.search or {}) for p in plans):
                best.search[key] = sum(p.search[key] for p in plans)
    return best


INTERLEAVE_GAIN = 0.01
"""Interleaving is kept only when the simulated step is at least this much shorter."""


def _fits(prediction) -> bool:
    return all(st.peak_bytes <= st.capacity_bytes for st in prediction.stages)


def _try_interleaving(plan: ClusterPlan, prediction, ctx: CostContext):
    """The plan with its multi-stage pipelines cut into V = 2, 3, 4 interleaved chunks per
    stage (interleaved 1F1B, which the runtime runs; torch's schedule needs the micro-batches
    in whole rounds of the stage count), when the simulator finds that at least
    INTERLEAVE_GAIN faster and every stage still within its memory (interleaving keeps more
    micro-batches in flight); else the plan as it was. Not tried when no schedule could gain that
    much: a stage works m x (forward + backward without recomputation) + reduction + optimizer
    seconds under any schedule of its blocks (interleaving only adds sends), so the slowest
    pipeline cannot end before its busiest stage does."""
    if _busiest_stage_s(plan, ctx) >= prediction.step_s * (1 - INTERLEAVE_GAIN):
        return plan, prediction
    best, best_pred = plan, prediction
    for v in (2, 3, 4):
        try:
            pipes = [interleave(p, v) if len(p.stages) > 1 and p.n_microbatches % len(p.stages) == 0 else p
                     for p in plan.pipelines]
        except ValueError:
            continue
        if all(p.virtual_stages == 1 for p in pipes):
            continue
        trial = dataclasses.replace(plan, pipelines=pipes)
        pred, _ = predict_plan(trial, ctx)
        if _fits(pred) and pred.step_s < best_pred.step_s * (1 - INTERLEAVE_GAIN):
            best, best_pred = trial, pred
    return best, best_pred


def _bound_options(search_options: SearchOptions, plan: ClusterPlan) -> SearchOptions:
    """What each kind alone may choose: every degree (pins are a choice of this plan, not of the
    bound), and interleaving when this plan interleaves (simulating interleaved 1F1B for every
    kind costs seconds on small clusters, where a step has hundreds of micro-batches)."""
    return dataclasses.replace(search_options, pins=Pins(mixed_tp=search_options.pins.mixed_tp),
                               interleave=any(p.virtual_stages > 1 for p in plan.pipelines))


def _busiest_stage_s(plan: ClusterPlan, ctx: CostContext) -> float:
    """The work of the busiest stage of the slowest pipeline, which no schedule of the same stages
    hides: a lower bound of the step under any schedule (1F1B, interleaved, zero-bubble)."""
    slowest = 0.0
    for pipe in map(fold, plan.pipelines):  # device stages, whatever the chunks
        stages = plan_stages(ctx, plan, pipe)
        busiest = max(pipe.n_microbatches * (st.fwd_s(sp.n_blocks) + st.bwd_s(sp.n_blocks, 0))
                      + st.sync_s(sp.n_blocks) + st.optim_s(sp.n_blocks) for st, sp in zip(stages, pipe.stages))
        slowest = max(slowest, busiest)
    return slowest


def _upper_bound(ctx: CostContext, model: ModelSpec, global_batch: int, search_options: SearchOptions) -> dict:
    """The sum over kinds of the tokens/s of the best plan of each kind's devices alone (same
    model and batch) with the pooled memory: the whole cluster's memory, shared evenly by that
    kind's devices. No plan of the whole cluster can beat it: a kind's share of any plan is
    work its devices could do alone, and alone with all the memory any plan may use (each of
    its devices has at least its own) they may hold the whole model and choose any split,
    recomputation and micro-batch the shared plan gives them. Each kind's plan is finished as
    the plan is (unit recomputation policies; interleaving where faster, with
    search_options.interleave, which _bound_options sets when the plan interleaves), so the bound
    has every choice the plan has. (Until 2026-12-04 each kind was planned within its own memory, which a kind
    that cannot hold the model alone made no bound at all; until 2026-12-06 with unlimited
    memory, a valid but looser bound: each kind trained as plain data parallelism, which no
    memory that plans share allows; until later that day each kind's plan was the search's
    candidate, without the recomputation policies and interleaving the plan may get.)"""
    kinds: dict[str, list[str]] = {}
    for g in ctx.cluster.groups:
        kinds.setdefault(g.kind.name, []).append(g.name)
    tokens = global_batch * ctx.seq_len
    pooled_bytes = sum(g.devices * g.kind.memory_bytes for g in ctx.cluster.groups)
    per_kind = {}
    for kind, names in kinds.items():
        sub = ctx.cluster.subcluster(names)
        per_device = pooled_bytes // sum(g.devices for g in sub.groups)
        sub = dataclasses.replace(sub, groups=[dataclasses.replace(g, kind=dataclasses.replace(
            g.kind, memory_bytes=per_device)) for g in sub.groups])
        alone = CostContext(ctx.desc, sub, ctx.options)
        cand, _ = search(alone, global_batch, search_options)
        if cand is not None:
            try:
                _, prediction, _, _ = _finish(cand, alone, model, global_batch, search_options)
            except ConfigError:  # OPT's MILP takes stages of at most OPT_MAX_BLOCKS blocks; HEU any
                _, prediction, _, _ = _finish(cand, alone, model, global_batch,
                                              dataclasses.replace(search_options, recompute="heu"))
            step_s = min(cand.step_s, prediction.step_s)
            per_kind[kind] = {"tokens_per_s": tokens / step_s, "fits": True, "step_s": step_s}
        else:
            # The kind cannot train the model alone: count what its compute could do at the
            # largest efficiency its matmul curve allows, so that the sum stays an upper bound.
            flops_per_s = sum(g.devices * g.kind.peak_flops_per_s(ctx.options.compute_dtype)
                              * curve_for(g.kind).max_efficiency for g in sub.groups)
            per_kind[kind] = {"tokens_per_s": flops_per_s / ctx.desc.train_flops_per_token(), "fits": False,
                              "step_s": None}
    return {"kinds": per_kind, "tokens_per_s": sum(v["tokens_per_s"] for v in per_kind.values())}


def repredict(plan: ClusterPlan) -> ClusterPlan:
    """The same plan with its prediction recomputed from its own data."""
    prediction, _ = predict_plan(plan)
    return dataclasses.replace(plan, prediction=prediction.to_dict())


def load_plan(path) -> ClusterPlan:
    return ClusterPlan.load(path)


def run_cluster_planning(model: ModelConfig | ModelSpec, cluster_path, global_batch: int, seq_len: int, out_dir,
                         search_options: SearchOptions = SearchOptions(), virtual_stages: int = 1,
                         options: PredictorOptions = PredictorOptions()) -> ClusterPlan:
    """Plan for the cluster file and write plan.json, report.txt and timeline.png to out_dir.

    With virtual_stages > 1 each pipeline's stages are cut into that many interleaved chunks
    (parallel_plan.interleave) and the plan is predicted again, as interleaved 1F1B."""
    cluster = load_cluster(cluster_path)
    plan = plan_cluster(model, cluster, global_batch, seq_len, options, search_options)
    if virtual_stages > 1:
        try:
            plan.pipelines = [interleave(p, virtual_stages) for p in plan.pipelines]
        except ValueError as e:
            raise ConfigError(f"--plan.virtual_stages {virtual_stages}: {e}") from None
        plan.prediction = repredict(plan).prediction
        if plan.upper_bound:  # the kinds alone may interleave too
            start = time.perf_counter()
            bound = _upper_bound(context_for(plan), _planned(model), global_batch,
                                 _bound_options(search_options, plan))
            if bound["tokens_per_s"] > plan.upper_bound["tokens_per_s"]:
                plan.upper_bound = bound
            plan.upper_bound["efficiency"] = plan.prediction["tokens_per_s"] / plan.upper_bound["tokens_per_s"]
            if plan.search is not None:
                plan.search["upper_bound_s"] = plan.search.get("upper_bound_s", 0.0) + time.perf_counter() - start
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    plan.save(os.path.join(out_dir, "plan.json"))
    with open(os.path.join(out_dir, "report.txt"), "w", encoding="utf-8") as f:
        f.write(format_report(plan) + "\n")
    write_timeline(plan, os.path.join(out_dir, "timeline.png"))
    return plan

