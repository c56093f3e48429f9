"""The prediction of a saved cluster plan, through the discrete-event simulator.

Each pipeline's replica becomes tasks per stage in 1F1B order (or interleaved 1F1B,
interleaved.py), with the stage models of predict.py: forwards and sends, backwards with their
recomputation, then each stage's gradient reduction and optimizer step; activations allocate
on their stage's memory pool. The simulator gives the step, each stage's peak memory and a
timeline; `PlanPrediction` adds per-kind throughput and where the devices' time goes. This
module predicts a given plan: it must not choose anything.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from hetrain.errors import ConfigError
from hetrain.model.gpt import ModelConfig
from hetrain.plan.cluster.cost import CostContext
from hetrain.plan.cluster.one_f_one_b import one_f_one_b_orders
from hetrain.plan.cluster.plan import ClusterPlan, PipelinePlan, StagePlan, fold
from hetrain.plan.cluster.predict import StageModel, context_for, plan_stages, stage_lanes
from hetrain.predict.simulator import Task, simulate
from hetrain.trace import TraceEvent, task_name


@dataclass
class StagePrediction:
    pipeline: int
    stage: int
    group: str
    kind: str
    tp: int
    dp: int
    n_blocks: int
    n_recompute_blocks: int
    fwd_s: float
    """Per micro-batch, including the send to the next stage."""
    bwd_s: float
    """Per micro-batch, including recomputation and the send to the previous stage."""
    sync_s: float
    optim_s: float
    peak_bytes: int
    capacity_bytes: int
    recompute_ahead_s: float = 0.0
    """Per micro-batch, recomputation of a unit policy run ahead of the backward (in bwd_s too)."""
    recompute_demand_s: float = 0.0
    """Per micro-batch, recomputation of a unit policy inside the backward (in bwd_s too)."""


@dataclass
class KindPrediction:
    kind: str
    devices: int
    idle_devices: int
    model_tflops_per_device: float
    """Useful model FLOP/s (no recomputation) per busy device, in TFLOP/s."""
    mfu: float
    """model_tflops_per_device over the kind's dense peak."""
    peak_bytes: int
    capacity_bytes: int


@dataclass
class PlanPrediction:
    step_s: float
    tokens_per_s: float
    model_tflops_per_s: float
    pipeline_step_s: list[float]
    stages: list[StagePrediction] = field(default_factory=list)
    kinds: dict[str, KindPrediction] = field(default_factory=dict)
    device_s: dict[str, float] = field(default_factory=dict)
    """Where the devices' time goes: device-seconds of one step by what the device does (the
    simulator's categories, TIME_USES), summed over every device of the cluster; "idle" is the rest of
    step_s x devices (pipeline fill and drain, waits for a slower stage or pipeline, idle groups)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


TIME_USES = {"fwd": "forward", "bwd": "backward", "recompute": "recomputation", "comm": "pipeline sends",
             "sync": "gradient reduction after the backward", "optim": "optimizer step", "idle": "idle"}
"""The categories of PlanPrediction.device_s, and how the report names them. Forward and backward
include their tensor-parallel all-reduces, the backward its gradient accumulation."""


def _pipeline_tasks(p: int, stages: list[StageModel], plans: list[StagePlan], m: int,
                    recompute: list | None = None) -> tuple[list[Task], dict]:
    """Tasks of one replica: per stage a chain in 1F1B order; activations allocate on their stage's pool.

    `recompute[s]`, for a stage with a unit policy, is (ahead s, on-demand s, freed bytes, held bytes)
    per micro-batch (hetrain.plan.cluster.recompute_split.stage_recompute): the ahead part is a task before
    the backward that does not wait for the gradient and holds its bytes until the backward ends;
    without it the backward holds them (collective regions) while it runs."""
    tasks: list[Task] = []
    lanes = stage_lanes(p, stages)
    base = {lane: st.static_bytes(sp.n_blocks) for lane, st, sp in zip(lanes, stages, plans)}
    done_f: dict[tuple[int, int], str] = {}  # (stage, mb) -> task the next stage waits for
    done_b: dict[tuple[int, int], str] = {}
    last_on: dict[int, str] = {}

    def add(s: int, name: tuple, dur: float, deps: list[str], cat: str, **kw) -> str:
        phase, mb = name
        full = task_name(phase, "", mb, stage=s, step=None) + f" @P{p}"  # unique across pipelines
        chain = [last_on[s]] if s in last_on else []
        tasks.append(Task(full, lanes[s], dur, tuple(chain + deps), cat=cat, **kw))
        last_on[s] = full
        return full

    orders = one_f_one_b_orders(len(stages), m)
    positions = [0] * len(stages)
    remaining = sum(len(o) for o in orders)
    while remaining:  # emit in a dependency-respecting order so deps always exist already
        for s, st in enumerate(stages):
            sp = plans[s]
            ahead_s, demand_s, freed, held = (recompute[s] if recompute and recompute[s] else (0.0, 0.0, 0, 0))
            act = {lanes[s]: st.act_bytes_per_microbatch(sp.n_blocks, sp.n_recompute_blocks) - freed}
            while positions[s] < len(orders[s]):
                fwd, i = orders[s][positions[s]]
                if fwd:
                    if s > 0 and (s - 1, i) not in done_f:
                        break
                    dep = [done_f[(s - 1, i)]] if s > 0 else []
                    name = add(s, ("fwd", i), st.fwd_s(sp.n_blocks) - st.send_fwd_s, dep, "fwd", alloc=act)
                    if st.send_fwd_s > 0:
                        name = add(s, ("send_fwd", i), st.send_fwd_s, [], "comm")
                    done_f[(s, i)] = name
                else:
                    if s < len(stages) - 1 and (s + 1, i) not in done_b:
                        break
                    dep = [done_b[(s + 1, i)]] if s < len(stages) - 1 else []
                    if ahead_s > 0:
                        add(s, ("recompute ahead", i), ahead_s, [], "recompute", alloc={lanes[s]: held})
                    if sp.n_recompute_blocks:
                        add(s, ("recompute", i), sp.n_recompute_blocks * st.block_recompute_s, dep, "recompute")
                        dep = []
                    compute = st.bwd_s(sp.n_blocks, 0) - st.send_bwd_s + demand_s
                    # held: restored ahead (allocated by the task above), or only the collective
                    # regions a backward restores for the block before the one it runs
                    inside = {} if ahead_s > 0 else {lanes[s]: held}
                    free = {lanes[s]: act[lanes[s]] + held}
                    name = add(s, ("bwd", i), compute, dep, "bwd", alloc=inside, free=free)
                    if st.send_bwd_s > 0:
                        name = add(s, ("send_bwd", i), st.send_bwd_s, [], "comm")
                    done_b[(s, i)] = name
                positions[s] += 1
                remaining -= 1
    for s, (st, sp) in enumerate(zip(stages, plans)):
        if st.sync_s(sp.n_blocks) > 0:
            add(s, ("allreduce", None), st.sync_s(sp.n_blocks), [], "sync")
        add(s, ("optim", None), st.optim_s(sp.n_blocks), [], "optim")
    return tasks, base


def _unit_recompute(ctx: CostContext, stages: list[StageModel], pipe: PipelinePlan) -> list:
    """Per stage, (ahead s, on-demand s, freed bytes, held bytes) of its unit policy, or None."""
    from hetrain.plan.cluster.recompute_plan import block_policies
    from hetrain.plan.cluster.recompute_split import stage_recompute

    out = []
    for s, (st, sp) in enumerate(zip(stages, pipe.stages)):
        if not sp.recompute:
            out.append(None)
            continue
        if not isinstance(ctx.desc.config, ModelConfig):
            raise ConfigError(f"pipeline stage {s} has recompute units, which apply to hetrain's own models; a "
                              f"transformers model recomputes whole blocks (n_recompute_blocks): re-plan it")
        policies = block_policies(sp.recompute, sp.first_block, sp.n_blocks, sp.n_recompute_blocks)
        out.append(stage_recompute(ctx, st, pipe.micro_batch, policies, last=s == len(stages) - 1))
    return out


def predict_plan(plan: ClusterPlan, ctx: CostContext | None = None) -> tuple[PlanPrediction, list[TraceEvent]]:
    """Simulate every pipeline of the plan; the step ends when the slowest pipeline's optimizer does."""
    ctx = ctx or context_for(plan)
    opts = ctx.options
    events: list[TraceEvent] = []
    stage_preds: list[StagePrediction] = []
    pipe_steps: list[float] = []
    flops_by_kind: dict[str, float] = {}
    busy_by_kind: dict[str, int] = {}
    peak_by_kind: dict[str, tuple[int, int]] = {}
    busy_s: dict[str, float] = {}  # device-seconds by category
    for p, chunked in enumerate(plan.pipelines):
        pipe = fold(chunked)  # device stages (the chunks of each summed, for interleaved pipelines)
        stages = plan_stages(ctx, plan, pipe)
        if chunked.virtual_stages > 1:
            from hetrain.plan.cluster.interleaved import interleaved_tasks

            tasks, base = interleaved_tasks(p, stages, chunked.stages, pipe.n_microbatches)
            recompute = [None] * len(stages)  # unit policies of chunks are not priced (whole blocks are)
        else:
            recompute = _unit_recompute(ctx, stages, pipe)
            tasks, base = _pipeline_tasks(p, stages, pipe.stages, pipe.n_microbatches, recompute)
        result = simulate(tasks, base_bytes=base)
        pipe_steps.append(result.step_s)
        events.extend(result.events)
        lanes = stage_lanes(p, stages)
        devices_on = {lane: pipe.dp * st.tp for lane, st in zip(lanes, stages)}
        for e in result.events:
            busy_s[e.cat] = busy_s.get(e.cat, 0.0) + e.dur_s * devices_on[e.lane]
        for s, (st, sp, lane) in enumerate(zip(stages, pipe.stages, lanes)):
            peak = result.peak_bytes[lane]
            ahead_s, demand_s = recompute[s][:2] if recompute[s] else (0.0, 0.0)
            stage_preds.append(StagePrediction(
                p, s, st.group, st.kind, st.tp, pipe.dp, sp.n_blocks, sp.n_recompute_blocks,
                st.fwd_s(sp.n_blocks), st.bwd_s(sp.n_blocks, sp.n_recompute_blocks) + ahead_s + demand_s,
                st.sync_s(sp.n_blocks), st.optim_s(sp.n_blocks), peak, st.capacity_bytes,
                recompute_ahead_s=ahead_s, recompute_demand_s=demand_s))
            samples = pipe.dp * pipe.n_microbatches
            flops = samples * (sp.n_blocks * st.block_model_flops + st.fixed_model_flops)
            flops_by_kind[st.kind] = flops_by_kind.get(st.kind, 0.0) + flops
            busy_by_kind[st.kind] = busy_by_kind.get(st.kind, 0) + pipe.dp * st.tp
            old = peak_by_kind.get(st.kind, (0, st.capacity_bytes))
            peak_by_kind[st.kind] = max(old, (peak, st.capacity_bytes), key=lambda x: x[0] / x[1])
    step_s = max(pipe_steps)
    devices_by_kind: dict[str, int] = {}
    kind_of = {g.kind.name: g.kind for g in ctx.cluster.groups}
    for g in ctx.cluster.groups:
        devices_by_kind[g.kind.name] = devices_by_kind.get(g.kind.name, 0) + g.devices
    kinds = {}
    for kind, total in devices_by_kind.items():
        busy = busy_by_kind.get(kind, 0)
        per_device = flops_by_kind.get(kind, 0.0) / step_s / busy if busy else 0.0
        peak_flops = kind_of[kind].peak_flops_per_s(opts.compute_dtype)
        peak, cap = peak_by_kind.get(kind, (0, 0))
        kinds[kind] = KindPrediction(kind, busy, total - busy, per_device / 1e12, per_device / peak_flops, peak, cap)
    tokens = plan.global_batch * plan.seq_len
    total_flops = sum(flops_by_kind.values())
    device_s = {cat: busy_s.get(cat, 0.0) for cat in TIME_USES if cat != "idle"}
    unknown = set(busy_s) - set(device_s)
    if unknown:
        raise ValueError(f"simulator categories {sorted(unknown)} missing from TIME_USES")
    device_s["idle"] = step_s * sum(devices_by_kind.values()) - sum(device_s.values())
    prediction = PlanPrediction(step_s, tokens / step_s, total_flops / step_s / 1e12, pipe_steps, stage_preds, kinds,
                                device_s)
    if not math.isfinite(step_s):
        raise ValueError("plan predicts a non-finite step time")
    return prediction, events
