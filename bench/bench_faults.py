"""Fault injection: does a run killed at random moments, then resumed, train the same model?

1. A reference: `hetrain train` of a tiny model under the CPU's default offload plan (budget
   'auto'), checkpointing every step, without interruption; its per-step losses and final
   weights.
2. The same run in another folder, killed with SIGKILL --kills times at random moments of
   training (after a randomly drawn step of those still to run, plus 0-30 ms, so kills land
   inside steps, metric writes and checkpoint saves), each followed by `--run.resume auto`;
   after the last kill the run goes to its end.
3. Checks: every resume started (no checkpoint was left half-written or unreadable); no
   partial save folder is left; metrics.jsonl holds each step once; every step's loss and the
   final weights equal the reference (relative 1e-6).
4. With --rank-fault: under torchrun with 2 ranks, SIGSTOP of rank 1 mid-run; the job must end
   within run.dist_timeout_s plus torchrun's shutdown, with a line naming rank 1.

Prints what happened at each kill and a summary; exit code 1 when a check fails.

    .venv/bin/python bench/bench_faults.py [--kills 20] [--steps 200] [--seed 0] [--rank-fault]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def train_args(run: Path, corpus: Path, steps: int, extra: dict | None = None) -> list[str]:
    values = {"run.dir": run, "model.preset": "tiny", "train.seq_len": 32, "train.micro_batch": 4,
              "train.steps": steps, "train.ckpt_every": 1, "train.keep_checkpoints": 2, "train.eval_every": 0,
              "train.log_every": 1, "train.warmup_steps": 2, "log.progress": "false", "log.tensorboard": "false",
              "data.source": "text", "data.path": corpus, "data.cache_dir": "", "run.threads": 1,
              "memory.device_budget": "auto", "run.device": "cpu", "hardware.device_kind": "cpu", **(extra or {})}
    return [a for k, v in values.items() for a in (f"--{k}", str(v))]


def hetrain(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.Popen([sys.executable, "-m", "hetrain.cli", "train", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]


def has_checkpoint(run: Path) -> bool:
    return (run / "checkpoints").is_dir() and any((run / "checkpoints").glob("step_*/meta.json"))


def compare(run: Path, ref: Path, steps: int) -> list[str]:
    """What differs between a finished run and the reference ([] when nothing does)."""
    problems = []
    got, want = losses(run), losses(ref)
    if [s for s, _ in got] != list(range(1, steps + 1)):
        problems.append(f"{run.name}: metrics.jsonl holds steps {[s for s, _ in got]}")
    worst = max(abs(x - y) / abs(y) for (_, x), (_, y) in zip(got, want))
    a, b = load_file(ref / "model.safetensors"), load_file(run / "model.safetensors")
    worst_w = max(float(((a[k] - b[k]).abs() / a[k].abs().clamp_min(1e-12)).max()) for k in a)
    leftovers = [q.name for q in (run / "checkpoints").iterdir() if "." in q.name]
    print(f"  {run.name} finished: losses max rel diff {worst:.1e}, weights {worst_w:.1e}, partial saves left: "
          f"{leftovers or 'none'}", flush=True)
    if worst > 1e-6 or worst_w > 1e-6 or leftovers:
        problems.append(f"{run.name}: loss diff {worst:.1e}, weight diff {worst_w:.1e}, left {leftovers}")
    return problems


def last_logged_step(run: Path) -> int:
    path = run / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = path.read_text().splitlines()
    try:
        return json.loads(lines[-1])["step"] if lines else 0
    except (json.JSONDecodeError, KeyError):  # a line being written
        return json.loads(lines[-2])["step"] if len(lines) > 1 else 0


def inject(tmp: Path, corpus: Path, steps: int, kills: int, rng: random.Random) -> tuple[list, list]:
    """Kill `kills` times, each at a random moment of training: once the run has logged the next
    of `kills` steps drawn at random from the run's steps, plus 0-30 ms (so kills land inside
    steps, metric writes and checkpoint saves alike); resume after each kill, and after the last
    one let the run finish, then compare it with the reference."""
    records, problems = [], []
    run = tmp / "run"
    targets = sorted(rng.sample(range(1, steps), kills))  # the step after which each kill comes
    for k in range(kills + 1):
        resume = has_checkpoint(run)
        start_step = last_logged_step(run) if resume else 0
        proc = hetrain(train_args(run, corpus, steps, {"run.resume": "auto"} if resume else None))
        if k == kills:
            _, err = proc.communicate(timeout=600)
            if proc.returncode != 0:
                problems.append(f"the last resume failed: {err.strip()[-400:]}")
            break
        target = max(targets[k], start_step + 1)
        while proc.poll() is None and last_logged_step(run) < target:
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.03))
        if proc.poll() is not None:
            _, err = proc.communicate()
            problems.append(f"run ended before kill {k + 1} (rc {proc.returncode}): {err.strip()[-400:]}")
            return records, problems
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
        complete = [q.name for q in sorted((run / "checkpoints").glob("step_*")) if (q / "meta.json").exists()] \
            if (run / "checkpoints").is_dir() else []
        partial = [q.name for q in (run / "checkpoints").glob("step_*.*")] if (run / "checkpoints").is_dir() else []
        records.append({"kill": k + 1, "after_step": target, "started_as": "resume" if resume else "new",
                        "last_checkpoint": complete[-1] if complete else None, "partial_saves": partial})
        print(f"  kill {k + 1:2d} after step {target:3d} ({'resumed run' if resume else 'new run'}): last complete "
              f"checkpoint {complete[-1] if complete else 'none'}{'; partial save ' + ', '.join(partial) if partial else ''}",
              flush=True)
    problems += compare(run, tmp / "ref", steps)
    return records, problems


def rank_fault(corpus: Path, tmp: Path, timeout_s: int) -> dict:
    """torchrun, 2 ranks; SIGSTOP rank 1 after 4 logged steps; how long until the job ends, and its message."""
    sys.path.insert(0, str(ROOT / "tests"))
    from train.test_rank_faults import child_with_rank, logged_steps

    run = tmp / "ranks"
    args = train_args(run, corpus, 5000, {"train.ckpt_every": 3, "run.dist_timeout_s": timeout_s,
                                          "memory.device_budget": "70%"})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "hetrain.cli", "train", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    while logged_steps(run) < 4 and proc.poll() is None:
        time.sleep(0.05)
    victim = child_with_rank(proc.pid, 1)
    os.kill(victim, signal.SIGSTOP)
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=300)
    took = time.monotonic() - t0
    os.kill(victim, signal.SIGKILL) if child_with_rank(proc.pid, 1) else None
    line = next((ln for ln in err.splitlines() if ln.startswith("hetrain: error:")), "")
    return {"ended_after_s": took, "timeout_s": timeout_s, "message": line, "rc": proc.returncode}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rank-fault", action="store_true", help="also SIGSTOP one of two torchrun ranks")
    a = p.parse_args(argv)
    rng = random.Random(a.seed)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        corpus = tmp / "corpus.txt"
        corpus.write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}  # line {i}\n" for i in range(6000)))
        t0 = time.perf_counter()
        ref = hetrain(train_args(tmp / "ref", corpus, a.steps))
        _, err = ref.communicate(timeout=600)
        run_s = time.perf_counter() - t0
        if ref.returncode != 0:
            print(err[-2000:])
            return 1
        print(f"reference: {a.steps} steps, checkpoint every step, in {run_s:.1f} s (start-up included)", flush=True)
        print(f"killing with SIGKILL {a.kills} times mid-training, resuming after each:", flush=True)
        records, failures = inject(tmp, corpus, a.steps, a.kills, rng)
        print(f"summary: {len(records)} kills, {sum(r['started_as'] == 'resume' for r in records)} of them in resumed "
              f"runs; {sum(bool(r['partial_saves']) for r in records)} left a partial save behind (removed by the "
              f"next save); {len(records)} resumes")
        if a.rank_fault:
            result = rank_fault(corpus, tmp, timeout_s=10)
            print(f"rank fault: {result}")
            if result["rc"] == 0 or "no answer from rank 1" not in result["message"]:
                failures.append(f"rank fault: {result}")
    print("all checks held" if not failures else "FAILED:\n  " + "\n  ".join(failures))
    return 1 if failures else 0


if __name__ == "__main__":
    torch.set_num_threads(1)
    sys.exit(main())
