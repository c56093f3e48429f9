"""The offload engine's training state: read, written and given back by parameter name.

Whatever the plan, the state of record is the fp32 masters and their AdamW state, which live
in three kinds of place: native parameters and device masters (the engine's device optimizer),
and host layers (their own optimizers, sharded across ranks under data parallelism).
`masters` walks them in model order; `gather_state` and `load_state` read and write them in
the layout of cpu_optim.training_state (torch.distributed.checkpoint's get_state_dict), and
`give_back_model` leaves the model plain fp32 parameters on the CPU holding their values when
the engine closes. Under data parallelism each of these is collective (a sharded layer gathers
its chunks). This module touches only the state of record: it must not refresh compute copies,
wait on the worker or streams, or remove hooks; the engine does those around these calls.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn as nn

from hetrain.offload.cpu_optim import OptimConfig, copy_training_state, training_state
from hetrain.offload.layers import Layer
from hetrain.offload.sharded import DataParallel
from hetrain.offload.weights import ModelLayout


def masters(layers: list[Layer], device_optimizer: torch.optim.Optimizer | None
            ) -> Iterator[tuple[str, torch.Tensor, dict]]:
    """(fqn, fp32 master tensor, its optimizer state) for every parameter, in model order."""
    for layer in layers:
        names = [name for name, _ in layer.owned]
        if layer.native:
            yield from ((n, p, device_optimizer.state[p]) for n, p in layer.owned)
        elif layer.host is not None:
            yield from zip(names, *layer.host.full_state())
        else:
            yield from ((n, v, device_optimizer.state[v]) for n, v in zip(names, layer.dev.views))


def gather_state(layers: list[Layer], layout: ModelLayout, device_optimizer: torch.optim.Optimizer | None,
                 optim_cfg: OptimConfig, lr: float) -> dict:
    """training_state of the masters: live tensors, except a sharded layer's gathered copies."""
    return training_state(list(masters(layers, device_optimizer)), layout.aliases, optim_cfg, lr)


def load_state(layers: list[Layer], layout: ModelLayout, live: dict, state: dict, dp: DataParallel | None) -> None:
    """Copy `state` (training_state's layout) into `live` (gather_state of these layers), and
    under `dp` into the chunks of sharded layers, whose `live` tensors are gathered copies."""
    copy_training_state(live, state)
    if dp:
        key_of = {name: key for key, name in layout.aliases.items()}
        for layer in layers:
            if layer.host is not None:
                names = [name for name, _ in layer.owned]
                layer.host.load_full([state["model"][key_of[n]] for n in names],
                                     [state["optim"]["state"][n] for n in names])


def give_back_model(model: nn.Module, layers: list[Layer], layout: ModelLayout,
                    device_optimizer: torch.optim.Optimizer | None) -> None:
    """Every parameter back on the modules that held it as a CPU fp32 copy of its master, every
    buffer back on the CPU."""
    with torch.no_grad():
        values = {name: t.detach().to("cpu", copy=True) for name, t, _ in masters(layers, device_optimizer)}
        for name, p in layout.params.items():
            p.data = values[name]
            if layers[layout.owner[id(p)]].flat is not None:
                layout.give_back(p)
    for module in model.modules():
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = b.to("cpu")
