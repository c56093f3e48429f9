"""The process groups of a cluster plan, and the path each pair of ranks talks over.

Per pair of ranks the route is the plan's device kinds': inside one kind, the kind's native
backend (gloo for CPUs, NCCL for CUDA; RCCL behind torch's nccl name on ROCm; HCCL named,
untested); between kinds, host staging: device -> pinned host buffer -> gloo -> host buffer ->
device. `Communicator.create` starts torch.distributed (one backend per device type:
"cpu:gloo,cuda:nccl" when any rank has a GPU, plain gloo otherwise, with the configured
timeout) and makes every group the runtime needs, the same way on every rank (torch requires
all ranks to create groups in one order):

- a pipeline lane per (pipeline, replica, TP rank): the stages in order, for torch's
  PipelineStage. torch's PipelineStage keeps all of a stage's receive buffers and its warm-up
  handshake on one device, so a lane that crosses kinds runs all its boundaries host-staged
  (HostStaged moves a stage's input to its device and its output to host memory inside
  autograd, so gradients take the same path back); a lane within one kind keeps activations
  on the device and sends them over the native backend;
- TP groups (a stage's TP ranks) and DP groups (a stage's replicas): within one kind, native;
- tie groups (first and last stage of a lane, for tied embeddings) and, with several pipelines,
  exchange groups (every rank holding a part of the model across pipelines): routed as above;
- `control`: gloo over all ranks for the per-step scalars and checkpoints.

When a collective fails or times out, hetrain.liveness.roll_call names the ranks that stopped
answering, through torchrun's rendezvous store rather than the failed groups.

`reduce_sum` is the one collective the gradient code calls: a bucketed all-reduce that stages
through host memory on a host route. This module must not know about models or schedules.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn

from hetrain.liveness import wait_s
from hetrain.pipeline.placement import Layout, Place
from hetrain.predict.state_bytes import GRADIENT_BUCKET_BYTES

NATIVE, HOST = "native", "host"


@dataclass(frozen=True)
class Link:
    """A group and how its traffic travels."""

    group: dist.ProcessGroup
    ranks: tuple[int, ...]
    route: str
    """NATIVE (the kind's backend, tensors stay on the device) or HOST (gloo through host memory)."""

    @property
    def size(self) -> int:
        return len(self.ranks)


@dataclass
class Communicator:
    layout: Layout
    place: Place
    device: torch.device
    """Where this rank computes."""
    lane: Link
    tp: Link | None
    dp: Link | None
    tie: Link | None
    control: dist.ProcessGroup
    exchange: dict[str, Link] = field(default_factory=dict)
    """Model unit ('embedding', 'block.3', 'head') -> group of every rank holding it, across pipelines."""

    @property
    def lane_device(self) -> torch.device:
        """Where this rank's pipeline boundaries live: its device on a native lane, host memory otherwise."""
        return self.device if self.lane.route == NATIVE else torch.device("cpu")

    def link_name(self, peer_stage: int) -> str:
        """The trace lane of the link between this rank's stage and `peer_stage` of its lane."""
        a, b = sorted((self.place.stage, peer_stage))
        p = self.place
        return f"link P{p.pipeline}r{p.replica}t{p.tp_rank} S{a}-S{b} ({self.lane.route})"

    @classmethod
    def create(cls, layout: Layout, rank: int, device: torch.device, timeout_s: float) -> "Communicator":
        if not dist.is_initialized():
            any_gpu = any(p.device_type != "cpu" for p in layout.places)
            backend = "cpu:gloo,cuda:nccl" if any_gpu else "gloo"
            # Three quarters of the bound for any wait, the last quarter for the roll call.
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=wait_s(timeout_s)))
        wait = datetime.timedelta(seconds=wait_s(timeout_s))  # new groups do not inherit it
        place = layout.places[rank]
        control = dist.new_group(backend="gloo", timeout=wait)
        made: dict[str, Link | None] = {"lane": None, "tp": None, "dp": None, "tie": None}
        exchange: dict[str, Link] = {}
        links: dict[tuple[str, tuple[int, ...]], Link] = {}
        for what, ranks, unit in _all_groups(layout):
            if (what, ranks) not in links:  # every rank creates every group, in this one order
                links[what, ranks] = _new_link(layout, ranks, wait)
            link = links[what, ranks]
            if rank in ranks:
                if what == "exchange":
                    exchange[unit] = link
                else:
                    made[what] = link
        return cls(layout, place, device, made["lane"], made["tp"], made["dp"], made["tie"], control, exchange)

    def reduce_sum(self, tensors: list[torch.Tensor], link: Link) -> None:
        """All-reduce (sum) `tensors` in place over `link`, in buckets; host-staged on a host route."""
        for bucket in buckets(tensors):
            _reduce_bucket(bucket, link)

    def sum_scalars(self, values: list[float]) -> list[float]:
        """The sum over all ranks of a few numbers (fp64, over the control group)."""
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, group=self.control)
        return t.tolist()


def _route(layout: Layout, ranks: tuple[int, ...]) -> str:
    return NATIVE if len({layout.places[r].kind for r in ranks}) == 1 else HOST


def _new_link(layout: Layout, ranks: tuple[int, ...], timeout: datetime.timedelta) -> Link:
    route = _route(layout, ranks)
    backend = layout.places[ranks[0]].backend if route == NATIVE else "gloo"
    return Link(dist.new_group(list(ranks), backend=backend, timeout=timeout), ranks, route)


def units_of(place: Place) -> list[str]:
    """The model units a rank holds, in model order: 'embedding', 'block.i', 'head'."""
    units = []
    for c in place.chunks:
        if c.embedding:
            units.append("embedding")
        units.extend(f"block.{i}" for i in range(c.first_block, c.first_block + c.n_blocks))
        if c.head:
            units.append("head")
    return units


def _all_groups(layout: Layout):
    """(what, ranks, unit) of every group a rank may need, in one order on every rank; a rank
    set may come several times (the caller makes one group of it per `what`)."""
    for place in layout.places:  # rank order
        lane = layout.pipeline_lane(place)
        yield "lane", tuple(lane), ""
        if place.tp > 1:
            yield "tp", tuple(layout.tp_ranks(place)), ""
        if place.dp > 1:
            yield "dp", tuple(layout.dp_ranks(place)), ""
        if place.n_stages > 1 and lane[0] != lane[-1]:
            yield "tie", (lane[0], lane[-1]), ""
    if layout.n_pipelines > 1:
        holders: dict[str, list[int]] = {}
        for place in layout.places:
            for unit in units_of(place):
                holders.setdefault(unit, []).append(place.rank)
        for unit, ranks in holders.items():  # one group per holder set; several units may share it
            yield "exchange", tuple(ranks), unit


def buckets(tensors: list[torch.Tensor]):
    """`tensors` in consecutive groups of about GRADIENT_BUCKET_BYTES (what one collective sends)."""
    bucket: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        bucket.append(t)
        size += t.numel() * t.element_size()
        if size >= GRADIENT_BUCKET_BYTES:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


def flatten(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One new 1-D tensor holding `tensors` one after another (what a bucketed collective sends)."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten_into(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    """Copy `flat` (as `flatten(tensors)` laid it out) back into `tensors`."""
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def _reduce_bucket(tensors: list[torch.Tensor], link: Link) -> None:
    flat = flatten(tensors)
    if link.route == HOST:  # device -> (pinned) host -> gloo -> host -> device
        staged = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=flat.is_cuda)
        staged.copy_(flat)
        dist.all_reduce(staged, group=link.group)
        flat.copy_(staged)
    else:
        dist.all_reduce(flat, group=link.group)
    unflatten_into(flat, tensors)


def _to_host(t: torch.Tensor) -> torch.Tensor:
    staged = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
    return staged.copy_(t)  # autograd carries the gradient back to t's device


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device=device).copy_(t, non_blocking=t.is_pinned())


class HostStaged(nn.Module):
    """A stage module whose pipeline boundaries are in host memory: its input is copied to its
    device first and its output (unless it is the logits) to a host buffer last, inside autograd."""

    def __init__(self, module: nn.Module, device: torch.device, stage_out: bool):
        super().__init__()
        self.module, self.device, self.stage_out = module, device, stage_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.module(_to_device(x, self.device))
        return _to_host(out) if self.stage_out else out


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))
