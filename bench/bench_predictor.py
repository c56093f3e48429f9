"""Predicted against measured step time and peak accounted memory, on this machine.

For each configuration: profile the model on this machine (`run_profile`, cached in a temp
folder), predict the steady-state step with `predict_step`, then train it for real with
hetrain's Trainer and read metrics.jsonl: measured step time is the median of the per-step
`step_s` after the first WARMUP_STEPS steps, measured peak is the largest `peak_device_bytes`
of those steps (each record covers one step). Prints one row per configuration with the
ratios predicted/measured; the issue's targets are 15% for time and 10% for memory.

    .venv/bin/python bench/bench_predictor.py [--steps 10] [--only NAME ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from hetrain.config import load_config
from hetrain.predict.profiler import ProfileOptions, run_profile
from hetrain.predict.step_graph import predict_step
from hetrain.train.trainer import Trainer

WARMUP_STEPS = 2
TIME_TARGET, MEMORY_TARGET = 0.15, 0.10

# name -> overrides; depth, width, sequence length, micro-batch and accumulation all vary.
CONFIGS: dict[str, dict[str, str]] = {
    "L2-d128-b8-s64": {"model.n_layer": "2", "model.d_model": "128", "model.d_ff": "512",
                       "train.micro_batch": "8", "train.seq_len": "64"},
    "L4-d256-b4-s128": {"model.n_layer": "4", "model.d_model": "256", "model.d_ff": "1024",
                        "train.micro_batch": "4", "train.seq_len": "128"},
    "L8-d128-b8-s128": {"model.n_layer": "8", "model.d_model": "128", "model.d_ff": "512",
                        "train.micro_batch": "8", "train.seq_len": "128"},
    "L2-d384-b4-s128": {"model.n_layer": "2", "model.d_model": "384", "model.n_head": "6",
                        "model.n_kv_head": "6", "model.d_ff": "1536", "train.micro_batch": "4",
                        "train.seq_len": "128"},
    "L2-d256-b2-s256": {"model.n_layer": "2", "model.d_model": "256", "model.d_ff": "1024",
                        "train.micro_batch": "2", "train.seq_len": "256"},
    "L4-d192-b16-s64": {"model.n_layer": "4", "model.d_model": "192", "model.d_ff": "768",
                        "train.micro_batch": "16", "train.seq_len": "64"},
    "L4-d256-b4x2-s64": {"model.n_layer": "4", "model.d_model": "256", "model.d_ff": "1024",
                         "train.micro_batch": "4", "train.grad_accum": "2", "train.seq_len": "64"},
    "llama-L4-d256-b4-s128": {"model.preset": "tiny-llama", "model.n_layer": "4", "model.d_model": "256",
                              "model.n_head": "4", "model.n_kv_head": "2", "model.d_ff": "640",
                              "model.max_seq_len": "256", "train.micro_batch": "4", "train.seq_len": "128"},
}


def write_corpus(folder: Path) -> Path:
    lines = [f"def f{i}(x):\n    return x * {i} + {i % 7}  # line {i}\n" for i in range(20000)]
    path = folder / "corpus.txt"
    path.write_text("".join(lines))
    return path


def base_overrides(tmp: Path, corpus: Path, name: str, steps: int) -> dict[str, str]:
    return {
        "model.preset": "small", "run.dir": str(tmp / "runs" / name), "run.threads": str(os.cpu_count() or 1),
        "data.source": "text", "data.path": str(corpus), "data.cache_dir": "",
        "train.steps": str(steps), "train.warmup_steps": "2", "train.eval_every": "0",
        "train.log_every": "1", "train.ckpt_every": "0", "log.progress": "false",
        "log.tensorboard": "false", "log.peak_flops": "1e11",
        "hardware.profile_dir": str(tmp / "profiles"),
    }


def measure(cfg) -> tuple[float, int]:
    Trainer(cfg).fit()
    records = [json.loads(line) for line in (Path(cfg.run.dir) / "metrics.jsonl").read_text().splitlines()]
    later = [r for r in records if r["step"] > WARMUP_STEPS]
    return statistics.median(r["step_s"] for r in later), max(r["peak_device_bytes"] for r in later)


def run(names: list[str], steps: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        corpus = write_corpus(tmp)
        for name in names:
            cfg = load_config(None, {**base_overrides(tmp, corpus, name, steps), **CONFIGS[name]})
            t0 = time.perf_counter()
            profile, _, _ = run_profile(cfg, ProfileOptions(collectives=False))
            pred = predict_step(cfg, profile)
            t1 = time.perf_counter()
            step_s, peak_bytes = measure(cfg)
            rows.append({"config": name, "pred_step_s": pred.step_s, "meas_step_s": step_s,
                         "pred_peak_bytes": pred.peak_device_bytes, "meas_peak_bytes": peak_bytes,
                         "profile_s": t1 - t0, "train_s": time.perf_counter() - t1})
            print_row(rows[-1], flush=True)
    return rows


HEADER = (f"{'config':<24} {'pred step ms':>12} {'meas step ms':>12} {'ratio':>6}   "
          f"{'pred peak MiB':>13} {'meas peak MiB':>13} {'ratio':>6}")


def print_row(r: dict, flush: bool = False) -> None:
    t_ratio = r["pred_step_s"] / r["meas_step_s"]
    m_ratio = r["pred_peak_bytes"] / r["meas_peak_bytes"]
    flag = "" if abs(t_ratio - 1) <= TIME_TARGET and abs(m_ratio - 1) <= MEMORY_TARGET else "  <- misses target"
    print(f"{r['config']:<24} {r['pred_step_s'] * 1e3:12.1f} {r['meas_step_s'] * 1e3:12.1f} {t_ratio:6.3f}   "
          f"{r['pred_peak_bytes'] / 2**20:13.2f} {r['meas_peak_bytes'] / 2**20:13.2f} {m_ratio:6.3f}{flag}",
          flush=flush)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="training steps per configuration")
    parser.add_argument("--only", nargs="*", choices=list(CONFIGS), help="run only these configurations")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start; "
          f"{args.steps} steps per config, first {WARMUP_STEPS} not timed")
    print(HEADER, flush=True)
    rows = run(args.only or list(CONFIGS), args.steps)
    print(f"load average {os.getloadavg()[0]:.2f} at the end", file=sys.stderr)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    misses = [r["config"] for r in rows if abs(r["pred_step_s"] / r["meas_step_s"] - 1) > TIME_TARGET
              or abs(r["pred_peak_bytes"] / r["meas_peak_bytes"] - 1) > MEMORY_TARGET]
    print(f"{len(rows) - len(misses)}/{len(rows)} configurations within {TIME_TARGET:.0%} (time) and "
          f"{MEMORY_TARGET:.0%} (peak memory)" + (f"; missed: {', '.join(misses)}" if misses else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
