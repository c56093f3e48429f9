"""The static footprint of an OffloadPlan on a model, checked before the engine places anything.

`check_weight_buffers` refuses a plan with too few weight buffers for the streamed flats one
layer reads at once; `check_footprint` counts the bytes the plan holds for good (device:
buffers, native parameters, fp32 masters, Adam state, resident compute copies and weight
buffers, before any activation; host: masters, Adam state and weight stores), refuses a plan
over its device budget or over the host RAM available, and returns the device figure (the
engine's `static_device_bytes`, which must equal what its ledger then counts). Both run on
the model as given, before placement, so a refused plan leaves it untouched: nothing here may
allocate, move or modify a tensor. The planner prices the same bytes (plan/offload/graph.py);
a change here must be made there too.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from hetrain.hardware.probe import probe
from hetrain.offload.checkpointing import DeviceBudgetError
from hetrain.offload.layers import Layer
from hetrain.offload.sharded import DataParallel
from hetrain.offload.weights import ModelLayout, flat_layout
from hetrain.plan.offload.plan import OffloadPlan
from hetrain.predict.state_bytes import device_optimizer_bytes, host_layer_bytes
from hetrain.units import fmt_bytes


def check_weight_buffers(plan: OffloadPlan, layout: ModelLayout, layers: list[Layer]) -> None:
    """Raise ValueError if some layer reads more streamed flats at once than
    `plan.weight_buffers` (the head of a model with tied embeddings reads the embedding's)."""
    streamed = {l.index for l in layers if l.plan.weights == "host"}
    need = max(len({layout.owner[pid] for pid, *_ in layout.read_by(l.index)} & streamed) for l in layers)
    if need > plan.weight_buffers:
        raise ValueError(f"plan.weight_buffers={plan.weight_buffers} is too few: the head of a model with tied "
                         f"embeddings reads the streamed embedding matrix too, so it needs {need} buffers at "
                         f"once; set weight_buffers >= {need + plan.prefetch_depth}")


def check_footprint(model: nn.Module, plan: OffloadPlan, layers: list[Layer], dtype: torch.dtype,
                    device: torch.device, dp: DataParallel | None) -> int:
    """The device bytes `plan` holds on `device` before any activation, for `model` (fp32, not
    yet placed) resolved into the engine's `layers` with compute dtype `dtype`; host bytes are
    one rank's under `dp`. Raises DeviceBudgetError over plan.device_budget_bytes and
    ValueError over the host RAM available now."""
    cuda = device.type == "cuda"
    device_bytes, host_bytes, largest = sum(b.nbytes for b in model.buffers()), 0, 0
    for layer in layers:
        numel, tensors = flat_layout(layer.owned)[1], len(layer.owned)
        params = sum(p.numel() for _, p in layer.owned)
        compute_bytes = numel * dtype.itemsize
        if layer.native:
            device_bytes += device_optimizer_bytes(params, params, tensors)
        elif layer.plan.optim == "device":
            device_bytes += device_optimizer_bytes(numel, params, tensors)
            host_bytes += compute_bytes if layer.plan.weights == "host" else 0
        else:
            host_bytes += host_layer_bytes(numel, tensors, dtype.itemsize, cuda, dp.world if dp else None)
        if not layer.native and layer.plan.weights == "device":
            device_bytes += compute_bytes
        if layer.plan.weights == "host":
            largest = max(largest, compute_bytes)
    static_device_bytes = device_bytes + plan.weight_buffers * largest
    budget = plan.device_budget_bytes
    if budget is not None and static_device_bytes > budget:
        raise DeviceBudgetError(f"the plan keeps {fmt_bytes(static_device_bytes)} on {device} before any "
                                f"activation (weights, fp32 masters and Adam state on the device, weight buffers), "
                                f"over its device budget of {fmt_bytes(budget)}; plan again for this budget "
                                f"(hetrain plan)")
    have = probe().host_ram_available_bytes
    if host_bytes > have:
        raise ValueError(f"the plan keeps {fmt_bytes(host_bytes)} in host memory (masters, Adam state, weight "
                         f"stores) but {fmt_bytes(have)} is available; keep more layers on the device")
    return static_device_bytes
