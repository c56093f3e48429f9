"""The offload engine's per-layer records: an OffloadPlan resolved against a model.

The engine's layers are the embedding (0), each block (1 to n) and the head with the final
norm (n + 1), one per entry of plan.layers. `resolve_layers` gives each the parameters it owns
(a parameter belongs to the layer of its first holder, so a tied matrix is the embedding's),
whether it is native (fp32 compute with weights and optimizer on the device: plain device
parameters, no extra work) and whether it recomputes its activations. The engine fills the
rest of each Layer as it places the weights (engine.py), and footprint.py and state.py read
them. Resolving only reads the model: nothing here may allocate, move or modify a tensor, so
a plan refused afterwards leaves the model untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from hetrain.offload.cpu_optim import HostLayer
from hetrain.offload.weights import DeviceMaster, FlatWeights, ModelLayout
from hetrain.plan.offload.plan import LayerPlan, OffloadPlan


@dataclass
class Layer:
    index: int
    plan: LayerPlan
    owned: list[tuple[str, nn.Parameter]]
    """(fqn, parameter) this layer owns, in model.named_parameters() order."""
    native: bool
    recompute: bool
    flat: FlatWeights | None = None
    host: HostLayer | None = None
    dev: DeviceMaster | None = None
    bindings: tuple = ()
    reads: tuple = ()
    """Flats this layer's compute reads: its own and borrowed ones (a tied embedding)."""
    streamed: tuple = ()
    grads_seen: int = 0

    @property
    def name(self) -> str:
        return self.plan.name


def resolve_layers(model: nn.Module, plan: OffloadPlan, compute_dtype: torch.dtype) -> tuple[ModelLayout, list[Layer]]:
    """The layout of `model` by engine layer (the block interface's `part_of`: embedding,
    blocks, head), and one Layer per entry of `plan.layers` (already validated against the model)."""
    layout = ModelLayout(model, model.part_of)
    native = compute_dtype == torch.float32
    return layout, [Layer(i, lp, layout.owned(i), native and lp.weights == "device" and lp.optim == "device",
                          lp.act == "recompute") for i, lp in enumerate(plan.layers)]
