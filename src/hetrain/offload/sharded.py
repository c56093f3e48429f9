"""Data parallelism for the offload engine: gradients averaged across ranks, host optimizer
state sharded.

Under torch.distributed every rank runs the same plan on its own micro-batches. Gradients are
averaged with all-reduce on the engine's process group (NCCL on GPUs, gloo on CPU): a managed
layer's flat gradient as each micro-batch's backward produces it, the device-resident
parameters' gradients once, before the step. A host-optimised layer is then sharded: its flat
is cut into `world` equal chunks and rank r keeps only chunk r of the fp32 master, the gradient
accumulator and the AdamW state, and updates only that chunk; the updated compute-dtype chunks
are all-gathered into the full copy the device reads. The gathers run on the CPU optimizer
worker over a gloo group of their own, so they never interleave with the main thread's
collectives; ranks issue them in the same order because the engine queues every host update
at once, lowest layer first, after backward (see OffloadEngine._update).

A parameter may straddle chunks: each rank's optimizer steps 1-D pieces of parameters, with
weight decay where the whole parameter gets it, which is the same elementwise arithmetic as
AdamW over the whole parameter. The global gradient norm adds each rank's partial squared
norms per parameter (one all-reduce of a short vector), so clipping sees what one process
would compute, to rounding.
"""

from __future__ import annotations

import datetime

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hetrain.offload.cpu_optim import HostLayer, OptimConfig, make_adamw
from hetrain.offload.weights import FlatWeights, host_empty


@dataclass
class DataParallel:
    """The ranks the engine trains with: `group` for the main thread's all-reduces, and
    `host_group` (gloo) for the worker's gathers of host tensors."""

    group: dist.ProcessGroup
    host_group: dist.ProcessGroup
    world: int
    rank: int

    @classmethod
    def create(cls, group: dist.ProcessGroup | None = None, timeout_s: float | None = None) -> "DataParallel":
        """From an initialised torch.distributed (collective: every rank must call it); the
        worker's group waits `timeout_s` per collective (None: torch's default)."""
        if not dist.is_initialized():
            raise ValueError("data parallelism needs torch.distributed initialised (torchrun, then "
                             "dist.init_process_group)")
        group = group or dist.group.WORLD
        ranks = dist.get_process_group_ranks(group)
        timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
        return cls(group, dist.new_group(ranks, backend="gloo", timeout=timeout), dist.get_world_size(group),
                   dist.get_rank(group))

    def average_(self, t: torch.Tensor) -> None:
        """In place: the mean of `t` over the ranks."""
        dist.all_reduce(t, group=self.group)
        t.div_(self.world)


def chunk_size(numel: int, world: int) -> int:
    return math.ceil(numel / world)


class ShardedHostLayer(HostLayer):
    """A HostLayer keeping chunk `rank` of `world` of the layer's flat (see the module doc)."""

    def __init__(self, index: int, flat: FlatWeights, values: list[torch.Tensor], cfg: OptimConfig,
                 pin: bool, dp: DataParallel, trace: Callable | None = None):
        self.index, self.flat, self.trace, self.dp = index, flat, trace, dp
        self.chunk = chunk_size(flat.numel, dp.world)
        self.lo = dp.rank * self.chunk
        self.hi = min(flat.numel, self.lo + self.chunk)
        self.master = host_empty(self.chunk, torch.float32, pin)
        self.grad = host_empty(self.chunk, torch.float32, pin)
        # (slot, start, stop within the parameter, start within the chunk) for each parameter
        # with elements in [lo, hi)
        self.pieces = []
        for j, s in enumerate(flat.slots):
            a, b = max(self.lo, s.offset), min(self.hi, s.offset + s.numel)
            if a < b:
                self.pieces.append((j, a - s.offset, b - s.offset, a - self.lo))
        self.master_views = [self.master[c:c + b - a] for _, a, b, c in self.pieces]
        self.grad_views = [self.grad[c:c + b - a] for _, a, b, c in self.pieces]
        with torch.no_grad():
            for view, (j, a, b, _) in zip(self.master_views, self.pieces):
                view.copy_(values[j].reshape(-1)[a:b])
        for view, grad in zip(self.master_views, self.grad_views):
            view.grad = grad
        self.optimizer = make_adamw(self.master_views, cfg, [len(flat.slots[j].shape) >= 2 for j, *_ in self.pieces])
        self.gathered = host_empty(dp.world * self.chunk, flat.dtype, pin)
        self.upload = self.gathered[:flat.numel]
        self.send = self.master if flat.dtype == torch.float32 else host_empty(self.chunk, flat.dtype, pin)
        self._publish()
        if flat.streamed:
            flat.host_store = self.upload
        self.staging = host_empty(self.chunk, flat.dtype, pin) if pin else None
        self._init_events()

    def _own(self, g: torch.Tensor) -> torch.Tensor:
        return g[self.lo:self.hi]

    def _norms(self) -> list[torch.Tensor]:
        """Per parameter, this rank's partial squared norm (zero where it holds none of it)."""
        sq = [torch.zeros((), dtype=torch.float32) for _ in self.flat.slots]
        for (j, *_), g in zip(self.pieces, self.grad_views):
            sq[j] = sq[j] + torch.dot(g, g)
        return sq

    def _publish(self) -> None:
        if self.send is not self.master:
            self.send.copy_(self.master)
        chunks = list(self.gathered.split(self.chunk))
        dist.all_gather(chunks, self.send, group=self.dp.host_group)

    # --- state ---------------------------------------------------------------------------
    def _gather(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The full flat (fp32) from each rank's pieces."""
        mine = torch.zeros(self.chunk, dtype=torch.float32)
        for (_, a, b, c), t in zip(self.pieces, parts):
            mine[c:c + b - a] = t
        full = torch.empty(self.dp.world * self.chunk, dtype=torch.float32)
        dist.all_gather(list(full.split(self.chunk)), mine, group=self.dp.host_group)
        return full

    def full_state(self) -> tuple[list[torch.Tensor], list[dict]]:
        """Whole parameters gathered from every rank (copies; collective over the ranks)."""
        states = [self.optimizer.state[v] for v in self.master_views]
        flats = {"master": self._gather(self.master_views)}
        for key in ("exp_avg", "exp_avg_sq"):
            flats[key] = self._gather([st[key] for st in states])
        step = states[0]["step"].clone() if states else torch.zeros((), dtype=torch.float32)
        masters, entries = [], []
        for s in self.flat.slots:
            view = {k: f[s.offset:s.offset + s.numel].view(s.shape) for k, f in flats.items()}
            masters.append(view.pop("master"))
            entries.append({"step": step.clone(), **view})
        return masters, entries

    def load_full(self, masters: list[torch.Tensor], states: list[dict]) -> None:
        with torch.no_grad():
            for view, (j, a, b, _) in zip(self.master_views, self.pieces):
                view.copy_(masters[j].reshape(-1)[a:b])
                for k, t in self.optimizer.state[view].items():
                    t.copy_(states[j][k] if k == "step" else states[j][k].reshape(-1)[a:b])
