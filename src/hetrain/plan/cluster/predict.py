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
search uses `pipeline_step_s` (a direct recurrence over the schedule); a plan's report uses the
discrete-event simulator on the same tasks (plan_prediction.py); tests hold the two equal. This
module models stages: it must not choose anything.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from hetrain.hardware.cluster import Group, cluster_from_dict
from hetrain.model.spec import ModelSpec
from hetrain.plan.cluster.cost import (CostContext, Path, PredictorOptions, dp_path, pp_path, ring_allreduce_s,
                                      ring_rooted_s)
from hetrain.plan.cluster.one_f_one_b import one_f_one_b_end_s
from hetrain.plan.cluster.plan import ClusterPlan, PipelinePlan
from hetrain.predict.state_bytes import GRADIENT_BUCKET_BYTES


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


def context_for(plan: ClusterPlan) -> CostContext:
    known = {f.name for f in dataclasses.fields(PredictorOptions)}  # options since retired are ignored
    options = PredictorOptions(**{k: v for k, v in plan.options.items() if k in known})
    desc = ModelSpec.of_plan(plan).describe(plan.seq_len, dtype_bytes=options.dtype_bytes)
    return CostContext(desc, cluster_from_dict(plan.cluster), options)


def shape_of(pipe: PipelinePlan) -> PipelineShape:
    return PipelineShape(tuple(pipe.groups), tuple(pipe.tp), pipe.dp, pipe.micro_batch)
