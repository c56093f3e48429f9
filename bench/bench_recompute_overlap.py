"""Overlapped recomputation against on-demand and none, at one memory limit, on CPU processes: one run.

Configurations (why they are realistic, docs/recompute.md):
- pipeline (--tp 1): a pipeline of P CPU processes (gloo, one thread each) whose stages are joined
  by a slow link, emulated by the runtime (run.emulate_link_gbytes_per_s: each send holds its
  stage for bytes / bandwidth, as the predictor prices a send), so that a stage waits for
  gradients: pipeline stages on different nodes joined by Ethernet, where a micro-batch's
  activation takes about as long to cross as a block's forward.
- tensor-parallel (--tp 2): P / tp stages of tp processes each, whose tensor-parallel all-reduces
  go over a slow link too (run.emulate_tp_link_gbytes_per_s, priced as a ring all-reduce), set so
  that one all-reduce takes --tp-share of a block's forward as timed on this core: GPUs joined by PCIe
  without NVLink (two 24 GB cards: a 16 MiB bf16 activation of a 7B model at 2,048 tokens takes
  about 1.7 ms over ~10 GB/s, against about 4 ms of block forward per card at TP 2). A block's
  backward waits for its two input-gradient all-reduces; the block before it recomputes there.
Each process's memory limit (the cluster file's memory_gib) sits between what the most loaded
stage needs with every block recomputed and without recomputation.

Before planning, one core is measured (fp32 matmul GFLOP/s, elementwise GB/s) and declared in the
cluster file so that the predictor's default CPU roofline gives these rates back (the peak is the
measured rate over the curve's efficiency), divided among the processes when they outnumber the
cores. Then, at that limit:
  (a) no recomputation: (b)'s split with nothing recomputed (it exceeds the limit; its predicted
      peak is printed against the limit, since nothing on a CPU enforces it),
  (b) on-demand whole-block recomputation: `hetrain plan --plan.recompute whole`,
  (b') (b)'s plan run with run.recompute_full_rerun: each recomputed block reruns its whole
      forward, all-reduces included, as Megatron-LM's full recomputation and other reentrant
      checkpoints do (the baseline Lynx measured against); (b) stops once the last saved tensor
      is back (torch's early stop: without the down projection and its all-reduce, unless
      --dropout saves a mask after them, when (b) reruns the whole forward as (b') does); (b')
      has no prediction of its own (its plan prices (b)),
  (c) hetrain's overlapped policy: `hetrain plan --plan.recompute heu` (units per stage,
      recomputed in the waits where they fit, stages balanced for it),
each trained under torchrun for --steps steps; measured is the median step after the first two.
Printed: per configuration the plan, predicted and measured step, and for (c) the share of its
recomputation that ran while the stage waited (for a gradient, or for an all-reduce); what
on-demand recomputation costs in (b) and (b'); (c) against (b). The last line reads
`overlapped vs on-demand: X.XXx; vs no recompute: Y.YYx` (measured step ratios (b) / (c) and
(a) / (c)); the line before it gives (b') / (c).

    .venv/bin/python bench/bench_recompute_overlap.py [--processes 4] [--steps 8] [--json out.json]
    .venv/bin/python bench/bench_recompute_overlap.py --processes 2 --tp 2 --d-model 512 --seq-len 512
    .venv/bin/python bench/bench_recompute_overlap.py --processes 2 --tp 2 --d-model 512 --seq-len 512 \
        --global-batch 4 --tp-share 0.7 --memory 0.25 --steps 10 --dropout 0.1   # docs/recompute.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from hetrain.hardware.cluster import load_cluster
from hetrain.model.gpt import ResidualDropout
from hetrain.model.presets import get_preset
from hetrain.plan.cluster.planner import plan_cluster, repredict
from hetrain.plan.cluster.cost import PredictorOptions
from hetrain.plan.cluster.plan import ClusterPlan
from hetrain.plan.cluster.predict import build_stages, context_for, shape_of
from hetrain.plan.cluster.search import Pins, SearchOptions
from hetrain.predict.roofline import CPU_CURVE

WARMUP_STEPS = 2


def measure_core() -> tuple[float, float]:
    """One thread: fp32 matmul FLOP/s (256x1024 by 1024x1024) and elementwise bytes/s (GELU of 8M floats)."""
    torch.set_num_threads(1)
    a, b = torch.randn(256, 1024), torch.randn(1024, 1024)
    x = torch.randn(8 * 2**20)
    best_mm = best_ew = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        best_mm = min(best_mm, (time.perf_counter() - t0) / 10)
        t0 = time.perf_counter()
        torch.nn.functional.gelu(x, approximate="tanh")
        best_ew = min(best_ew, time.perf_counter() - t0)
    return 2 * 256 * 1024 * 1024 / best_mm, 2 * x.numel() * 4 / best_ew


def cluster_text(processes: int, flops: float, bytes_per_s: float, link_gbytes_per_s: float, mem_gib: float,
                 tp: int = 1, tp_link_gbytes_per_s: float = 0.0) -> str:
    """One group of CPU processes; with tp > 1, nodes of tp processes (TP inside a node, over the
    TP link; stages between nodes, over the pipeline link)."""
    share = min(1.0, (os.cpu_count() or 1) / processes)  # processes beyond the cores share them
    # Declared so that the predictor's default CPU roofline gives back the measured rates: it reaches
    # CPU_CURVE.max_efficiency of the peak in large GEMMs and memory_bw_efficiency of the bandwidth.
    tflops = flops * share / CPU_CURVE.max_efficiency / 1e12
    bytes_per_s = bytes_per_s / PredictorOptions().memory_bw_efficiency
    nodes, per_node = (processes // tp, tp) if tp > 1 else (1, processes)
    intra = tp_link_gbytes_per_s if tp > 1 else link_gbytes_per_s
    # The predictor reaches link_efficiency of a declared link: declare the emulated speed / that.
    eff = PredictorOptions().link_efficiency
    return (f'name = "cpu{processes}-slow-link"\n[[group]]\nname = "cpu"\nkind = "cpu"\nnodes = {nodes}\n'
            f"devices_per_node = {per_node}\nintra_node_gbytes_per_s = {intra / eff}\n"
            f"inter_node_gbytes_per_s = {link_gbytes_per_s / eff}\nintra_node_latency_us = 1\n"
            f"inter_node_latency_us = 1\nmemory_gib = {mem_gib}\nmem_bw_gbytes_per_s = {bytes_per_s * share / 1e9}\n"
            f"peak_fp32_tflops = {tflops}\npeak_bf16_tflops = {tflops}\npeak_fp16_tflops = {tflops}\n")


def roomy(cfg, args, flops, bytes_per_s, tp_link_gbytes_per_s: float):
    """The plan with whole-block recomputation and no memory limit: its context, stage models and blocks."""
    work = Path(tempfile.mkdtemp())
    path = work / "roomy.toml"
    path.write_text(cluster_text(args.processes, flops, bytes_per_s, args.link_gbytes_per_s, 64.0, args.tp,
                                 tp_link_gbytes_per_s))
    pins = Pins(pp=args.processes // args.tp, tp=args.tp, micro_batch=args.micro_batch)
    plan = plan_cluster(cfg, load_cluster(path), args.global_batch, args.seq_len, PredictorOptions(compute_dtype="fp32"),
                        SearchOptions(pins=pins, upper_bound=False, recompute="whole"))
    ctx, pipe = context_for(plan), plan.pipelines[0]
    return ctx, build_stages(ctx, shape_of(pipe), pipe.n_microbatches), [st.n_blocks for st in pipe.stages]


def memory_limit_gib(cfg, args, flops, bytes_per_s) -> float:
    """Between the most loaded stage's peak with every block recomputed (0) and with none (1)."""
    ctx, stages, n = roomy(cfg, args, flops, bytes_per_s, args.tp_link_gbytes_per_s)
    low = max(st.peak_bytes(k, k) for st, k in zip(stages, n))
    high = max(st.peak_bytes(k, 0) for st, k in zip(stages, n))
    return (low + args.memory * (high - low)) / (1 - ctx.options.memory_reserve_fraction) / 2**30


def block_forward_s(args) -> float:
    """One TP rank's share of a block's forward for one micro-batch, timed on one thread: layer
    norms, its q/k/v columns, attention over its heads, its rows of the output projection, its
    MLP columns, GELU and its rows of the down projection, and --dropout on the two residual
    branches (fp32, what the runs compute in)."""
    torch.set_num_threads(1)
    tp, d, mb, s = args.tp, args.d_model, args.micro_batch, args.seq_len
    heads = d // 64 // tp
    x = torch.randn(mb, s, d)
    w_qkv, w_proj = torch.randn(3 * heads * 64, d), torch.randn(d, heads * 64)
    w_up, w_down = torch.randn(4 * d // tp, d), torch.randn(d, 4 * d // tp)
    fn = torch.nn.functional

    drop = ResidualDropout(args.dropout)  # in training mode, as the runs apply it

    def forward():
        h = fn.layer_norm(x, (d,))
        q, k, v = fn.linear(h, w_qkv).view(mb, s, 3, heads, 64).permute(2, 0, 3, 1, 4)
        a = fn.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = x + drop(fn.linear(a.transpose(1, 2).reshape(mb, s, heads * 64), w_proj))
        up = fn.gelu(fn.linear(fn.layer_norm(h, (d,)), w_up), approximate="tanh")
        return h + drop(fn.linear(up, w_down))

    best = float("inf")
    with torch.no_grad():
        for _ in range(7):
            t0 = time.perf_counter()
            forward()
            best = min(best, time.perf_counter() - t0)
    return best


def tp_link_gbytes_per_s(args) -> float:
    """The emulated TP link at which one ring all-reduce of a block's output (fp32) takes
    args.tp_share of the block's forward as measured on this core (block_forward_s); the runtime
    holds each all-reduce for 2 (tp - 1) / tp x its bytes / this rate, as the predictor prices it."""
    n_bytes = args.micro_batch * args.seq_len * args.d_model * 4
    return 2 * (args.tp - 1) / args.tp * n_bytes / (args.tp_share * block_forward_s(args)) / 1e9


def corpus(path: Path) -> Path:
    path.write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}  # line {i}\n" for i in range(6000)))
    return path


def layout(plan: dict) -> str:
    parts = []
    for st in plan["pipelines"][0]["stages"]:
        rec = st.get("recompute") or {}
        if rec.get("blocks"):
            what = "; ".join(f"{g['n_blocks']}x[" + " ".join(f"{short} {','.join(g[key])}" for key, short in (
                ("window", "win"), ("collective", "coll"), ("demand", "dem")) if g.get(key)) + "]" for g in rec["blocks"])
        else:
            what = f"{st['n_recompute_blocks']} whole" if st["n_recompute_blocks"] else "none"
        parts.append(f"{st['n_blocks']} blocks: {what}")
    return " | ".join(parts)


def train(name: str, plan_path: Path, work: Path, args, extra: tuple[str, ...] = ()) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    run_dir = work / name / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.processes),
           "-m", "hetrain.cli", "train", "--plan.file", str(plan_path), "--run.dir", str(run_dir), "--run.threads", "1",
           "--run.emulate_link_gbytes_per_s", str(args.link_gbytes_per_s),
           "--run.emulate_tp_link_gbytes_per_s", str(args.tp_link_gbytes_per_s), "--data.source", "text",
           "--data.path", str(work / "corpus.txt"), "--data.cache_dir", "", "--train.steps", str(args.steps),
           "--train.eval_every", "0", "--train.ckpt_every", "0", "--train.log_every", "1", "--log.progress", "false",
           "--log.tensorboard", "false", "--log.peak_flops", "1e11", "--log.trace_steps", "2", *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"{name}: torchrun failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    records = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step_s"] for r in records[WARMUP_STEPS:]]
    ahead = hidden = demand = inside = inside_hidden = 0.0
    for m in re.finditer(r"P\d+ S\d+: ([\d.]+) ms ahead(?: \((\d+)% inside waits\))?, (?:([\d.]+) ms inside "
                         r"all-reduces \(([\d.]+) ms before they ended\), )?([\d.]+) ms on demand", done.stdout):
        a = float(m.group(1))
        ahead += a
        hidden += a * float(m.group(2) or 0) / 100
        inside += float(m.group(3) or 0)
        inside_hidden += float(m.group(4) or 0)
        demand += float(m.group(5))
    per_stage = [ln.split("hetrain:", 1)[1].strip() for ln in done.stdout.splitlines()
                 if re.match(r"hetrain:\s+P\d+ S\d+ \S+: [\d.]+ / [\d.]+ vs", ln)]
    return {"measured_step_s": statistics.median(steps), "steps_s": steps, "per_stage": per_stage,
            "ahead_ms": ahead, "hidden_ms": hidden,
            "collective_ms": inside, "collective_hidden_ms": inside_hidden, "demand_ms": demand}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--processes", type=int, default=4, help="pipeline stages, one CPU process each (2 to 4)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--link-gbytes-per-s", type=float, default=0.03, help="the emulated link between stages")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel degree inside each stage")
    ap.add_argument("--tp-share", type=float, default=0.5,
                    help="with --tp > 1: one all-reduce on the emulated TP link takes this share of a block's forward")
    ap.add_argument("--d-model", type=int, default=256, help="model width (heads of 64, MLP 4x)")
    ap.add_argument("--memory", type=float, default=0.4,
                    help="the limit between all blocks recomputed (0) and none (1) on the most loaded stage")
    ap.add_argument("--dropout", type=float, default=0.0,
                    help="dropout on each block's two residual branches (model.dropout with model.dropout_attention false: "
                         "Megatron-LM's --hidden-dropout, 0.1 by default there; attention dropout stays off)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.processes % args.tp:
        ap.error(f"--processes {args.processes} must be a multiple of --tp {args.tp}")
    d = args.d_model
    cfg = dataclasses.replace(get_preset("small"), n_layer=args.layers, max_seq_len=max(256, args.seq_len), d_model=d,
                              n_head=d // 64, n_kv_head=d // 64, d_ff=4 * d, dropout=args.dropout,
                              dropout_attention=False)
    flops, bytes_per_s = measure_core()
    args.tp_link_gbytes_per_s = tp_link_gbytes_per_s(args) if args.tp > 1 else 0.0
    mem_gib = memory_limit_gib(cfg, args, flops, bytes_per_s)
    load = os.getloadavg()[0]
    print(f"{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} cores, load average {load:.2f} before the run; "
          f"one core: {flops / 1e9:.0f} GFLOP/s fp32 matmul, {bytes_per_s / 1e9:.1f} GB/s elementwise")
    tp_text = (f", TP {args.tp} over an emulated {args.tp_link_gbytes_per_s:.3f} GB/s link (an all-reduce takes "
               f"{args.tp_share:.0%} of a block's forward timed on one core)" if args.tp > 1 else "")
    print(f"model small, width {d}, {args.layers} blocks, seq {args.seq_len}, residual dropout {args.dropout}; PP {args.processes // args.tp}{tp_text}, "
          f"{args.global_batch // args.micro_batch} micro-batches of {args.micro_batch}; emulated link "
          f"{args.link_gbytes_per_s} GB/s between stages; "
          f"memory limit {mem_gib * 2**30 / 2**20:.1f} MiB per process ({args.memory:.0%} of the way from all blocks "
          f"recomputed to none on the most loaded stage); {args.steps} steps, median after {WARMUP_STEPS}")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        corpus(work / "corpus.txt")
        (work / "cluster.toml").write_text(cluster_text(args.processes, flops, bytes_per_s, args.link_gbytes_per_s,
                                                        mem_gib, args.tp, args.tp_link_gbytes_per_s))
        model = ["--model.preset", "small", "--model.n_layer", str(args.layers), "--model.max_seq_len",
                 str(cfg.max_seq_len), "--train.seq_len", str(args.seq_len), "--model.d_model", str(d),
                 "--model.n_head", str(cfg.n_head), "--model.n_kv_head", str(cfg.n_kv_head), "--model.d_ff", str(cfg.d_ff),
                 "--model.dropout", str(args.dropout), "--model.dropout_attention", "false"]
        pins = ["--plan.pp", str(args.processes // args.tp), "--plan.tp", str(args.tp),
                "--plan.micro_batch", str(args.micro_batch),
                "--plan.global_batch", str(args.global_batch), "--train.dtype", "fp32", "--plan.dtype", "fp32"]
        for name, method in (("b", "whole"), ("c", "heu")):
            subprocess.run([sys.executable, "-m", "hetrain.cli", "plan", "--cluster", str(work / "cluster.toml"),
                            *model, *pins, "--plan.recompute", method, "--run.dir", str(work / name)],
                           check=True, capture_output=True)
        whole = ClusterPlan.load(work / "b" / "plan.json")
        none = dataclasses.replace(whole, pipelines=[dataclasses.replace(p, stages=[
            dataclasses.replace(s, n_recompute_blocks=0) for s in p.stages]) for p in whole.pipelines])
        (work / "a").mkdir()
        repredict(none).save(work / "a" / "plan.json")
        labels = {"a": "(a) no recomputation", "b": "(b) on-demand whole blocks", "f": "(b') (b), full rerun",
                  "c": "(c) overlapped (HEU)"}
        print(f"{'configuration':<28} {'pred. ms':>9} {'meas. ms':>9} {'meas/pred':>9} {'pred. peak MiB':>15}  "
              f"plan (per stage: blocks and what is recomputed)")
        (work / "f").mkdir()
        for name in ("a", "b", "f", "c"):
            source = "b" if name == "f" else name  # (b') runs (b)'s plan, which prices (b) (early stop): no prediction
            plan = json.loads((work / source / "plan.json").read_text())
            pred = plan["prediction"]
            peak = max(s["peak_bytes"] for s in pred["stages"])
            extra = ("--run.recompute_full_rerun", "true") if name == "f" else ()
            row = train(name, work / source / "plan.json", work, args, extra)
            row.update(predicted_step_s=pred["step_s"], peak_bytes=peak, layout=layout(plan),
                       fits=peak <= pred["stages"][0]["capacity_bytes"])
            rows[name] = row
            fits = "" if row["fits"] else " over"
            pred_ms, ratio = f"{1e3 * row['predicted_step_s']:.1f}", f"{row['measured_step_s'] / row['predicted_step_s']:.2f}"
            if name == "f":
                pred_ms = ratio = "-"
            print(f"{labels[name]:<28} {pred_ms:>9} {1e3 * row['measured_step_s']:>9.1f} {ratio:>9} "
                  f"{peak / 2**20:>10.1f}{fits:<5}  {row['layout']}", flush=True)
            print(f"{'':<28} per stage, one micro-batch, {'(b)' + chr(39) + 's ' if name == 'f' else ''}predicted "
                  f"fwd / bwd ms vs measured: {'; '.join(row['per_stage'])}", flush=True)
    c = rows["c"]
    total = c["ahead_ms"] + c["collective_ms"] + c["demand_ms"]
    hidden = c["hidden_ms"] + c["collective_hidden_ms"]
    print(f"(c) recomputation per step, all stages (TP rank 0): {c['ahead_ms']:.1f} ms ahead of backwards, "
          f"{c['hidden_ms']:.1f} ms of it while the gradient was on its way; {c['collective_ms']:.1f} ms inside "
          f"tensor-parallel all-reduces, {c['collective_hidden_ms']:.1f} ms of it before they ended; "
          f"{c['demand_ms']:.1f} ms on demand: {100 * hidden / total if total else 0:.0f}% of the recompute time ran "
          f"inside waits")
    for name in ("b", "f"):
        cost = rows[name]["measured_step_s"] - rows["a"]["measured_step_s"]
        print(f"{labels[name]}: on-demand recomputation costs {100 * cost / rows[name]['measured_step_s']:.0f}% of its "
              f"measured step, {100 * cost / rows['a']['measured_step_s']:.0f}% of (a)'s")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(f"overlapped vs on-demand whole blocks rerun in full (b'), as Megatron-LM does: "
          f"{rows['f']['measured_step_s'] / c['measured_step_s']:.2f}x; below, on-demand is hetrain's own (b)")
    x = rows["b"]["measured_step_s"] / c["measured_step_s"]
    y = rows["a"]["measured_step_s"] / c["measured_step_s"]
    print(f"overlapped vs on-demand: {x:.2f}x; vs no recompute: {y:.2f}x")


if __name__ == "__main__":
    main()
