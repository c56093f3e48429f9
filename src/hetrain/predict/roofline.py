"""What a layer costs on a device kind from its datasheet: one roofline for every planner.

A layer's forward is a sequence of kernels, each bound by compute or by memory, so its time is
the sum of: its matmuls, each priced by the kind's matmul curve; its attention, a fused kernel
at its own efficiency; and its element-wise work (norms, activations, residual adds: the
tensors it saves and its input and output, read and written) at the memory bandwidth; plus a
fixed launch cost. The backward runs two matmuls of each forward shape (the input's and the
weight's gradients), the attention backward, and twice the element-wise traffic.

The matmul curve: a GEMM of F FLOPs takes F / (peak x max_efficiency) + overhead_s, so small
GEMMs pay a fixed cost (launch, ramp-up, tile and wave quantisation) and large ones approach
max_efficiency of the peak; its efficiency rises with the GEMM's size, and a model's predicted
MFU with the model's width. The catalog gives each kind's figures (with their sources), or
defaults by class of device; `hetrain profile` measures the curve of the machine it runs on.

Tensor parallelism of degree tp divides every matmul's output (column-parallel) or input
(row-parallel) dimension, the attention heads and, with sequence parallelism, the element-wise
tensors, by tp. Used by `RooflineCost` (predict/cost.py) and the cluster planner
(plan/cluster/cost.py). This module prices; it must not measure, schedule or choose.
"""

from __future__ import annotations

from dataclasses import dataclass

from hetrain.hardware.catalog import DeviceKind
from hetrain.model.describe import LayerDescription, ModelDescription
from hetrain.predict.state_bytes import FP32_BYTES


@dataclass(frozen=True)
class Efficiency:
    """Fractions of a datasheet peak that eager PyTorch training reaches, and fixed costs."""

    memory: float = 0.75
    """Element-wise kernels (norms, activations, AdamW) reach ~70-80% of the memory bandwidth."""
    host_link: float = 0.8
    """Pinned host<->device copies reach ~80% of the PCIe/NVLink-C2C per-direction peak."""
    pageable: float = 0.5
    """Pageable copies are staged through a pinned bounce buffer: about half the pinned rate."""
    network: float = 0.7
    """Collectives and point-to-point reach ~70% of a link's bandwidth at large messages."""
    layer_launch_s: float = 20e-6
    """Per layer and pass, the element-wise kernels' launches (the matmul curve has its own)."""
    collective_latency_s: float = 20e-6
    """Per ring hop."""
    optimizer_call_s: float = 100e-6
    """Python and launch overhead of one optimizer.step() or clip_grad_norm_ call."""


@dataclass(frozen=True)
class MatmulCurve:
    """A kind's GEMM time: flops / (peak x max_efficiency) + overhead_s."""

    max_efficiency: float
    """Of the dense peak, for GEMMs large enough that the fixed cost vanishes."""
    overhead_s: float
    """Fixed cost of one GEMM (launch, ramp-up, quantisation of the last tile and wave)."""
    attention_efficiency: float
    """Of the dense peak, for the fused attention kernel (forward; the backward likewise)."""
    source: str = ""

    def gemm_s(self, flops: float, peak_flops_per_s: float) -> float:
        return flops / (peak_flops_per_s * self.max_efficiency) + self.overhead_s

    def efficiency(self, flops: float, peak_flops_per_s: float) -> float:
        """What one GEMM of `flops` reaches, as a fraction of the peak."""
        return flops / peak_flops_per_s / self.gemm_s(flops, peak_flops_per_s)


# Defaults by class of device where the catalog gives no curve for a kind. GPUs: 80% of the
# dense peak for large GEMMs (an 8192^3 bf16 matmul ran at 769-798 TFLOP/s of an H200's 990 in
# this workplace, 2026-10-28 and 2026-11-04) and 8 us of fixed cost per GEMM (a kernel launch
# and ramp-up of a few microseconds, plus tile and wave quantisation; an estimate until a GPU
# profile measures it); fused attention at half the peak (FlashAttention-2's published range on
# A100 and H100 is 50-73% forward, 35-60% backward). CPUs: the catalog's CPU peak is a
# placeholder; its profile measures the real curve.
GPU_CURVE = MatmulCurve(0.80, 8e-6, 0.50, "default for GPUs (predict/roofline.py)")
CPU_CURVE = MatmulCurve(0.70, 2e-6, 0.40, "default for CPUs (predict/roofline.py)")


def curve_for(kind: DeviceKind, measured: dict | None = None, dtype: str = "bf16") -> MatmulCurve:
    """The kind's matmul curve: from a profile's measured line (`measured`, Profile.matmul, made
    on a device of this kind), else from the catalog, else the default for its class of device."""
    default = CPU_CURVE if kind.name == "cpu" or kind.vendor == "generic" else GPU_CURVE
    if measured is not None:
        peak = kind.peak_flops_per_s(dtype)
        max_efficiency = min(1.0, 1.0 / (measured["s_per_flop"] * peak))
        return MatmulCurve(max_efficiency, measured["overhead_s"], default.attention_efficiency,
                           source=f"measured ({measured['dtype']} GEMMs of a {kind.name} profile)")
    if kind.matmul_curve is not None:
        return MatmulCurve(*kind.matmul_curve, source=f"catalog {kind.name}")
    return default


@dataclass(frozen=True)
class LayerSeconds:
    fwd_s: float
    bwd_s: float
    recompute_s: float
    """The layer recomputed whole: its forward less the matmuls torch's early stop skips."""
    gemm_s: tuple[float, ...] = ()
    """Of fwd_s, each matmul of LayerDescription.gemms."""
    attention_s: float = 0.0
    """Of fwd_s, the attention kernel; the rest is elementwise traffic and launches."""


def _attention_flops_per_token(layer: LayerDescription) -> float:
    """The forward FLOPs per token that are not the layer's matmuls: causal attention."""
    return max(0.0, layer.fwd_flops_per_token - 2.0 * sum(k * n for k, n in layer.gemms))


def layer_seconds(desc: ModelDescription, layer: LayerDescription, kind: DeviceKind, dtype: str,
                  eff: Efficiency, curve: MatmulCurve | None = None, tp: int = 1) -> LayerSeconds:
    """Forward and backward of `layer` for one micro-batch of `desc` on one of `tp`
    tensor-parallel devices of `kind` (see the module docstring)."""
    curve = curve or curve_for(kind)
    peak = kind.peak_flops_per_s(dtype)
    bandwidth = kind.mem_bw_bytes_per_s * eff.memory
    tokens = desc.tokens_per_microbatch
    gemm_each = [curve.gemm_s(2.0 * tokens * k * n / tp, peak) for k, n in layer.gemms]
    gemm_fwd = sum(gemm_each)
    attention = _attention_flops_per_token(layer) * tokens / tp / (peak * curve.attention_efficiency)
    io_bytes = tokens * desc.hidden_size * desc.compute_dtype_bytes
    weights = layer.matmul_params * desc.compute_dtype_bytes / tp
    if layer.name == "embedding":  # a lookup reads only the rows of the batch's tokens
        weights = io_bytes
    # The weights are read in the compute dtype: the engine streams them so, and the other
    # runtimes cast them once per step (hetrain.precision; priced with the step, not here).
    elementwise = (layer.act_bytes_total / tp + 2 * io_bytes / tp) / bandwidth
    weight_read = weights / bandwidth if not layer.gemms else 0.0  # a GEMM's own reads are in its curve
    fwd = gemm_fwd + attention + elementwise + weight_read + eff.layer_launch_s
    grads = 2 * FP32_BYTES * layer.params / tp / bandwidth  # fp32 gradients read-modify-written
    bwd = 2 * gemm_fwd + 2 * attention + 2 * elementwise + weight_read + grads + 2 * eff.layer_launch_s
    skipped = sum(gemm_each[len(gemm_each) - len(layer.early_stop_gemms):])
    return LayerSeconds(fwd, bwd, fwd - skipped, tuple(gemm_each), attention)
