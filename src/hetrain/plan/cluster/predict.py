"""Predictor for cluster plans: step time, memory per device and a timeline of one step.

A plan is a set of pipelines, each replicated `dp` times. One replica of a pipeline is
modelled stage by stage (one device of each stage stands for its TP group): forward and
backward per micro-batch from the cost model, a blocking send of the activation (forward)
or its gradient (backward) charged to the sending stage, the 1F1B schedule (warm-up
forwards, one-forward-one-backward, cool-down backwards), then the gradient reduction of
each stage (a ring over its dp replicas, plus an exchange between pipelines when the plan
has several) and its optimizer step. Peak memory per device is weights, gradients, master
weights and Adam state of the stage's layers, plus the activations of the micro-batches in
flight (1F1B keeps min(m, S - s) of them on stage s), plus one layer's working set. The
search uses `pipeline_step_s` (a direct recurrence over the schedule) and reporting uses the
discrete-event simulator on the same tasks; tests hold the two equal. This module predicts
a given plan: it must not choose anything.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from hetrain.hardware.cluster import Group, cluster_from_dict
from hetrain.errors import ConfigError
from hetrain.model.gpt import ModelConfig
from hetrain.model.spec import ModelSpec
from hetrain.plan.cluster.cost import (CostContext, Path, PredictorOptions, dp_path, pp_path, ring_allreduce_s,
                                      ring_rooted_s)
from hetrain.plan.cluster.one_f_one_b import one_f_one_b_end_s, one_f_one_b_orders
from hetrain.plan.cluster.plan import ClusterPlan, PipelinePlan, StagePlan, fold
from hetrain.predict.simulator import Task, simulate
from hetrain.predict.state_bytes import GRADIENT_BUCKET_BYTES
from hetrain.trace import TraceEvent, task_name


@dataclass(frozen=True)
class PipelineShape:
    """Which groups form a pipeline (in stage order), their TP degrees, replicas and micro-batch."""

    groups: tuple[str, ...]
    tps: tuple[int, ...]
    dp: int
    micro_batch: int


@dataclass
class StageModel:
    """One stage of one replica as the predictor sees it: per-device costs as functions of its blocks."""

    group: str
    kind: str
    tp: int
    embedding: bool
    head: bool
    block_fwd_s: float
    block_bwd_s: float
    """With its share of gradient accumulation: (m - 1) / m of one AccumulateGrad of its parameters."""
    block_recompute_s: float
    """A whole block recomputed on demand (torch's early stop: LayerDescription.early_stop_skips)."""
    fixed_fwd_s: float
    """Embedding/head forward."""
    fixed_bwd_s: float
    send_fwd_s: float
    """Sending one micro-batch's activation to the next stage (0 on the last)."""
    send_bwd_s: float
    """Sending one micro-batch's input gradient to the previous stage (0 on the first)."""
    block_state_bytes: int
    block_act_bytes: int
    block_ckpt_bytes: int
    fixed_state_bytes: int
    fixed_act_bytes: int
    workspace_bytes: int
    inflight: int
    capacity_bytes: int
    block_params: int
    fixed_params: int
    lead_params: int
    """Of fixed_params, those whose backward runs before the blocks' (the head's, on the last
    stage; a tied matrix excepted): their bucket is reduced first, behind the blocks' backward."""
    lead_bwd_s: float
    """The backward of the layer holding lead_params (the head's)."""
    block_tensors: int
    fixed_tensors: int
    lead_tensors: int
    """Parameter tensors of a block, of fixed_params and of lead_params: inside the backward each
    gradient tensor is one collective; after it, under ZeRO-1, each owner takes at least one."""
    tied_params: int
    """Of fixed_params, the tied matrix's (0 when untied): all-reduced under ZeRO-1 too, since its
    sum over the tie group needs it whole."""
    dp: int
    dp_path: Path
    n_pipelines: int
    cross_path: Path | None
    grad_bytes_per_param: int
    adam_s_per_param: float
    """AdamW, per parameter it updates (at the memory bandwidth)."""
    grad_pass_s_per_param: float
    """Clipping, per parameter. (Adding a micro-batch's gradients into the held ones is in
    block_bwd_s and fixed_bwd_s: it runs inside each backward after the step's first.)"""
    weight_copy_s_per_param: float
    """The step's compute-dtype copy of the weights (bf16; 0 in fp32), per parameter a replica
    casts: all of them, or under ZeRO-1 its share (it holds the others' bf16 weights)."""
    options: PredictorOptions
    """Whether the optimizer is distributed and the reduction overlapped (PredictorOptions)."""
    reduce_beside_compute: bool
    """The kind's collectives run beside its compute (an accelerator's library), so a reduction
    can hide behind the backward; False for CPU processes (gloo on the same cores)."""
    block_model_flops: float
    fixed_model_flops: float

    def static_bytes(self, n_blocks: int) -> int:
        return self.fixed_state_bytes + n_blocks * self.block_state_bytes + self.workspace_bytes

    def act_bytes_per_microbatch(self, n_blocks: int, n_recompute: int) -> int:
        return (self.fixed_act_bytes + (n_blocks - n_recompute) * self.block_act_bytes
                + n_recompute * self.block_ckpt_bytes)

    def peak_bytes(self, n_blocks: int, n_recompute: int) -> int:
        return self.static_bytes(n_blocks) + self.inflight * self.act_bytes_per_microbatch(n_blocks, n_recompute)

    def min_recompute(self, n_blocks: int) -> int | None:
        """Fewest blocks to recompute so the stage fits its device; None when nothing fits."""
        over = self.peak_bytes(n_blocks, 0) - self.capacity_bytes
        if over <= 0:
            return 0
        saved_per_block = self.inflight * (self.block_act_bytes - self.block_ckpt_bytes)
        if saved_per_block <= 0:
            return None
        r = -(-over // saved_per_block)
        return r if r <= n_blocks else None

    def max_blocks(self) -> int:
        """Most blocks that fit with every block recomputed."""
        room = self.capacity_bytes - self.fixed_state_bytes - self.workspace_bytes - self.inflight * self.fixed_act_bytes
        per_block = self.block_state_bytes + self.inflight * self.block_ckpt_bytes
        return max(-1, room // per_block) if room >= 0 else -1

    def fwd_s(self, n_blocks: int) -> float:
        return self.fixed_fwd_s + n_blocks * self.block_fwd_s + self.send_fwd_s

    def bwd_s(self, n_blocks: int, n_recompute: int) -> float:
        return self.fixed_bwd_s + n_blocks * self.block_bwd_s + n_recompute * self.block_recompute_s + self.send_bwd_s

    def params(self, n_blocks: int) -> int:
        return self.fixed_params + n_blocks * self.block_params

    def sync_s(self, n_blocks: int) -> float:
        """Gradient reduction after the stage's last backward ends: all of it, or with the
        reduction overlapped, what is left once each block's bucket has been reduced behind the
        backward of the blocks before it (the link takes one bucket at a time)."""
        g, opts = self.grad_bytes_per_param, self.options
        to_owners = opts.distributed_optimizer and self.cross_path is None  # ZeRO-1, one pipeline
        dp, path = self.dp, self.dp_path

        def inside(params: int, tensors: int) -> float:
            """A bucket reduced inside the backward: one collective per gradient tensor, in place."""
            if to_owners:
                return ring_rooted_s(params * g, dp, path, tensors)
            return ring_allreduce_s(params * g, dp, path, tensors)

        def after(params: int, tensors: int, tied: int) -> float:
            """Gradients reduced after the backward, in buckets of GRADIENT_BUCKET_BYTES (under ZeRO-1
            per owner; the tied matrix all-reduced)."""
            whole = tied if to_owners else params
            out = ring_allreduce_s(whole * g, dp, path, -(-whole * g // GRADIENT_BUCKET_BYTES))
            if to_owners and params > tied:
                n_bytes = (params - tied) * g
                out += ring_rooted_s(n_bytes, dp, path, min(dp, tensors) + int(n_bytes // GRADIENT_BUCKET_BYTES))
            return out

        if opts.overlap_grad_reduce and self.reduce_beside_compute and n_blocks > 0:
            # Buckets in backward order on one link: the head's (ready after its backward), each
            # block's (ready after its backward), then the rest (embedding, tied matrix) at the end.
            b, r = self.block_bwd_s, inside(self.block_params, self.block_tensors)
            lead = self.lead_bwd_s
            link_free = lead + inside(self.lead_params, self.lead_tensors)
            blocks_done = max(link_free + n_blocks * r, lead + b + n_blocks * r, lead + n_blocks * b + r)
            end = self.fixed_bwd_s + n_blocks * b
            exposed = max(blocks_done, end) + after(self.fixed_params - self.lead_params,
                                                    self.fixed_tensors - self.lead_tensors, self.tied_params) - end
        else:
            exposed = after(self.params(n_blocks), self.fixed_tensors + n_blocks * self.block_tensors, self.tied_params)
        if self.cross_path is not None:
            exposed += ring_allreduce_s(self.params(n_blocks) * g / self.dp, self.n_pipelines, self.cross_path)
        return exposed

    def optim_s(self, n_blocks: int) -> float:
        """Clipping, the weight copy and AdamW (AdamW and the copy on a 1/dp share under ZeRO-1,
        followed by the replicas' broadcasts of the weights they updated, in the compute dtype, one
        after another); accumulation is in the backwards."""
        params = self.params(n_blocks)
        own = self.adam_s_per_param + self.weight_copy_s_per_param
        if not self.options.distributed_optimizer:
            return params * (own + self.grad_pass_s_per_param)
        owners = min(self.dp, self.fixed_tensors + n_blocks * self.block_tensors)  # one broadcast each
        gather = ring_rooted_s(params * self.options.broadcast_bytes_per_param, self.dp, self.dp_path, owners)
        return params * (own / self.dp + self.grad_pass_s_per_param) + gather


def stage_lanes(p: int, stages: list[StageModel]) -> list[str]:
    """The simulator lane of each stage of pipeline p: one device of the stage's TP group."""
    return [f"P{p} S{s} {st.group} tp{st.tp}" for s, st in enumerate(stages)]


def plan_stages(ctx: CostContext, plan: ClusterPlan, pipe: PipelinePlan) -> list[StageModel]:
    """The StageModels of one of plan's pipelines (its device stages: fold an interleaved one
    first), exchanging gradients with the plan's other pipelines."""
    others = tuple(g for other in plan.pipelines for g in other.groups if g not in pipe.groups)
    return build_stages(ctx, shape_of(pipe), pipe.n_microbatches, others, len(plan.pipelines))


def stage_counts(ctx: CostContext, shape: PipelineShape) -> list[int]:
    """Stages each group of the shape contributes (its devices / (dp x tp))."""
    return [ctx.cluster.group(g).devices // (shape.dp * tp) for g, tp in zip(shape.groups, shape.tps)]


def build_stages(ctx: CostContext, shape: PipelineShape, n_microbatches: int,
                 other_groups: tuple[str, ...] = (), n_pipelines: int = 1) -> list[StageModel]:
    """The StageModels of one replica.

    `other_groups` are the groups of the plan's other pipelines and `n_pipelines` how many
    pipelines the plan has: gradients are also exchanged with those, over the slowest path.
    """
    opts = ctx.options
    groups = [ctx.cluster.group(g) for g in shape.groups]
    counts = stage_counts(ctx, shape)
    slots: list[tuple[Group, int, int]] = [(g, tp, j) for g, tp, n in zip(groups, shape.tps, counts) for j in range(n)]
    n_stages = len(slots)
    others = [ctx.cluster.group(g) for g in other_groups]
    stages = []
    for s, (group, tp, j) in enumerate(slots):
        kit = ctx.kit(group, tp, shape.micro_batch)
        mem_bw = group.kind.mem_bw_bytes_per_s * opts.memory_bw_efficiency
        # Every backward after a step's first adds its gradients into the held ones (AccumulateGrad,
        # inside that backward): priced in each backward, (m - 1) / m of one accumulation apiece.
        accumulate_s = (n_microbatches - 1) / n_microbatches * opts.accumulate_bytes_per_param / mem_bw
        first, last = s == 0, s == n_stages - 1
        send_fwd = send_bwd = 0.0
        if not last:
            nxt_group, nxt_tp, _ = slots[s + 1]
            path = pp_path(ctx, group, shape.dp, tp, j) if nxt_group is group else ctx.cross_path(group, nxt_group)
            send_fwd = path.time_s(kit.boundary_bytes * tp / min(tp, nxt_tp))
        if not first:
            prv_group, prv_tp, _ = slots[s - 1]
            path = pp_path(ctx, group, shape.dp, tp, j - 1) if prv_group is group else ctx.cross_path(group, prv_group)
            send_bwd = path.time_s(kit.boundary_bytes * tp / min(tp, prv_tp))
        fixed = [layer for layer, on in ((kit.embedding, first), (kit.head, last)) if on]
        head_params = kit.tied_head_params if (last and n_stages > 1) else 0
        fixed_params = sum(layer.params for layer in fixed) + head_params
        fixed_bwd = sum(layer.bwd_s for layer in fixed) + fixed_params * accumulate_s
        cross = None
        if others:
            cross = max((ctx.cross_path(group, o) for o in others), key=lambda p: (p.s_per_byte, p.latency_s))
        stages.append(StageModel(
            group=group.name, kind=group.kind.name, tp=tp, embedding=first, head=last,
            block_fwd_s=kit.block.fwd_s, block_bwd_s=kit.block.bwd_s + kit.block.params * accumulate_s,
            block_recompute_s=kit.block.recompute_s,
            fixed_fwd_s=sum(layer.fwd_s for layer in fixed), fixed_bwd_s=fixed_bwd,
            send_fwd_s=send_fwd, send_bwd_s=send_bwd,
            block_state_bytes=math.ceil(kit.block.params * opts.state_bytes_at(shape.dp)),
            block_act_bytes=kit.block.act_bytes, block_ckpt_bytes=kit.block.ckpt_bytes,
            fixed_state_bytes=math.ceil(fixed_params * opts.state_bytes_at(shape.dp)),
            fixed_act_bytes=sum(layer.act_bytes for layer in fixed),
            # One layer's working set in backward (a recomputed block's activations, the
            # logits' gradient on the last stage) and the send/receive buffers.
            workspace_bytes=kit.block.act_bytes + (kit.head.act_bytes if last else 0) + 2 * kit.boundary_bytes,
            inflight=min(n_microbatches, n_stages - s),
            capacity_bytes=kit.capacity_bytes,
            block_params=kit.block.params, fixed_params=fixed_params,
            lead_params=kit.head.params if last else 0,
            lead_bwd_s=kit.head.bwd_s + kit.head.params * accumulate_s if last else 0.0,
            block_tensors=ctx.desc.blocks[0].tensors,
            fixed_tensors=((ctx.desc.embedding.tensors if first else 0) + (ctx.desc.head.tensors if last else 0)
                           + (1 if head_params else 0)),
            lead_tensors=ctx.desc.head.tensors if last else 0,
            tied_params=kit.tied_head_params if (first or last) else 0,
            dp=shape.dp, dp_path=dp_path(ctx, group, shape.dp, tp, j),
            n_pipelines=n_pipelines if others else 1, cross_path=cross,
            grad_bytes_per_param=opts.grad_reduce_bytes_per_param,
            adam_s_per_param=opts.adam_bytes_per_param / mem_bw,
            grad_pass_s_per_param=(opts.optimizer_bytes_per_param - opts.adam_bytes_per_param) / mem_bw,
            weight_copy_s_per_param=opts.weight_copy_bytes_per_param / mem_bw,
            options=opts, reduce_beside_compute=group.kind.collectives_beside_compute,
            block_model_flops=kit.block.model_flops,
            fixed_model_flops=sum(layer.model_flops for layer in fixed),
        ))
    return stages


def pipeline_step_s(stages: list[StageModel], n_blocks: list[int], n_recompute: list[int], n_microbatches: int) -> float:
    """Step time of one pipeline: 1F1B, then each stage's gradient sync and optimizer step."""
    fwd = [st.fwd_s(n) for st, n in zip(stages, n_blocks)]
    bwd = [st.bwd_s(n, r) for st, n, r in zip(stages, n_blocks, n_recompute)]
    ends = one_f_one_b_end_s(fwd, bwd, n_microbatches)
    return max(e + st.sync_s(n) + st.optim_s(n) for e, st, n in zip(ends, stages, n_blocks))


# ---------------------------------------------------------------------------------------
# Full prediction of a saved plan, through the discrete-event simulator.

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


def context_for(plan: ClusterPlan) -> CostContext:
    known = {f.name for f in dataclasses.fields(PredictorOptions)}  # options since retired are ignored
    options = PredictorOptions(**{k: v for k, v in plan.options.items() if k in known})
    desc = ModelSpec.of_plan(plan).describe(plan.seq_len, dtype_bytes=options.dtype_bytes)
    return CostContext(desc, cluster_from_dict(plan.cluster), options)


def shape_of(pipe: PipelinePlan) -> PipelineShape:
    return PipelineShape(tuple(pipe.groups), tuple(pipe.tp), pipe.dp, pipe.micro_batch)


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
