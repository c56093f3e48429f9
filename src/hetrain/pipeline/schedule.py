"""A rank's pipeline stages and schedule, on torch.distributed.pipelining, and what they measured.

`build_schedule` makes one torch PipelineStage per chunk this rank holds (shapes given up front,
so torch allocates its receive buffers without a trial run) on the rank's pipeline lane, and the
schedule the plan names, on torch's schedule runtime (hetrain.pipeline.overlap): Schedule1F1B's
order for one chunk per stage, ScheduleInterleaved1F1B's for several (virtual stages),
ScheduleGPipe's when a pipeline has fewer micro-batches than stages (1F1B needs at least one
per stage; with so few the two orders coincide), with hetrain's forward and backward actions
that recompute a micro-batch's window regions while its gradient is on its way. The loss is the
GPT's on every micro-batch of the last stage, and torch scales the gradients by 1 / micro-batches.

TracedStage is torch's PipelineStage recording, per chunk, when its forward and backward ran
and how long it waited for each activation or gradient from its neighbour, as hetrain
TraceEvents (hetrain.trace): one lane for the stage's compute, one per link. Clocks are
wall-clock seconds from a start time every rank shares. This module runs schedules; it must not
reduce gradients across replicas or step optimizers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.pipelining import PipelineStage

from hetrain.pipeline.communicator import HOST, Communicator, HostStaged
from hetrain.pipeline.overlap import WaitStats, runtime_schedule
from hetrain.pipeline.stages import StageModule, stage_example, stage_loss
from hetrain.pipeline.unit_recompute import Recomputations
from hetrain.precision import WeightCopies
from hetrain.trace import TraceEvent


@dataclass
class StageClock:
    """What one rank's chunks did: events of the traced steps and per-micro-batch compute times."""

    origin_s: float = 0.0
    """time.time() of the shared start; events are seconds after it."""
    step: int = 0
    record: bool = False
    """Record events and compute times (the traced steps: 2 .. 1 + log.trace_steps)."""
    sync_cuda: bool = False
    """Wait for the GPU at the end of each recorded forward/backward, so its time is the compute's."""
    events: list[TraceEvent] = field(default_factory=list)
    fwd_s: float = 0.0
    bwd_s: float = 0.0
    fwd_count: int = 0
    bwd_count: int = 0

    def add(self, name: str, lane: str, start: float, end: float, cat: str, **args) -> None:
        if self.record:
            if cat in ("fwd", "bwd"):
                setattr(self, f"{cat}_s", getattr(self, f"{cat}_s") + end - start)
                setattr(self, f"{cat}_count", getattr(self, f"{cat}_count") + 1)
            self.events.append(TraceEvent(name, lane, start - self.origin_s, end - self.origin_s, cat,
                                          {"step": self.step, **args}))

    def now(self) -> float:
        if self.record and self.sync_cuda:
            torch.cuda.synchronize()
        return time.time()


class TracedStage(PipelineStage):
    """torch's PipelineStage, timing its chunk's forward/backward and its waits on each link."""

    def __init__(self, *args, clock: StageClock, compute_lane: str, prev_link: str, next_link: str,
                 boundary_bytes: int, link_s_per_byte: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.clock, self.compute_lane = clock, compute_lane
        self.prev_link, self.next_link, self.boundary_bytes = prev_link, next_link, boundary_bytes
        self.link_s_per_byte = link_s_per_byte
        """Emulated link (run.emulate_link_gbytes_per_s): each send holds this stage for its bytes first."""
        self._posted: dict[tuple[str, int], float] = {}
        self.scaled_elsewhere: set[int] = set()
        """Ids of parameters whose gradients were divided already (the replicas' reduction inside the
        backward, hetrain.pipeline.data_parallel.OverlappedReduce.scaled): scale_grads skips them."""

    def scale_grads(self, grad_scale_factor: int) -> None:
        """torch's PipelineStage.scale_grads, but for the parameters in scaled_elsewhere."""
        if grad_scale_factor != 1:
            for p in self.submod.parameters():
                if p.grad is not None and id(p) not in self.scaled_elsewhere:
                    p.grad.div_(grad_scale_factor)

    def _hold(self, ops, what: str, mb: int, link: str):
        if ops and self.link_s_per_byte > 0:
            start = self.clock.now()
            time.sleep(self.boundary_bytes * self.link_s_per_byte)
            self.clock.add(f"send {what} mb{mb} (emulated link)", link, start, self.clock.now(), "comm",
                           bytes=self.boundary_bytes, chunk=self.stage_index)
        return ops

    def get_fwd_send_ops(self, fwd_chunk_id: int):
        return self._hold(super().get_fwd_send_ops(fwd_chunk_id), "act", fwd_chunk_id, self.next_link)

    def get_bwd_send_ops(self, bwd_chunk_id: int):
        return self._hold(super().get_bwd_send_ops(bwd_chunk_id), "grad", bwd_chunk_id, self.prev_link)

    def get_fwd_recv_ops(self, fwd_chunk_id: int):
        ops = super().get_fwd_recv_ops(fwd_chunk_id)
        if ops:
            self._posted["F", fwd_chunk_id] = time.time()
        return ops

    def get_bwd_recv_ops(self, bwd_chunk_id: int):
        ops = super().get_bwd_recv_ops(bwd_chunk_id)
        if ops:
            self._posted["B", bwd_chunk_id] = time.time()
        return ops

    def forward_one_chunk(self, fwd_chunk_id: int, *args, **kwargs):
        start = self.clock.now()
        posted = self._posted.pop(("F", fwd_chunk_id), None)
        if posted is not None:
            self.clock.add(f"recv act mb{fwd_chunk_id}", self.prev_link, posted, start, "comm",
                           bytes=self.boundary_bytes, chunk=self.stage_index)
        out = super().forward_one_chunk(fwd_chunk_id, *args, **kwargs)
        end = self.clock.now()
        self.clock.add(f"F{fwd_chunk_id} c{self.stage_index}", self.compute_lane, start, end, "fwd",
                       chunk=self.stage_index)
        return out

    def backward_one_chunk(self, bwd_chunk_id: int, *args, **kwargs):
        start = self.clock.now()
        posted = self._posted.pop(("B", bwd_chunk_id), None)
        if posted is not None:
            self.clock.add(f"recv grad mb{bwd_chunk_id}", self.next_link, posted, start, "comm",
                           bytes=self.boundary_bytes, chunk=self.stage_index)
        out = super().backward_one_chunk(bwd_chunk_id, *args, **kwargs)
        end = self.clock.now()
        self.clock.add(f"B{bwd_chunk_id} c{self.stage_index}", self.compute_lane, start, end, "bwd",
                       chunk=self.stage_index)
        return out


@dataclass
class PipelineRun:
    """This rank's stages and schedule; `step` trains one batch, `evaluate` only runs forward."""

    schedule: object
    stages: list[TracedStage]
    clock: StageClock
    input_device: torch.device
    name: str
    """The schedule's name, for reports."""
    ledger: Recomputations
    overlap: object
    """The schedule's forward/backward actions (hetrain.pipeline.overlap): `stats`, `close()`."""
    weights: list[WeightCopies]
    """Per chunk, the copies of its weights its computations read (hetrain.precision)."""

    @property
    def wait_stats(self) -> WaitStats:
        return self.overlap.stats

    def close(self) -> None:
        self.overlap.close()

    @property
    def holds_last(self) -> bool:
        return any(s.is_last for s in self.stages)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """Forward and backward of this replica's batch (B, T); the losses of its micro-batches on
        the rank holding the last chunk, [] elsewhere. Gradients accumulate in .grad, scaled by
        1 / micro-batches."""
        losses: list[torch.Tensor] = []
        try:
            self.schedule.step(x.to(self.input_device), target=y.to(self.input_device), losses=losses,
                               return_outputs=False)
        finally:
            self._release()  # before the optimizer changes the masters
        return losses

    def _release(self) -> None:
        for w in self.weights:
            w.release()

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        losses: list[torch.Tensor] = []
        for stage in self.stages:
            stage.submod.eval()  # no dropout
        self._release()
        try:
            self.schedule.eval(x.to(self.input_device), target=y.to(self.input_device), losses=losses,
                               return_outputs=False)
        finally:
            self._release()  # copies made without autograd
            for stage in self.stages:
                stage.submod.train()
        return losses


def build_schedule(chunks: list[StageModule], comm: Communicator, model_dims: tuple[int, int], seq_len: int,
                   clock: StageClock, ledger: Recomputations, emulate_link_gbytes_per_s: float = 0.0,
                   dtype: torch.dtype | None = None) -> PipelineRun:
    """Stages for this rank's chunks on its lane, and the plan's schedule. model_dims = (d_model,
    vocab); dtype: the compute dtype of mixed precision (hetrain.precision; None: fp32), in which
    the chunks read their weights and pass activations between them."""
    place = comm.place
    d_model, vocab = model_dims
    n_chunks = place.n_stages * place.virtual_stages
    lane_device = comm.lane_device
    stages = []
    boundary_dtype = dtype or torch.float32
    compute_lane = f"rank {place.rank} P{place.pipeline}r{place.replica} S{place.stage} tp{place.tp_rank}"
    for module, chunk in zip(chunks, place.chunks):
        runnable: nn.Module = module
        if comm.lane.route == HOST:
            runnable = HostStaged(module, comm.device, stage_out=not chunk.head)
        x, out = stage_example(chunk, place.micro_batch, seq_len, d_model, vocab, lane_device, boundary_dtype)
        prev_stage = (chunk.index - 1) % place.n_stages
        next_stage = (chunk.index + 1) % place.n_stages
        stages.append(TracedStage(
            runnable, chunk.index, n_chunks, lane_device, input_args=x, output_args=out, group=comm.lane.group,
            clock=clock, compute_lane=compute_lane,
            prev_link=comm.link_name(prev_stage), next_link=comm.link_name(next_stage),
            boundary_bytes=place.micro_batch * seq_len * d_model * boundary_dtype.itemsize,
            link_s_per_byte=1e-9 / emulate_link_gbytes_per_s if emulate_link_gbytes_per_s > 0 else 0.0))
    group_ranks = [dist.get_group_rank(comm.lane.group, r) for r in comm.lane.ranks]  # by stage position
    weights = [WeightCopies(module, dtype) for module in chunks]
    schedule, overlap, name = runtime_schedule(stages, place.n_microbatches, stage_loss, ledger, clock, compute_lane,
                                               group_ranks, {c.index: w for c, w in zip(place.chunks, weights)})
    return PipelineRun(schedule, stages, clock, lane_device, name, ledger, overlap, weights)
