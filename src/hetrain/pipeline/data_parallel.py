"""Gradients across replicas and pipelines: after it, every rank holds what one process would.

After a schedule step each rank holds its chunks' gradients for its replica's micro-batches
(their mean). `GradientSync.reduce` then makes them the gradients of the whole global batch:

1. replicas of a stage: a bucketed all-reduce over its DP group (the kind's native backend),
   scaled by share / dp, where share is the pipeline's part of the global batch (1 with one
   pipeline). It runs after the backward, as the planner prices it (not overlapped);
2. tied embeddings: the first and last stage of a lane each hold a copy of the shared matrix;
   their gradients are summed over the lane's tie group (host-staged across kinds);
3. several pipelines (as the planner emits them for several kinds): every rank holding a part
   of the model, in every pipeline, all-reduces that part's whole gradient (TP shards gathered,
   rows in the model's order) weighted by its pipeline's token share, over the part's exchange
   group, through host memory between kinds; each rank keeps its own shard of the sum.

`local_sq_norm` is this rank's share of the squared global gradient norm: the runtime sums it
over all ranks with the step's loss and clips like torch.nn.utils.clip_grad_norm_. Data
parallelism here is an all-reduce of gradients (no sharded optimizer state). This module must
not run the schedule or step the optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor, Replicate

from hetrain.model.gpt import ModelConfig
from hetrain.pipeline.communicator import Communicator, units_of
from hetrain.pipeline.stages import ModelNames
from hetrain.pipeline.tensor_parallel import full_canonical, local_from_canonical


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@dataclass
class GradientSync:
    comm: Communicator
    named: list[tuple[str, torch.nn.Parameter]]
    """Every (name, parameter) of this rank's chunks, a tied matrix under both its names."""
    names: ModelNames
    """The whole model's units and tied matrix."""
    cfg: ModelConfig
    """hetrain's GPT config, for the TP row order (unused at TP 1)."""
    share: float
    """This pipeline's part of the global batch."""

    def unique(self) -> list[torch.nn.Parameter]:
        seen, out = set(), []
        for _, p in self.named:
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    def _grads(self) -> list[torch.Tensor]:
        for p in self.unique():
            if p.grad is None:  # a part this batch did not reach still takes part in the sums
                p.grad = torch.zeros_like(p)
        return [_local(p.grad) for p in self.unique()]

    @torch.no_grad()
    def reduce(self) -> None:
        comm, place = self.comm, self.comm.place
        grads = self._grads()
        if comm.dp is not None:
            comm.reduce_sum(grads, comm.dp)
        scale = self.share / place.dp
        if scale != 1.0:
            torch._foreach_mul_(grads, scale)
        if comm.tie is not None and self.names.tied:
            tied = [_local(p.grad) for name, p in self.named if name in self.names.tied]
            comm.reduce_sum(tied[:1], comm.tie)
        if comm.exchange:
            self._exchange()

    def _exchange(self) -> None:
        """Step 3: sum each unit's whole gradient over its holders in every pipeline."""
        comm, place = self.comm, self.comm.place
        holders_per_pipeline = place.dp * place.tp  # each holds the same pipeline gradient
        by_unit: dict[str, list[tuple[str, torch.nn.Parameter]]] = {}
        for name, p in sorted(self.named, key=lambda e: e[0]):
            by_unit.setdefault(self.names.unit_of(name), []).append((name, p))
        # Every unit's contribution first: a tied matrix takes part in two units with its value
        # from before either sum.
        work = []
        for unit in units_of(place):  # model order: the same collective order on every rank
            items = by_unit.get(unit, [])
            full = [full_canonical(n, p.grad, self.cfg, place.tp) / holders_per_pipeline for n, p in items]
            work.append((unit, items, full))
        for unit, _, full in work:
            comm.reduce_sum(full, comm.exchange[unit])
        for _, items, full in work:
            for (name, p), whole in zip(items, full):
                _local(p.grad).copy_(local_from_canonical(name, whole, p.grad, self.cfg, place.tp))

    @torch.no_grad()
    def local_sq_norm(self) -> float:
        """This rank's part of the squared global norm: its TP shards, its whole tensors on TP rank
        0 only, the tied matrix once (on the embedding's stage); 0 on every replica but the first
        of the first pipeline (the others hold the same gradients)."""
        place = self.comm.place
        if place.pipeline != 0 or place.replica != 0:
            return 0.0
        total = torch.zeros((), dtype=torch.float64)
        seen = set()
        for name, p in self.named:
            if id(p) in seen or (self.names.tied and name == self.names.tied[1]):
                continue
            seen.add(id(p))
            g = p.grad
            sharded = isinstance(g, DTensor) and any(not isinstance(pl, Replicate) for pl in g.placements)
            if not sharded and place.tp_rank != 0:
                continue
            total += _local(g).double().pow(2).sum().cpu()
        return float(total)
