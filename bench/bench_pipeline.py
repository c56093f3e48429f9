"""Cluster plans on CPU processes: the plan's predicted step against the measured one, in one run.

For each configuration: `hetrain plan --cluster FILE` with the configuration's pinned degrees
writes plan.json (the planner's prediction inside), then `torchrun --standalone
--nproc_per_node N -m hetrain.cli train --plan.file plan.json` trains it for --steps steps, one
thread per process. Measured is the median per-step `step_s` of metrics.jsonl after the first
WARMUP_STEPS steps (rank 0's wall time per step); predicted is its `predicted_step_s`. Prints
one row per configuration with measured / predicted. The clusters: configs/clusters/local-cpu.toml
(two groups of 2 processes labelled as two kinds) and one-group clusters of 2 or 4 processes
with the same declared figures (0.1 TFLOP/s per process, loopback links), written next to the
runs. With 4 processes on a 2-core machine each process has half a core, which the declared
figures do not know: the ratio then shows that too. Other work on the machine slows the
measurement; run it on a quiet machine and say when it was not.

    .venv/bin/python bench/bench_pipeline.py [--steps 8] [--only NAME ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WARMUP_STEPS = 2
MODEL = ["--model.preset", "small", "--model.n_layer", "4", "--train.seq_len", "64"]

# name -> (cluster: "local-cpu" or a one-group process count, processes, pinned plan options)
CONFIGS: dict[str, tuple[str | int, int, list[str]]] = {
    "PP2": (2, 2, ["--plan.pp", "2", "--plan.micro_batch", "2", "--plan.global_batch", "8"]),
    "TP2": (2, 2, ["--plan.tp", "2", "--plan.micro_batch", "2", "--plan.global_batch", "8"]),
    "PP2xDP2 (two kinds)": ("local-cpu", 4, ["--plan.pp", "2", "--plan.dp", "2", "--plan.micro_batch", "2",
                                             "--plan.global_batch", "8"]),
    "PP4": (4, 4, ["--plan.pp", "4", "--plan.micro_batch", "1", "--plan.global_batch", "8"]),
    "DP2 reduce after": (2, 2, ["--plan.dp", "2", "--plan.pp", "1", "--plan.micro_batch", "2",
                                "--plan.global_batch", "8"]),
    "DP2 reduce inside": (2, 2, ["--plan.dp", "2", "--plan.pp", "1", "--plan.micro_batch", "2",
                                 "--plan.global_batch", "8"]),
}
"""The last two differ only in where the replicas' gradient all-reduce runs: after the backward (the
plan's choice for CPU processes), or bucket by bucket inside it (forced with
run.cpu_overlap_grad_reduce); the last line compares them when both ran."""
TRAIN_EXTRA = {"DP2 reduce inside": ["--run.cpu_overlap_grad_reduce", "true"]}


def one_group_cluster(path: Path, processes: int) -> Path:
    local = (REPO / "configs/clusters/local-cpu.toml").read_text()
    group = local[local.index("[[group]]"):local.index("[[group]]", local.index("[[group]]") + 1)]
    group = group.replace('"cpu-a"', '"cpu"').replace("devices_per_node = 2", f"devices_per_node = {processes}")
    path.write_text(f'name = "cpu{processes}"\n\n{group}')
    return path


def corpus(path: Path) -> Path:
    path.write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}  # line {i}\n" for i in range(6000)))
    return path


def run(name: str, work: Path, steps: int) -> dict:
    cluster, nproc, pins = CONFIGS[name]
    cluster_file = (REPO / "configs/clusters/local-cpu.toml" if cluster == "local-cpu"
                    else one_group_cluster(work / f"cpu{cluster}.toml", int(cluster)))
    tag = name.split()[0] + ("-" + name.split()[-1] if name.startswith("DP2") else "")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    hetrain = [sys.executable, "-m", "hetrain.cli"]
    subprocess.run(hetrain + ["plan", "--cluster", str(cluster_file), *MODEL, *pins, "--run.dir", str(work / tag)],
                   check=True, capture_output=True, env=env)
    text = corpus(work / "corpus.txt")
    train = ["--plan.file", str(work / tag / "plan.json"), "--run.dir", str(work / tag / "run"),
             "--run.threads", "1", "--data.source", "text", "--data.path", str(text), "--data.cache_dir", "",
             "--train.steps", str(steps), "--train.eval_every", "0", "--train.ckpt_every", "0",
             "--train.log_every", "1", "--log.progress", "false", "--log.tensorboard", "false",
             "--log.peak_flops", "1e11", *TRAIN_EXTRA.get(name, [])]
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                           str(nproc), "-m", "hetrain.cli", "train", *train], capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"{name}: torchrun failed:\n{done.stderr[-3000:]}")
    records = [json.loads(ln) for ln in (work / tag / "run" / "metrics.jsonl").read_text().splitlines()]
    measured = statistics.median(r["step_s"] for r in records[WARMUP_STEPS:])
    predicted = records[-1]["predicted_step_s"]
    plan = json.loads((work / tag / "plan.json").read_text())
    layout = "; ".join(f"{' -> '.join(p['groups'])} dp {p['dp']} tp {p['tp'][0]} "
                       f"{len(p['stages'])} stages [{'+'.join(str(s['n_blocks']) for s in p['stages'])}] "
                       f"{p['n_microbatches']} x {p['micro_batch']}" for p in plan["pipelines"])
    return {"name": name, "processes": nproc, "layout": layout, "predicted_step_s": predicted,
            "measured_step_s": measured, "ratio": measured / predicted, "wall_s": time.perf_counter() - start}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    names = args.only or list(CONFIGS)
    rows = []
    print(f"model: {' '.join(MODEL)}; global batch 8; {args.steps} steps, median after {WARMUP_STEPS}; "
          f"{os.cpu_count()} cores; {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"{'config':<22} {'procs':>5} {'predicted ms':>12} {'measured ms':>12} {'meas/pred':>9}  layout")
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            row = run(name, Path(tmp), args.steps)
            rows.append(row)
            print(f"{name:<22} {row['processes']:>5} {1000 * row['predicted_step_s']:>12.1f} "
                  f"{1000 * row['measured_step_s']:>12.1f} {row['ratio']:>9.2f}  {row['layout']}", flush=True)
    by = {r["name"]: r for r in rows}
    if "DP2 reduce after" in by and "DP2 reduce inside" in by:
        after, inside = by["DP2 reduce after"], by["DP2 reduce inside"]
        print(f"gradient reduction inside vs after the backward (DP2): measured "
              f"{after['measured_step_s'] / inside['measured_step_s']:.2f}x, predicted "
              f"{after['predicted_step_s'] / inside['predicted_step_s']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
