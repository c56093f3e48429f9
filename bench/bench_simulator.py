"""Times the simulator on the task graph of an offloaded 96-block training step.

Per block and step: weight prefetch for forward and for backward (h2d), forward and
backward (compute), gradient offload (d2h) and the CPU Adam update (cpu_optim), with the
next step's prefetch of a block waiting for that block's update (cross-iteration overlap)
weight prefetch limited to a rotation of buffers, and device memory capped so that gradient
offload must keep up with backward. The durations
and sizes are illustrative, not measured: this script measures the simulator, not a model.

    .venv/bin/python bench/bench_simulator.py [--blocks 96] [--steps 2] [--trace t.json --png t.png]
"""

from __future__ import annotations

import argparse
import statistics
import time

from hetrain.predict.simulator import Task, simulate
from hetrain.trace import plot_timeline, write_chrome_trace

FWD_S, BWD_S, COPY_S, ADAM_S = 2e-3, 4e-3, 1.5e-3, 3e-3
WEIGHT_BYTES, ACT_BYTES, GRAD_BYTES = 200 << 20, 300 << 20, 200 << 20
PREFETCH_DEPTH = 2  # weight buffers in rotation: block b's copy waits for block b-2's use
BUFFERS = 3  # weight and gradient buffers the device budget allows beyond activations


def step_graph(n_blocks: int, n_steps: int) -> list[Task]:
    tasks: list[Task] = []
    for s in range(n_steps):
        # h2d priorities in the order the compute stream needs the weights.
        base = s * 4 * n_blocks
        for b in range(n_blocks):
            tasks.append(Task(
                f"h2d.w.fwd.block{b}.s{s}", "h2d", COPY_S, priority=base + b, cat="h2d",
                deps=((f"adam.block{b}.s{s - 1}",) if s else ())
                + ((f"fwd.block{b - PREFETCH_DEPTH}.s{s}",) if b >= PREFETCH_DEPTH else ()),
                alloc={"device": WEIGHT_BYTES}))
            tasks.append(Task(
                f"fwd.block{b}.s{s}", "compute", FWD_S, cat="fwd",
                deps=(f"h2d.w.fwd.block{b}.s{s}",) + ((f"fwd.block{b - 1}.s{s}",) if b else
                      ((f"bwd.block0.s{s - 1}",) if s else ())),
                alloc={"device": ACT_BYTES}, free={"device": WEIGHT_BYTES}))
        for b in reversed(range(n_blocks)):
            tasks.append(Task(
                f"h2d.w.bwd.block{b}.s{s}", "h2d", COPY_S, priority=base + 2 * n_blocks - b,
                cat="h2d", alloc={"device": WEIGHT_BYTES},
                deps=(f"fwd.block{b}.s{s}",) + ((f"bwd.block{b + PREFETCH_DEPTH}.s{s}",)
                                                if b + PREFETCH_DEPTH < n_blocks else ())))
            prev = f"bwd.block{b + 1}.s{s}" if b + 1 < n_blocks else f"fwd.block{b}.s{s}"
            tasks.append(Task(
                f"bwd.block{b}.s{s}", "compute", BWD_S, cat="bwd",
                deps=(prev, f"h2d.w.bwd.block{b}.s{s}"), alloc={"device": GRAD_BYTES},
                free={"device": WEIGHT_BYTES + ACT_BYTES}))
            tasks.append(Task(
                f"d2h.g.block{b}.s{s}", "d2h", COPY_S, cat="d2h", priority=b,
                deps=(f"bwd.block{b}.s{s}",), free={"device": GRAD_BYTES}))
            # Lowest block first: the next forward needs it first.
            tasks.append(Task(
                f"adam.block{b}.s{s}", "cpu_optim", ADAM_S, cat="optim", priority=b,
                deps=(f"d2h.g.block{b}.s{s}",)))
    return tasks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=96)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--trace", help="write the Chrome trace JSON here")
    ap.add_argument("--png", help="write the timeline PNG here")
    args = ap.parse_args()

    tasks = step_graph(args.blocks, args.steps)
    mem_limit = {"device": args.blocks * ACT_BYTES + BUFFERS * WEIGHT_BYTES}
    times_s = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        result = simulate(tasks, mem_limit=mem_limit)
        times_s.append(time.perf_counter() - t0)
    print(f"{len(tasks)} tasks ({args.blocks} blocks x {args.steps} steps), "
          f"makespan {result.step_s * 1e3:.1f} ms, "
          f"peak device {result.peak_bytes['device'] / 2**30:.2f} GiB, "
          f"critical path {len(result.critical_path)} tasks")
    print("utilisation " + ", ".join(f"{r} {u:.0%}" for r, u in result.utilisation.items()))
    print(f"simulate: median {statistics.median(times_s) * 1e3:.1f} ms, "
          f"min {min(times_s) * 1e3:.1f} ms over {args.repeats} runs")
    if args.trace:
        write_chrome_trace(result.events, args.trace, metadata={"name": "bench_simulator"},
                           memory=result.memory_timeline)
    if args.png:
        plot_timeline(result.events, args.png, title=f"{args.blocks}-block step graph",
                      memory=result.memory_timeline)


if __name__ == "__main__":
    main()
