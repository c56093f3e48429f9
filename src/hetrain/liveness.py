"""Which ranks of a torchrun job still answer, and how a job's time bound is split.

Every distributed runtime of hetrain (data parallelism through the offload engine, the
cluster runtime) bounds each wait by `run.dist_timeout_s`: its process groups wait
`wait_s(total)` (three quarters), and when a collective fails or times out the rank asks, with
`roll_call`, which ranks still answer, for at most `roll_call_s(total)` (the last quarter), so
the job ends within the bound with a message naming the ranks that hung or died. The roll
call goes through torchrun's rendezvous store, outside the process groups that failed, so it
works for hung and dead ranks alike and across nodes. This module must not know about models,
plans or training.
"""

from __future__ import annotations

import datetime
import os
import time

import torch.distributed as dist


def wait_s(total_s: float) -> float:
    """The process groups' timeout within a job bound of `total_s`."""
    return 0.75 * total_s


def roll_call_s(total_s: float) -> float:
    """How long a roll call may take within a job bound of `total_s`."""
    return 0.25 * total_s


def roll_call(rank: int, world: int, timeout_s: float) -> list[int] | None:
    """After a failure: the ranks that do not check in within `timeout_s` (hung or dead).

    Every rank that is still alive writes its name into torch's rendezvous store (the TCPStore
    torchrun serves at MASTER_ADDR:MASTER_PORT) and waits for the others. None when no store
    can be reached (not launched by torchrun)."""
    try:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                              timeout=datetime.timedelta(seconds=max(timeout_s, 1.0)))
    except (KeyError, ValueError, RuntimeError):
        return None
    prefix = (f"hetrain/alive/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/"
              f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/")
    store.set(prefix + str(rank), "1")
    deadline = time.monotonic() + timeout_s
    while True:
        missing = [r for r in range(world) if not store.check([prefix + str(r)])]
        if not missing or time.monotonic() > deadline:
            return missing
        time.sleep(0.1)
