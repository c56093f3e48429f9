"""A rank that hangs (SIGSTOP) or dies (SIGKILL) under torchrun ends the job within the
configured timeout, with a line naming the rank (hetrain's roll call for a hung rank; torchrun
itself usually reports a dead one first); the checkpoints written before stay loadable."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests_support import cli_args


def child_with_rank(parent: int, rank: int) -> int | None:
    """The pid of torchrun's worker with RANK=rank (from /proc), or None while it starts."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in env:
            return int(proc.name)
    return None


def logged_steps(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGSTOP, signal.SIGKILL])
def test_a_lost_rank_ends_the_job_within_the_timeout_naming_it(tmp_path, corpus, sig):
    run = tmp_path / "run"
    args = cli_args(run, corpus, **{"train.steps": 5000, "train.ckpt_every": 3, "train.eval_every": 0,
                                    "memory.device_budget": "70%", "hardware.device_kind": "cpu",
                                    "run.threads": 1, "run.dist_timeout_s": 6})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "hetrain.cli", "train", *args]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while logged_steps(run) < 4 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        victim = child_with_rank(proc.pid, 1)
        assert victim is not None and proc.poll() is None, "the job did not start"
        os.kill(victim, sig)
        lost_at = time.monotonic()
        out, err = proc.communicate(timeout=90)
        took = time.monotonic() - lost_at
    finally:
        if proc.poll() is None:
            proc.kill()
        victim = child_with_rank(proc.pid, 1)
        if victim:
            os.kill(victim, signal.SIGKILL)
    assert proc.returncode != 0
    lines = [ln for ln in err.splitlines() if ln.startswith("hetrain: error: ")]
    if sig == signal.SIGSTOP:  # hetrain's roll call names the rank that hangs
        assert lines and "no answer from rank 1 within run.dist_timeout_s=6 s" in lines[0], err[-3000:]
    else:  # a dead process: torchrun sees it first and names it, or hetrain's roll call does
        assert ("local_rank: 1" in err and "exitcode: -9" in err) or (
            lines and "no answer from rank 1" in lines[0]), err[-3000:]
    assert took < 45, f"the job took {took:.0f} s to end after rank 1 was lost"
    # The last checkpoint is loadable: resuming it in one process continues the run.
    from hetrain.train import checkpoint as ckpt

    last = ckpt.list_checkpoints(run)[-1]
    meta = ckpt.read_meta(last)
    assert meta.step >= 3 and json.loads((last / "meta.json").read_text())["plan"] is not None
