"""This process's place among the training processes: its device and, under torchrun, its rank.

`pick_device` chooses the device (one GPU per process under torchrun, by LOCAL_RANK);
`init_ranks` makes the process group when torchrun launched several processes (NCCL on GPUs,
gloo on CPU) and returns `Ranks`, whose few collectives the trainer uses: a barrier, the mean
of a number, and an object sent from rank 0. Everything is a no-op for one process. The
gradient and optimizer-state collectives live in the offload engine (offload/sharded.py); this
module must not grow training logic.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from hetrain.errors import ConfigError


def launched_world() -> int:
    """How many processes torchrun launched (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def processes_on_this_node() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device is 'cuda' but torch sees no CUDA device; use --run.device cpu "
                          "or install a CUDA build of torch (README)")
    if name == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device(name)


@dataclass(frozen=True)
class Ranks:
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def mean(self, value: float) -> float:
        """The mean of `value` over the ranks."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        torch.distributed.all_reduce(t)
        return t.item() / self.world

    def from_main(self, obj):
        """Rank 0's `obj`, on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


def init_ranks(device: torch.device) -> Ranks:
    """Ranks(0, 1) for one process; under torchrun the process group is made here."""
    if launched_world() == 1:
        return Ranks(0, 1, device)
    import torch.distributed as dist

    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Ranks(dist.get_rank(), dist.get_world_size(), device)
