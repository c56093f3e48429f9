"""The byte rules of training state: what weights, gradients, masters and AdamW state occupy,
per placement and dtype, and what an update moves through memory.

One set of rules for everyone who counts: the offload engine's footprint check and host
layers (hetrain.offload), the offload planner's prices (plan/offload), the plain step
graph (predict/step_graph.py), the cluster planner (plan/cluster) and `hetrain estimate`. A
`flat` is the engine's one-tensor layout of a layer's parameters (`numel` elements,
alignment padding included); a layer has `params` parameters in `tensors` tensors. This
module only counts: it must not allocate, measure or price time.
"""

from __future__ import annotations

FP32_BYTES = 4

MASTER_BYTES_PER_PARAM = FP32_BYTES
"""fp32 master weights (the parameters themselves in plain fp32 training)."""
GRAD_BYTES_PER_PARAM = FP32_BYTES
"""fp32 gradients, or the fp32 accumulator the engine and the cluster runtime keep."""
ADAM_MOMENT_BYTES_PER_PARAM = 2 * FP32_BYTES
"""exp_avg and exp_avg_sq in fp32."""
ADAM_STEP_BYTES_PER_TENSOR = FP32_BYTES
"""fused torch.optim.AdamW keeps one fp32 step counter per parameter tensor."""

GRADIENT_BUCKET_BYTES = 25 * 2**20
"""The cluster runtime reduces gradients after the backward in buckets of about this many bytes
(hetrain.pipeline.communicator.buckets), one collective each; the cluster predictor counts them."""

# What an update moves through memory, per parameter (read + write), for pricing its time.
ADAM_TRAFFIC_BYTES_PER_PARAM = 28
"""Fused AdamW over fp32 masters reads param, grad, exp_avg, exp_avg_sq (16 bytes) and writes
param, exp_avg, exp_avg_sq (12 bytes); a compute-dtype copy written after it adds its size."""
CLIP_TRAFFIC_BYTES_PER_PARAM = 12
"""clip_grad_norm_ reads every gradient for the norm, then reads and writes it to scale it."""
ACCUMULATE_TRAFFIC_BYTES_PER_PARAM = 12
"""Accumulating into a held fp32 gradient reads it and the new one, and writes it."""


def weight_copy_traffic_bytes(compute_dtype_bytes: int) -> int:
    """Per parameter, making the step's compute-dtype copy of the fp32 weights (hetrain.precision):
    read the master, write the copy; nothing in fp32, which reads the masters themselves."""
    return 0 if compute_dtype_bytes == FP32_BYTES else FP32_BYTES + compute_dtype_bytes


def adam_state_bytes(params: int, tensors: int) -> int:
    """AdamW's state: both moments per parameter and a step counter per tensor."""
    return ADAM_MOMENT_BYTES_PER_PARAM * params + ADAM_STEP_BYTES_PER_TENSOR * tensors


def adam_traffic_bytes(params: int, compute_dtype_bytes: int = 0) -> int:
    """Bytes one AdamW update of `params` moves, with the compute-dtype copy it writes (0: none)."""
    return (ADAM_TRAFFIC_BYTES_PER_PARAM + compute_dtype_bytes) * params


def device_optimizer_bytes(numel: int, params: int, tensors: int) -> int:
    """A layer optimised on the device: its fp32 master flat and AdamW state."""
    return MASTER_BYTES_PER_PARAM * numel + adam_state_bytes(params, tensors)


def host_layer_bytes(numel: int, tensors: int, compute_dtype_bytes: int, pinned: bool,
                     world: int | None = None) -> int:
    """Host bytes of a layer optimised on the CPU (hetrain.offload's HostLayer): fp32 master,
    gradient and AdamW moments of its flat, a step counter per tensor, the compute-dtype copy
    the device reads when it is not the master (bf16), and the pinned gradient staging on a
    GPU. With `world` (data parallelism, ShardedHostLayer), one rank's share: its chunk of
    master, gradient and moments, a step counter per piece (at most one per tensor, plus one
    per chunk boundary), the full compute copy gathered from every rank's chunk, its
    compute-dtype send chunk when that is not the master, and the staging of its chunk."""
    fp32 = compute_dtype_bytes == FP32_BYTES
    per_element = MASTER_BYTES_PER_PARAM + GRAD_BYTES_PER_PARAM + ADAM_MOMENT_BYTES_PER_PARAM
    if world is None:
        compute = numel * compute_dtype_bytes
        return (per_element * numel + ADAM_STEP_BYTES_PER_TENSOR * tensors + (0 if fp32 else compute)
                + (compute if pinned else 0))
    chunk = -(-numel // world)
    compute = chunk * compute_dtype_bytes
    return (per_element * chunk + ADAM_STEP_BYTES_PER_TENSOR * (tensors + 1) + world * compute
            + (0 if fp32 else compute) + (compute if pinned else 0))


def distributed_state_bytes_per_param(compute_dtype_bytes: int, shards: int) -> float:
    """Per parameter under ZeRO-1 over `shards` data-parallel replicas, as the cluster runtime runs
    it (hetrain.pipeline.data_parallel.ShardedUpdate). In bf16 (`compute_dtype_bytes` 2): the bf16
    weights the forward reads and the fp32 gradient whole, the fp32 master and AdamW moments
    sharded. In fp32 (0 or 4: no copy): the fp32 weights (the masters, which the forward reads)
    and the gradient whole, the moments sharded."""
    if compute_dtype_bytes in (0, FP32_BYTES):
        return MASTER_BYTES_PER_PARAM + GRAD_BYTES_PER_PARAM + ADAM_MOMENT_BYTES_PER_PARAM / max(1, shards)
    return (compute_dtype_bytes + GRAD_BYTES_PER_PARAM
            + (MASTER_BYTES_PER_PARAM + ADAM_MOMENT_BYTES_PER_PARAM) / max(1, shards))


def distributed_broadcast_bytes_per_param(compute_dtype_bytes: int) -> int:
    """Per parameter, what ZeRO-1's owners broadcast after the step: the bf16 weights in bf16
    (the masters stay with their owners), the fp32 weights in fp32 (0 or 4)."""
    return MASTER_BYTES_PER_PARAM if compute_dtype_bytes in (0, FP32_BYTES) else compute_dtype_bytes


def plain_state_bytes_per_param(compute_dtype_bytes: int, weights_copy: bool) -> int:
    """Per parameter, what plain data-resident training keeps on its device between steps:
    fp32 master (the weights), fp32 gradient, AdamW moments, and, when `weights_copy`, a
    compute-dtype copy of the weights that the forward reads (hetrain.precision's, made once
    per step in bf16; the one-process trainer's memory accountant counts it among activations,
    as the tensors autograd saves)."""
    return (MASTER_BYTES_PER_PARAM + GRAD_BYTES_PER_PARAM + ADAM_MOMENT_BYTES_PER_PARAM
            + (compute_dtype_bytes if weights_copy else 0))
