"""This process's place among the training processes: its device and, under torchrun, its rank.

`pick_device` chooses the device (one GPU per process under torchrun, by LOCAL_RANK);
`init_ranks` makes the process group when torchrun launched several processes (NCCL on GPUs,
gloo on CPU) and returns `Ranks`, whose few collectives the trainer uses: a barrier, the mean
of a number, and an object sent from rank 0. Everything is a no-op for one process. The
gradient and optimizer-state collectives live in the offload engine (offload/sharded.py); this
module must not grow training logic.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch

from hetrain.errors import ConfigError, RankLost
from hetrain.liveness import roll_call, roll_call_s, wait_s


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
    timeout_s: float = 300.0
    """The job's bound on any wait (run.dist_timeout_s), see hetrain.liveness."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        """Tear the process groups down once every rank is done with them (a rank that destroyed
        its gloo groups, or left them to the interpreter's exit, while another still used them
        could abort with 'terminate called without an active exception')."""
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()

    def mean(self, value: float) -> float:
        """The mean of `value` over the ranks."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        torch.distributed.all_reduce(t)
        return t.item() / self.world

    def lost(self, error: BaseException, resume_hint: str = "") -> RankLost:
        """After a collective failed on this rank (`error`): the ranks that no longer answer, by
        roll call (hetrain.liveness), as the RankLost to raise."""
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        silent = roll_call(self.rank, self.world, roll_call_s(self.timeout_s))
        if silent:
            names = ", ".join(f"rank {r}" for r in silent)
            why = f"no answer from {names} within run.dist_timeout_s={self.timeout_s:g} s: hung or dead"
        else:
            why = f"a collective failed ({first})"
        return RankLost(f"rank {self.rank}: {why}; the job stops here{resume_hint}")

    def from_main(self, obj):
        """Rank 0's `obj`, on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


def init_ranks(device: torch.device, timeout_s: float = 300.0) -> Ranks:
    """Ranks(0, 1) for one process; under torchrun the process group is made here, its waits
    bounded by hetrain.liveness.wait_s(timeout_s) (run.dist_timeout_s)."""
    if launched_world() == 1:
        return Ranks(0, 1, device, timeout_s)
    import torch.distributed as dist

    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=wait_s(timeout_s)))
    return Ranks(dist.get_rank(), dist.get_world_size(), device, timeout_s)
