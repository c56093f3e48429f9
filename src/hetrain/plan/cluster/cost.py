"""Cost model of the cluster planner: what a layer costs on a device kind, and what links cost.

Compute is the one roofline every planner uses (hetrain.predict.roofline: each matmul on the
kind's matmul curve, attention as its own kernel, element-wise work at the memory
bandwidth), so the cluster planner and the offload planner price one device alike. Tensor
parallelism (Megatron style, with sequence parallelism) divides the matmuls, the attention
heads and the saved activations by the degree and adds two all-reduces of the block's output
per block in the forward and two in the backward.
Links are alpha-beta: a message of n bytes takes latency + n / (bandwidth x
link_efficiency); a ring all-reduce over k ranks moves 2(k-1)/k of the bytes over its
slowest edge with 2(k-1) latencies. Traffic between groups uses a declared direct link,
otherwise it is relayed through host memory (device to host, network, host to device, one
after the other). This module prices single operations; it must not schedule them (the
pipeline predictor does) nor choose anything (the search does).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from hetrain.hardware.cluster import Cluster, Group
from hetrain.model.describe import LayerDescription, ModelDescription
from hetrain.predict.roofline import Efficiency, LayerSeconds, MatmulCurve, layer_seconds
from hetrain.predict.state_bytes import (ACCUMULATE_TRAFFIC_BYTES_PER_PARAM, ADAM_TRAFFIC_BYTES_PER_PARAM,
                                         CLIP_TRAFFIC_BYTES_PER_PARAM, GRAD_BYTES_PER_PARAM,
                                         distributed_broadcast_bytes_per_param, distributed_state_bytes_per_param,
                                         plain_state_bytes_per_param,
                                         weight_copy_traffic_bytes)


@dataclass(frozen=True)
class PredictorOptions:
    """Efficiency factors and accounting rules of the cluster predictor (saved with each plan)."""

    compute_dtype: str = "bf16"
    """Dtype whose catalog peak bounds compute (bf16 falls back to fp16 on kinds without it)."""
    memory_bw_efficiency: float = Efficiency.memory
    """Fraction of the memory bandwidth that memory-bound kernels and the optimizer reach
    (predict/roofline.Efficiency's, as every planner)."""
    link_efficiency: float = Efficiency.network
    """Fraction of a link's nominal bandwidth that collectives and point-to-point reach
    (predict/roofline.Efficiency's, as every planner)."""
    grad_reduce_bytes_per_param: int = GRAD_BYTES_PER_PARAM
    """Gradients are reduced across data-parallel replicas in fp32."""
    optimizer_bytes_per_param: int = ADAM_TRAFFIC_BYTES_PER_PARAM + CLIP_TRAFFIC_BYTES_PER_PARAM
    """Bytes the step's tail moves per parameter: AdamW (grad, master, moments in; master, moments
    out) and the gradient clipping before it (predict/state_bytes.py)."""
    adam_bytes_per_param: int = ADAM_TRAFFIC_BYTES_PER_PARAM
    """Of optimizer_bytes_per_param, AdamW's (what ZeRO-1 shares among the replicas)."""
    accumulate_bytes_per_param: int = ACCUMULATE_TRAFFIC_BYTES_PER_PARAM
    """Bytes each micro-batch after a step's first moves per parameter, adding its gradient into
    the held one (predict/state_bytes.py)."""
    memory_reserve_fraction: float = 0.08
    """Device memory kept free for the runtime, communication buffers and fragmentation."""
    host_staging_latency_s: float = 20e-6
    """Extra latency of relaying a message through host memory (two copies and a handoff)."""
    max_micro_batch: int = 16
    """Largest micro-batch the search tries (powers of two up to it)."""
    distributed_optimizer: bool = False
    """ZeRO-1: each of a stage's parameters is updated by one of its dp replicas, which alone holds
    its AdamW moments and, in bf16, its fp32 master (the others hold its bf16 weights); with one
    pipeline each gradient is reduced to its owner (a ring reduce per tensor inside the backward,
    per owner and bucket after it; the tied matrix and plans of several pipelines all-reduce),
    and each replica then broadcasts the weights it updated, in the compute dtype (a ring
    broadcast per owner, one after another). The runtime runs it (hetrain.pipeline.data_parallel);
    --plan.distributed_optimizer true."""
    overlap_grad_reduce: bool = True
    """Each block's gradients are reduced as soon as the stage's last backward of that block ends
    (one bucket per block, as DDP and Megatron overlap them), instead of after the whole
    backward; the runtime does so (hetrain.pipeline.data_parallel.OverlappedReduce).
    --plan.overlap_grad_reduce false prices and runs the reduction after the backward."""
    matmul_curves: dict = field(default_factory=dict)
    """Measured matmul curves by kind name, [max_efficiency, overhead_s, attention_efficiency,
    source] (from profiles made on those kinds: hetrain.predict.profile_store.measured_curves); a
    kind without one takes the catalog's or the default curve (predict/roofline.py)."""

    @property
    def dtype_bytes(self) -> int:
        """Bytes of an activation in the compute dtype (the model description's unit)."""
        return 4 if self.compute_dtype == "fp32" else 2

    @property
    def weight_copy_bytes_per_param(self) -> int:
        """Bytes each step's compute-dtype copy of the weights moves per parameter it casts
        (hetrain.precision; every replica casts all of them, or under ZeRO-1 its share): 0 in fp32."""
        return weight_copy_traffic_bytes(self.dtype_bytes)

    def to_dict(self) -> dict:
        return dict(self.__dict__)

    def state_bytes_at(self, dp: int) -> float:
        """Bytes a device keeps per parameter of its stage between steps, with `dp` replicas: fp32
        master 4 + fp32 gradient 4 + Adam moments 8, and 2 for the bf16 copy of the weights the
        forward reads (none in fp32, which reads the fp32 weights themselves); under ZeRO-1 the
        moments, and in bf16 the masters, are sharded over the replicas (predict/state_bytes.py)."""
        copy = self.weight_copy_dtype_bytes
        if self.distributed_optimizer:
            return distributed_state_bytes_per_param(copy, dp)
        return plain_state_bytes_per_param(copy, weights_copy=copy > 0)

    @property
    def weight_copy_dtype_bytes(self) -> int:
        """Bytes per parameter of the compute-dtype copy of the weights (0 in fp32: none)."""
        return 0 if self.compute_dtype == "fp32" else self.dtype_bytes

    @property
    def broadcast_bytes_per_param(self) -> int:
        """Bytes per parameter ZeRO-1's owners broadcast after the step (predict/state_bytes.py)."""
        return distributed_broadcast_bytes_per_param(self.weight_copy_dtype_bytes)


@dataclass(frozen=True)
class LayerCosts:
    """One layer on one device of a tensor-parallel group, for one micro-batch."""

    fwd_s: float
    bwd_s: float
    recompute_s: float
    """The layer recomputed whole (torch's early stop: LayerDescription.early_stop_skips), with the
    forward all-reduces it reruns."""
    seconds: LayerSeconds
    """The shared roofline's terms, without communication (its matmuls and attention: the unit
    model's step times, hetrain.plan.cluster.recompute_units.stage_steps)."""
    params: int
    """Parameters one device holds."""
    act_bytes: int
    """Bytes one device saves for backward."""
    ckpt_bytes: int
    """Bytes one device keeps instead when the layer is recomputed (its input)."""
    model_flops: float
    """Useful forward+backward FLOPs of the whole layer (all TP ranks), for MFU."""


@dataclass(frozen=True)
class Path:
    """A point-to-point path: a message of n bytes takes latency_s + n * s_per_byte."""

    s_per_byte: float
    latency_s: float

    def time_s(self, n_bytes: float) -> float:
        return self.latency_s + n_bytes * self.s_per_byte if n_bytes > 0 else 0.0


def ring_all_gather_s(n_bytes: float, n_ranks: int, path: Path) -> float:
    """Ring all-gather of n_bytes in all (n_bytes / n_ranks from each rank): half a ring all-reduce."""
    if n_ranks <= 1 or n_bytes <= 0:
        return 0.0
    return (n_ranks - 1) * (path.latency_s + n_bytes / n_ranks * path.s_per_byte)


def ring_rooted_s(n_bytes: float, n_ranks: int, path: Path, n_roots: int = 1) -> float:
    """n_roots rooted ring collectives (a reduce onto a root, or a broadcast from one) over n_ranks,
    moving n_bytes in all: each pipelines its message around the ring, so every rank sends about
    n_bytes once (an all-reduce sends twice (n_ranks - 1) / n_ranks of it), and each pays the
    ring's latency."""
    if n_ranks <= 1 or n_bytes <= 0:
        return 0.0
    return max(1, n_roots) * (n_ranks - 1) * path.latency_s + n_bytes * path.s_per_byte


def ring_allreduce_s(n_bytes: float, n_ranks: int, path: Path, n_ops: int = 1) -> float:
    """Ring all-reduce of n_bytes per rank over n_ranks whose slowest edge is `path`, sent as n_ops
    collectives (each pays the ring's latency)."""
    if n_ranks <= 1 or n_bytes <= 0:
        return 0.0
    return 2 * (n_ranks - 1) * (max(1, n_ops) * path.latency_s + n_bytes / n_ranks * path.s_per_byte)


@dataclass(frozen=True)
class StageKit:
    """Costs of every layer type on one device of `group` at TP degree `tp` and one micro-batch size."""

    group: Group
    tp: int
    micro_batch: int
    block: LayerCosts
    embedding: LayerCosts
    head: LayerCosts
    tied_head_params: int
    """Parameters the last stage also holds when embeddings are tied and the pipeline has >1 stage."""
    boundary_bytes: int
    """Bytes one device sends to the next stage per micro-batch (the activation, split over TP)."""
    capacity_bytes: int
    """Device memory a plan may use."""


@dataclass
class CostContext:
    """Everything the costs depend on besides the plan; caches StageKits for the search."""

    desc: ModelDescription
    """Description at micro_batch=1; activation bytes scale linearly with the micro-batch."""
    cluster: Cluster
    options: PredictorOptions
    kits: dict = field(default_factory=dict)

    @property
    def n_blocks(self) -> int:
        return len(self.desc.blocks)

    @property
    def seq_len(self) -> int:
        return self.desc.seq_len

    def desc_at(self, micro_batch: int) -> ModelDescription:
        """The description's batch figures at `micro_batch` (activation bytes scale with it)."""
        return dataclasses.replace(self.desc, micro_batch=micro_batch)

    def kit(self, group: Group, tp: int, micro_batch: int) -> StageKit:
        key = (group.name, tp, micro_batch)
        if key not in self.kits:
            self.kits[key] = _make_kit(self, group, tp, micro_batch)
        return self.kits[key]

    def intra_path(self, group: Group) -> Path:
        return Path(1.0 / (group.intra_node_bytes_per_s * self.options.link_efficiency),
                    group.intra_node_latency_s)

    def inter_path(self, group: Group, sharing_devices: float) -> Path:
        """Between nodes of one group, when `sharing_devices` of a node send at once."""
        bw = group.inter_node_bytes_per_s / max(sharing_devices, 1.0) * self.options.link_efficiency
        return Path(1.0 / min(bw, group.intra_node_bytes_per_s * self.options.link_efficiency),
                    group.inter_node_latency_s)

    def cross_path(self, a: Group, b: Group) -> Path:
        """From a device of group a to one of group b: a declared link; the network when both
        are of one kind (its own collective library spans them); else relayed via host memory."""
        eff = self.options.link_efficiency
        link = self.cluster.link_between(a.name, b.name)
        if link is not None:
            per_device = link.bytes_per_s / max(a.devices_per_node, b.devices_per_node)
            return Path(1.0 / (per_device * eff), link.latency_s)
        net = min(a.inter_node_bytes_per_s / a.devices_per_node, b.inter_node_bytes_per_s / b.devices_per_node)
        if a.kind.name == b.kind.name:
            return Path(1.0 / (net * eff), max(a.inter_node_latency_s, b.inter_node_latency_s))
        s_per_byte = (1.0 / a.kind.host_link_bytes_per_s + 1.0 / net + 1.0 / b.kind.host_link_bytes_per_s) / eff
        latency_s = max(a.inter_node_latency_s, b.inter_node_latency_s) + self.options.host_staging_latency_s
        return Path(s_per_byte, latency_s)


def _layer_costs(ctx: CostContext, layer: LayerDescription, group: Group, tp: int, micro_batch: int,
                 comm_s: tuple[float, float, float]) -> LayerCosts:
    """The shared roofline's times of `layer` (predict/roofline.layer_seconds) on one of `tp`
    devices, plus `comm_s` = (forward, backward, recomputation) tensor-parallel communication."""
    opts = ctx.options
    desc = ctx.desc_at(micro_batch)
    scaled = dataclasses.replace(layer, act_bytes={k: v * micro_batch for k, v in layer.act_bytes.items()})
    eff = Efficiency(memory=opts.memory_bw_efficiency, network=opts.link_efficiency)
    # In bf16 the layers read the step's one bf16 copy of the weights (hetrain.precision), made
    # once per step and priced with the optimizer (PredictorOptions.weight_copy_bytes_per_param).
    measured = opts.matmul_curves.get(group.kind.name)
    curve = MatmulCurve(*measured) if measured else None
    seconds = layer_seconds(desc, scaled, group.kind, opts.compute_dtype, eff, curve, tp=tp)
    return LayerCosts(
        fwd_s=seconds.fwd_s + comm_s[0],
        bwd_s=seconds.bwd_s + comm_s[1],
        recompute_s=seconds.recompute_s + comm_s[2],
        seconds=seconds,
        params=-(-layer.params // tp),
        act_bytes=layer.act_bytes_total * micro_batch // tp,
        ckpt_bytes=ctx.desc.embedding.boundary_bytes * micro_batch // tp,
        model_flops=(layer.fwd_flops_per_token + layer.bwd_flops_per_token) * micro_batch * ctx.seq_len,
    )


def _make_kit(ctx: CostContext, group: Group, tp: int, micro_batch: int) -> StageKit:
    desc = ctx.desc
    boundary_bytes = desc.embedding.boundary_bytes * micro_batch
    # Megatron TP: the attention and MLP outputs are all-reduced in forward (g), the inputs'
    # gradients in backward (f); inside one node over its fast links.
    tp_allreduce_s = ring_allreduce_s(boundary_bytes, tp, ctx.intra_path(group))
    tied = desc.tied_embeddings
    return StageKit(
        group=group, tp=tp, micro_batch=micro_batch,
        # A block recomputed whole reruns proj's all-reduce, and down's unless early stop skips down.
        block=_layer_costs(ctx, desc.blocks[0], group, tp, micro_batch,
                           (2 * tp_allreduce_s, 2 * tp_allreduce_s,
                            (1 if desc.blocks[0].early_stop_skips else 2) * tp_allreduce_s)),
        # Vocabulary-parallel embedding: its output is all-reduced; the head's input gradient too.
        embedding=_layer_costs(ctx, desc.embedding, group, tp, micro_batch, (tp_allreduce_s, 0.0, 0.0)),
        head=_layer_costs(ctx, desc.head, group, tp, micro_batch, (0.0, tp_allreduce_s, 0.0)),
        tied_head_params=-(-desc.vocab_size * desc.hidden_size // tp) if tied else 0,
        boundary_bytes=boundary_bytes // tp,
        capacity_bytes=int(group.kind.memory_bytes * (1.0 - ctx.options.memory_reserve_fraction)),
    )


# ---------------------------------------------------------------------------------------
# Placement inside a group. A group's devices are numbered node by node. A pipeline that
# uses `stages` stages of the group, replicated `dp` times at TP degree `tp`, puts local
# stage j, replica r, TP rank k on device (j * dp + r) * tp + k: TP ranks are adjacent (one
# node, since tp divides devices_per_node), then the data-parallel replicas of a stage
# (Megatron's tp-dp-pp order), so gradient rings stay inside a node when they can.

def _nodes_spanned(first: int, count: int, per_node: int) -> int:
    return (first + count - 1) // per_node - first // per_node + 1


def dp_path(ctx: CostContext, group: Group, dp: int, tp: int, local_stage: int) -> Path:
    """Slowest edge of the gradient ring of one stage's `dp` replicas."""
    dpn = group.devices_per_node
    first = local_stage * dp * tp
    if _nodes_spanned(first, dp * tp, dpn) == 1:
        return ctx.intra_path(group)
    # Ring members per node: the fewest in any node the ring touches. Each ring crossing a
    # node boundary uses one share of that node's network, shared by the node's rings.
    head = (dpn - first % dpn) // tp
    tail = ((first + dp * tp - 1) % dpn + 1) // tp
    members = max(1, min(head, tail, dpn // tp))
    return ctx.inter_path(group, dpn / members)


def pp_path(ctx: CostContext, group: Group, dp: int, tp: int, local_stage: int) -> Path:
    """From local stage j to j+1 of the same group (the slowest replica's pair)."""
    dpn = group.devices_per_node
    if _nodes_spanned(local_stage * dp * tp, 2 * dp * tp, dpn) == 1:
        return ctx.intra_path(group)
    return ctx.inter_path(group, dpn)  # every device of the node may be sending at once
