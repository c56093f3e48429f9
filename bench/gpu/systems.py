"""One training system, one model, one GPU memory cap, in this process: hetrain's offload
engine or a peer, timed the same way.

Systems:
- `hetrain`: the offload planner's plan for the cap (less what the planner does not count:
  one block's working set, the bf16 logits), run by hetrain's engine; costs profiled on this
  machine (cached in --profile-dir).
- `fsdp2-offload`: FSDP2 (`fully_shard` per block and at the root) with CPUOffloadPolicy
  (pinned), bf16 parameters and fp32 gradient reduction (MixedPrecisionPolicy), fused AdamW on
  the CPU over the offloaded fp32 shards: the setting torch's docs give for CPU offload.
- `zero2-offload` (ZeRO-Offload): DeepSpeed ZeRO stage 2 with offload_optimizer to pinned CPU
  memory, overlap_comm and contiguous gradients, bf16, DeepSpeed's CPU Adam (AdamW mode).
- `zero3-offload`: DeepSpeed ZeRO stage 3 with offload_param and offload_optimizer to pinned
  CPU memory, the same settings otherwise.

The peers recompute every block (torch's checkpoint_wrapper, non-reentrant), as their
tutorials do when memory is the constraint; hetrain's planner decides per block. All train
hetrain's GPT (the same module, the same seed and batches) with AdamW (betas, weight decay on
matrices only, gradient clipping at 1.0) at a constant learning rate.

The cap is `torch.cuda.set_per_process_memory_fraction`, set before anything is allocated;
`max_allocated_bytes` is torch.cuda.max_memory_allocated over the whole run. Results are one
JSON object (`--json`), also printed as the last line. An out-of-memory error is a result
(`"oom": true`), not a crash. On a CPU (the dry run) hetrain and FSDP2 run without offload
semantics worth timing, and DeepSpeed (where installed) runs on its CPU accelerator over gloo:
code paths checked, no figure.

    python bench/gpu/systems.py --system hetrain --model '{"model.preset": "gpt3-1.3b"}' \
        --micro-batch 8 --seq-len 1024 --cap-gib 16 --steps 5 --warmup 2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

SYSTEMS = ("hetrain", "fsdp2-offload", "zero2-offload", "zero3-offload")
SEED = 1337
LR, BETAS, WEIGHT_DECAY, EPS, CLIP = 1e-4, (0.9, 0.95), 0.1, 1e-8, 1.0


@dataclass
class RunSpec:
    system: str
    model: dict[str, str]
    """hetrain config overrides for the model (model.*)."""
    micro_batch: int
    seq_len: int
    cap_bytes: int | None
    """GPU memory cap; None: no cap (and, for hetrain, the planner's budget is unlimited)."""
    steps: int
    warmup: int
    profile_dir: str
    fast_init: bool = False
    """Fill weights with constants instead of the model's random init (capacity trials:
    the memory a step takes does not depend on the values, the time to build a model does)."""
    host_budget_bytes: int | None = None
    trace_dir: str | None = None
    """After the timed steps, one more step under torch.profiler: its Chrome trace (gzipped) and
    the device's busy time land here; for hetrain also the engine's own lanes (compute, h2d,
    d2h, cpu_optim) over every step, as a Chrome trace and a timeline plot."""


@dataclass
class RunResult:
    system: str
    ok: bool = False
    oom: bool = False
    error: str = ""
    params: int = 0
    n_layer: int = 0
    tokens_per_s: float = 0.0
    step_s: float = 0.0
    losses: list[float] = field(default_factory=list)
    max_allocated_bytes: int = 0
    cap_bytes: int | None = None
    setup_s: float = 0.0
    device: str = ""
    notes: dict = field(default_factory=dict)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_rank_env() -> None:
    """torch.distributed and DeepSpeed read their rank from the environment; one process is rank 0 of 1."""
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def hetrain_config(spec: RunSpec, device: torch.device):
    from hetrain.config import load_config

    return load_config(None, {"run.device": device.type, "train.dtype": "bf16" if device.type == "cuda" else "fp32",
                              "train.grad_accum": "1", "train.micro_batch": str(spec.micro_batch),
                              "train.seq_len": str(spec.seq_len), "hardware.profile_dir": spec.profile_dir,
                              **spec.model})


def build_model(model_cfg, fast_init: bool) -> torch.nn.Module:
    from hetrain.model.gpt import GPT

    torch.manual_seed(SEED)
    if not fast_init:
        return GPT(model_cfg)
    with torch.device("meta"):
        model = GPT(model_cfg)
    model.to_empty(device="cpu")
    for name, p in model.named_parameters():
        with torch.no_grad():
            p.fill_(0.02 if p.dim() >= 2 else (0.0 if name.endswith("bias") else 1.0))
    if model_cfg.pos == "rope":
        from hetrain.model.gpt import rope_cache

        model.rope_cos, model.rope_sin = rope_cache(model_cfg)
    return model


def batches(vocab: int, micro_batch: int, seq_len: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(SEED)
    out = []
    for _ in range(n):
        x = torch.randint(0, vocab, (micro_batch, seq_len + 1), generator=gen)
        out.append((x[:, :-1].contiguous(), x[:, 1:].contiguous()))
    return out


def transient_bytes(model_cfg, micro_batch: int, seq_len: int, dtype_bytes: int) -> int:
    """What the planner does not count but the allocator sees: one block's working set in its
    backward (the planner counts the head's fp32 gradients itself, on a GPU), and the bf16
    logits beside their fp32 copy at the head's forward."""
    from hetrain.model.describe import block_act_bytes

    logits = micro_batch * seq_len * model_cfg.vocab_size * dtype_bytes
    return logits + sum(block_act_bytes(model_cfg, micro_batch, seq_len, dtype_bytes).values())


def decay_groups(params: list[tuple[str, torch.nn.Parameter]]) -> list[dict]:
    decay = [p for _, p in params if p.dim() >= 2]
    rest = [p for _, p in params if p.dim() < 2]
    return [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": rest, "weight_decay": 0.0}]


def checkpoint_blocks(model: torch.nn.Module) -> None:
    """Recompute every block in the backward (the peers' setting), with torch's own wrapper."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl, apply_activation_checkpointing, checkpoint_wrapper)

    from hetrain.model.gpt import Block

    apply_activation_checkpointing(
        model, checkpoint_wrapper_fn=lambda m: checkpoint_wrapper(m, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=lambda m: isinstance(m, Block))


# --- the systems: each returns a step function (x, y) -> loss tensor, after its setup -------


def setup_hetrain(spec: RunSpec, device: torch.device, result: RunResult):
    from hetrain.errors import ConfigError
    from hetrain.offload import OptimConfig, apply_plan
    from hetrain.predict.profiler import ProfileOptions
    from hetrain.train.job import job_cost, profile_job
    from hetrain.train.offload_planning import plan_offload_for

    cfg = hetrain_config(spec, device)
    profile, _, _ = profile_job(cfg, ProfileOptions(collectives=False, reps=6))
    cost = job_cost(cfg, profile)
    dtype_bytes = 2 if device.type == "cuda" else 4
    budget = None
    if spec.cap_bytes is not None:
        budget = spec.cap_bytes - transient_bytes(cfg.model, spec.micro_batch, spec.seq_len, dtype_bytes)
        if budget <= 0:
            raise torch.OutOfMemoryError("the cap leaves no room once the logits' transients are set aside")
    try:
        plan = plan_offload_for(cfg, budget, spec.host_budget_bytes, cost)
    except ConfigError as e:  # no plan fits: the same verdict as running out of memory
        raise torch.OutOfMemoryError(f"no plan fits: {str(e).split(';')[0]}") from None
    result.notes.update(plan=plan.summary(), plan_budget_bytes=budget, predicted_step_s=plan.predicted_step_s,
                        predicted_peak_bytes=plan.predicted_peak_device_bytes)
    model = build_model(cfg.model, spec.fast_init)
    result.params = sum(p.numel() for p in model.parameters())
    optim = OptimConfig(WEIGHT_DECAY, *BETAS, EPS, cpu_threads=torch.get_num_threads())
    engine = apply_plan(model, plan, optim, device, torch.bfloat16 if device.type == "cuda" else torch.float32,
                        trace=bool(spec.trace_dir))

    waits = result.notes.setdefault("weight_wait_s", [])

    def step(x, y):
        stats = engine.train_step([(x, y)], LR, CLIP)
        waits.append(round(stats.weight_wait_s, 4))
        return stats.loss

    def close():
        if engine.trace is not None and spec.trace_dir:
            from hetrain.trace import plot_timeline, write_chrome_trace

            write_chrome_trace(engine.trace, Path(spec.trace_dir) / "engine_trace.json",
                               metadata={"source": "bench/gpu/systems.py", "plan": plan.summary()})
            plot_timeline(engine.trace, Path(spec.trace_dir) / "engine_timeline.png",
                          title=f"hetrain engine, {plan.summary()}")
        engine.close()

    return step, engine.synchronize, close


def setup_fsdp2(spec: RunSpec, device: torch.device, result: RunResult):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    single_rank_env()
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    cfg = hetrain_config(spec, device)
    model = build_model(cfg.model, spec.fast_init)
    result.params = sum(p.numel() for p in model.parameters())
    checkpoint_blocks(model)
    mesh = init_device_mesh(device.type, (1,))
    kwargs = {"mesh": mesh}
    if device.type == "cuda":
        kwargs.update(mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
                      offload_policy=CPUOffloadPolicy(pin_memory=True))
    else:
        result.notes["cpu"] = "FSDP2 on the CPU: fp32, no offload policy (there is no device to offload from)"
    for block in model.blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    # Under CPUOffloadPolicy the fp32 shards stay in pinned host memory (fully_shard moves the
    # buffers to the GPU); the optimizer below therefore steps on the CPU.
    opt = torch.optim.AdamW(decay_groups(list(model.named_parameters())), lr=LR, betas=BETAS, eps=EPS, fused=True)

    def step(x, y):
        loss = model(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step, lambda: torch.cuda.synchronize() if device.type == "cuda" else None, dist.destroy_process_group


def setup_deepspeed(spec: RunSpec, device: torch.device, result: RunResult, stage: int):
    try:
        import deepspeed
    except ImportError as e:
        raise RuntimeError(f"skipped: DeepSpeed is not installed here ({e}); docs/gpu.md says how to carry it")
    single_rank_env()
    cuda = device.type == "cuda"
    if not cuda:
        result.notes["cpu"] = "DeepSpeed's CPU accelerator over gloo: the code path, not a figure"
    offload = {"device": "cpu", "pin_memory": cuda}
    zero = {"stage": stage, "offload_optimizer": offload, "overlap_comm": True, "contiguous_gradients": True,
            "reduce_bucket_size": int(2e8)}
    if stage == 2:
        zero["allgather_bucket_size"] = int(2e8)
    else:
        zero.update(offload_param=offload, stage3_prefetch_bucket_size=int(2e8),
                    stage3_param_persistence_threshold=int(1e5), stage3_max_live_parameters=int(1e9))
    ds_config = {
        "train_micro_batch_size_per_gpu": spec.micro_batch, "gradient_accumulation_steps": 1,
        "gradient_clipping": CLIP, "bf16": {"enabled": True}, "zero_optimization": zero,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "betas": list(BETAS), "eps": EPS,
                                                  "weight_decay": WEIGHT_DECAY}},
        "steps_per_print": 10**9, "wall_clock_breakdown": False,
    }
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    cfg = hetrain_config(spec, device)
    model = build_model(cfg.model, spec.fast_init)
    result.params = sum(p.numel() for p in model.parameters())
    checkpoint_blocks(model)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=decay_groups(list(model.named_parameters())),
                                           config=ds_config)
    result.notes["deepspeed"] = deepspeed.__version__
    result.notes["optimizer"] = type(engine.optimizer.optimizer if hasattr(engine.optimizer, "optimizer")
                                     else engine.optimizer).__name__

    def step(x, y):
        loss = engine(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
        engine.backward(loss)
        engine.step()
        return loss.detach()

    def close():
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()

    return step, torch.cuda.synchronize if cuda else (lambda: None), close


def profile_one_step(step, sync, batch, device: torch.device, trace_dir: Path, system: str) -> dict:
    """One more step under torch.profiler: wall time, the device's busy time (the sum of its
    kernels' own times, copies included) and their ratio; the trace, gzipped, into trace_dir."""
    import gzip
    import shutil

    from torch.profiler import ProfilerActivity, profile

    trace_dir.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync()
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        step(*batch)
        sync()
        wall_s = time.perf_counter() - start
    busy_us = sum(getattr(e, "self_device_time_total", 0) for e in prof.key_averages())
    raw = trace_dir / f"{system}_torch_trace.json"
    prof.export_chrome_trace(str(raw))
    with open(raw, "rb") as src, gzip.open(f"{raw}.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    raw.unlink()
    return {"wall_s": wall_s, "device_busy_s": busy_us / 1e6, "device_busy_share": busy_us / 1e6 / wall_s,
            "trace": f"{raw.name}.gz"}


def setup(spec: RunSpec, device: torch.device, result: RunResult):
    if spec.system == "hetrain":
        return setup_hetrain(spec, device, result)
    if spec.system == "fsdp2-offload":
        return setup_fsdp2(spec, device, result)
    return setup_deepspeed(spec, device, result, stage=2 if spec.system == "zero2-offload" else 3)


def run(spec: RunSpec) -> RunResult:
    """Set up the system, train warmup + steps steps, time the last `steps`."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = RunResult(spec.system, cap_bytes=spec.cap_bytes, device=(torch.cuda.get_device_name(device)
                       if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"))
    if device.type == "cuda" and spec.cap_bytes is not None:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, spec.cap_bytes / total), device.index or 0)
        torch.cuda.reset_peak_memory_stats(device)
    close = None
    t0 = time.perf_counter()
    try:
        cfg = hetrain_config(spec, device)
        result.n_layer = cfg.model.n_layer
        step, sync, close = setup(spec, device, result)
        result.setup_s = time.perf_counter() - t0
        data = batches(cfg.model.vocab_size, spec.micro_batch, spec.seq_len, spec.warmup + spec.steps)
        for x, y in data[:spec.warmup]:
            result.losses.append(float(step(x, y)))
        sync()
        start = time.perf_counter()
        losses = [step(x, y) for x, y in data[spec.warmup:]]
        sync()
        elapsed = time.perf_counter() - start
        result.losses += [float(l) for l in losses]
        result.step_s = elapsed / spec.steps
        result.tokens_per_s = spec.micro_batch * spec.seq_len * spec.steps / elapsed
        result.ok = all(math.isfinite(l) for l in result.losses) or spec.fast_init
        if not result.ok:
            result.error = f"non-finite loss: {result.losses}"
        elif spec.trace_dir:
            result.notes["profiled_step"] = profile_one_step(step, sync, data[-1], device, Path(spec.trace_dir),
                                                             spec.system)
    except torch.OutOfMemoryError as e:
        result.oom, result.error = True, f"out of memory: {str(e).splitlines()[0][:300]}"
    except Exception as e:  # noqa: BLE001 - every failure is a row of the report, with its reason
        msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
        result.oom = "out of memory" in msg.lower()
        result.error = msg if msg.startswith("skipped") else f"{type(e).__name__}: {msg}"
        if not msg.startswith("skipped"):
            traceback.print_exc()
    finally:
        if device.type == "cuda":
            result.max_allocated_bytes = torch.cuda.max_memory_allocated(device)
        if close is not None:
            try:
                close()
            except Exception:  # noqa: BLE001 - the result stands; closing is best effort
                traceback.print_exc()
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--system", choices=SYSTEMS, required=True)
    p.add_argument("--model", default="{}", help="JSON object of hetrain model.* overrides")
    p.add_argument("--micro-batch", type=int, required=True)
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--cap-gib", type=float, default=None, help="GPU memory cap in GiB (none: no cap)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--profile-dir", default=os.path.expanduser("~/.cache/hetrain/profiles"))
    p.add_argument("--fast-init", action="store_true")
    p.add_argument("--host-budget-gib", type=float, default=None)
    p.add_argument("--trace-dir", help="profile one more step with torch.profiler into this folder "
                   "(and, for hetrain, write the engine's own trace)")
    p.add_argument("--json", help="write the result here")
    a = p.parse_args(argv)
    spec = RunSpec(a.system, json.loads(a.model), a.micro_batch, a.seq_len,
                   None if a.cap_gib is None else int(a.cap_gib * 2**30), a.steps, a.warmup, a.profile_dir,
                   a.fast_init, None if a.host_budget_gib is None else int(a.host_budget_gib * 2**30),
                   a.trace_dir)
    result = asdict(run(spec))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=1))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
