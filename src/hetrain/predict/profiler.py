"""The profiler: measures this machine for the performance predictor and caches the figures.

It times what a training step is made of, on the real device and the way the trainer runs
it (per layer forward, backward and recompute under the trainer's mixed precision and, on CPU, its
memory accountant's hooks; the device optimizer step and gradient clipping), plus the
machine-level rates the planners need (copy bandwidth per direction, pinned and pageable;
fused CPU AdamW parameters/s per thread count; collective bandwidth of the available
backend). Results, in the `Profile` format of hetrain.predict.cost, live in one JSON file per
machine under `hardware.profile_dir` (hetrain.predict.profile_store). It must not predict or
plan, and it never invents a figure: what it cannot measure on this machine is recorded as
absent, with the reason, in `Profile.unmeasured`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from hetrain.memory import MemoryAccountant
from hetrain.model.gpt import GPT
from hetrain.model.spec import BatchShape, ModelSpec
from hetrain.model.describe import ModelDescription
from hetrain.precision import WeightCopies
from hetrain.predict.cost import LayerTiming, ModelProfile, Profile, UpdateTiming
from hetrain.predict.profile_store import load_profile, machine_fingerprint, save_profile

ADAM_RATE_PARAMS = 1 << 21        # one tensor of 2M fp32 parameters (32 MiB of state + grad)
SMALL_TENSOR_NUMEL = 1024
MANY_TENSORS = 64
COPY_BYTES = 64 << 20
CACHE_FLUSH_BYTES = 64 << 20      # twice the 32 MiB L3 of current server CPUs
COLLECTIVE_SIZES_BYTES = (64 << 10, 1 << 20, 16 << 20)


@dataclass
class ProfileOptions:
    reps: int = 12
    """Timed repetitions per figure; the median is kept."""
    warmup: int = 2
    """Untimed runs before each figure's timed ones (per round for layer timings)."""
    rounds: int = 3
    """Layer timings: the layers take turns this many times, reps/rounds repetitions each."""
    collectives: bool = True
    """Measure gloo/NCCL all-reduce between 2 local processes (a few seconds)."""
    remeasure_machine: bool = False
    """Measure the machine-level figures again even when the cache has them."""
    back_to_back: int | None = None
    """Time layers in groups of this many runs issued back to back, one synchronisation per
    group (the figure is the group's time over its size); None: 4 on a GPU, 1 on a CPU. On a
    GPU a layer timed alone, synchronised before and after, also counts the kernel launches
    that training overlaps with the previous layer's kernels: on an H200 (docs/gpu.md) such
    figures summed to 2.7 times a plain step's measured time. A CPU has no launches to hide."""


# --- timing helpers ------------------------------------------------------------------------


def _now(device: torch.device) -> float:
    """perf_counter once the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _median_s(fn, device: torch.device, reps: int, warmup: int, before=None) -> float:
    """Median seconds of fn() over `reps` runs after `warmup`; before() runs untimed before each."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if before is not None:
            before()
        t0 = _now(device)
        fn()
        times.append(_now(device) - t0)
    return statistics.median(times)


@dataclass
class _Bench:
    """How layers are timed: device, autocast dtype, the accountant and whether its hooks run."""

    device: torch.device
    amp_dtype: torch.dtype | None
    accountant: MemoryAccountant
    track: bool
    group: int = 1
    """Runs issued back to back per timing (ProfileOptions.back_to_back)."""

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def sample(self, layer: "_Layer", reps: int, warmup: int, samples: dict[str, list[float]]) -> None:
        """Append `reps` forward, backward and recompute times of `layer` (after `warmup` runs) to
        `samples`; the first run ever also counts the saved bytes, with the accountant's hooks
        even where timed runs go without them (on a GPU, as the trainer does)."""
        if self.group > 1:
            return self._sample_groups(layer, reps, warmup, samples)
        for rep in range(warmup + reps):
            for t in (*layer.leaves, *layer.params):
                t.grad = None
            self.accountant.grads_cleared()
            count = layer.act_bytes is None
            with self.accountant.track_activations() if self.track or count else contextlib.nullcontext():
                t0 = _now(self.device)
                with self.autocast():
                    out = layer.forward()
                t1 = _now(self.device)
                if count:
                    layer.act_bytes = self.accountant.act_bytes
                out.backward(layer.grad_out)
                t2 = _now(self.device)
            del out
            with self.autocast():   # recompute: the forward again, recorded, without the hooks
                layer.forward()
            t3 = _now(self.device)
            if rep >= warmup:
                for key, seconds in (("fwd", t1 - t0), ("bwd", t2 - t1), ("recompute", t3 - t2)):
                    samples.setdefault(key, []).append(seconds)
        for t in (*layer.leaves, *layer.params):
            t.grad = None


    def _sample_groups(self, layer: "_Layer", reps: int, warmup: int, samples: dict[str, list[float]]) -> None:
        """As `sample`, each figure the mean of `group` runs issued back to back: `group`
        forwards (their graphs kept), then their backwards, then `group` recomputations."""
        if layer.act_bytes is None:  # one counted run first, alone, with the hooks
            with self.accountant.track_activations():
                with self.autocast():
                    out = layer.forward()
                layer.act_bytes = self.accountant.act_bytes
                out.backward(layer.grad_out)
            del out
        for rep in range(warmup + reps):
            for t in (*layer.leaves, *layer.params):
                t.grad = None
            self.accountant.grads_cleared()
            t0 = _now(self.device)
            with self.autocast():
                outs = [layer.forward() for _ in range(self.group)]
            t1 = _now(self.device)
            for out in outs:
                out.backward(layer.grad_out)
            t2 = _now(self.device)
            del outs
            with self.autocast():
                for _ in range(self.group):
                    layer.forward()
            t3 = _now(self.device)
            if rep >= warmup:
                for key, seconds in (("fwd", t1 - t0), ("bwd", t2 - t1), ("recompute", t3 - t2)):
                    samples.setdefault(key, []).append(seconds / self.group)
        for t in (*layer.leaves, *layer.params):
            t.grad = None


@dataclass
class _Layer:
    forward: Callable[[], torch.Tensor]
    grad_out: torch.Tensor | None
    """Gradient of the output for backward; None for the scalar loss."""
    leaves: list[torch.Tensor]
    params: list[torch.Tensor]
    act_bytes: int | None = None


def profile_model(spec: ModelSpec, batch: BatchShape, device: torch.device, options: ProfileOptions) -> ModelProfile:
    """Time the embedding, one block and the head of `spec`'s model for one micro-batch of `batch`.

    The layers take turns over `options.rounds` rounds, so that each figure's samples span the
    whole measurement and a burst of another process's work cannot take most of them. The model
    built for it has one block: the blocks are identical, so a model of any depth is profiled in
    the memory of one block, its embedding and its head. Layers run through the block interface
    (hetrain.model.stack), as the offload engine runs them."""
    micro_batch, seq_len, dtype = batch.micro_batch, batch.seq_len, batch.dtype
    torch.manual_seed(0)
    key = spec.key()
    if spec.hf:
        from hetrain.model.hf import build_hf_model, config_from_dict

        model = build_hf_model(config_from_dict(spec.hf["config"]), n_layers=1).to(device)
        model.check_stages()
    else:
        model = GPT(dataclasses.replace(spec.model_config(), n_layer=1)).to(device)
    amp = torch.bfloat16 if dtype == "bf16" else None
    params = _held_parameters(model)
    idx = torch.randint(0, _vocab(model), (micro_batch, seq_len), device=device)
    # As the trainer computes: in bf16 from the step's one bf16 copy of the weights, made here
    # before anything is timed (hetrain.precision), so the residual stream is bf16 too.
    copies = WeightCopies(model, amp)
    copies.make()
    with torch.no_grad(), copies.active():
        h0, extras = model.embed_inputs(idx)
    # The extras (rotary tables, masks) are made once per micro-batch and read by every block:
    # the description counts them with the embedding, so the block's figure leaves them out.
    extra_tensors = [t for t in torch.utils._pytree.tree_leaves(extras) if isinstance(t, torch.Tensor)]
    # On a GPU the step's weight copy is one allocation the step graph holds (not an activation).
    copy_state = copies.tensors() if device.type == "cuda" else []
    acct = MemoryAccountant(model, also_state=extra_tensors + copy_state)
    group = options.back_to_back or (4 if device.type == "cuda" else 1)
    bench = _Bench(device, amp, acct, device.type == "cpu", group)
    try:
        h = h0.clone().requires_grad_()
        grad_h = torch.randn_like(h0)
        block = model.blocks[0]
        layers = {
            "embedding": _Layer(lambda: model.embed_inputs(idx)[0], grad_h, [], params[0]),
            "block": _Layer(lambda: model.block_forward(block, h, extras), grad_h, [h], params[1]),
            "head": _Layer(lambda: model.head(h, idx), None, [h], params[2]),
        }
        samples: dict[str, dict[str, list[float]]] = {name: {} for name in layers}
        rounds = max(1, min(options.rounds, options.reps))
        with copies.active():
            for r in range(rounds):
                for name, layer in layers.items():
                    reps = options.reps // rounds + (1 if r < options.reps % rounds else 0)
                    bench.sample(layer, reps, options.warmup, samples[name])
        # What the block saves of the extras: they are stored once, so counted with the embedding.
        counted = MemoryAccountant(model, also_state=copy_state)
        with counted.track_activations(), bench.autocast(), copies.active():
            out = model.block_forward(block, h, extras)
        extras_bytes = counted.act_bytes - layers["block"].act_bytes
        del out
        counted.close()
    finally:
        acct.close()
    timings = {name: LayerTiming(*(statistics.median(samples[name][k]) for k in ("fwd", "bwd", "recompute")),
                                 act_bytes=int(layers[name].act_bytes) + (extras_bytes if name == "embedding" else 0))
               for name in layers}
    return ModelProfile(key, micro_batch, seq_len, dtype, torch.get_num_threads(), **timings)


def _held_parameters(model) -> list[list[torch.Tensor]]:
    """Per layer (embedding, blocks, head), the parameters its modules hold: a tied output
    matrix is the head's too, so its gradient is cleared before the head's timed backward."""
    held: list[dict[int, torch.Tensor]] = [{} for _ in range(len(model.blocks) + 2)]
    for name, module in model.named_modules():
        for p in module._parameters.values():
            if p is not None:
                held[model.part_of(name)][id(p)] = p
    return [list(layer.values()) for layer in held]


def _vocab(model) -> int:
    return model.cfg.vocab_size if hasattr(model, "cfg") else model.vocab_size


@dataclass(frozen=True)
class ProfileEstimate:
    """What profiling a model would take here, before anything is built."""

    seconds: float
    """Layer timings: warm-up and timed runs of the embedding, one block and the head
    (forward, backward, recompute) at the FLOP rate given."""
    peak_bytes: int
    """The one-block model's weights and gradients, one block's saved activations and the
    head's logits with their gradients (all in fp32)."""


def estimate_profile(desc: ModelDescription, flops_per_s: float,
                     options: ProfileOptions | None = None) -> ProfileEstimate:
    """The time and memory `profile_model` would take for the model and micro-batch of `desc`
    (a description in fp32, compute_dtype_bytes 4), from the description alone."""
    options = options or ProfileOptions()
    layers = (desc.embedding, desc.blocks[0], desc.head)  # the one-block model
    tokens = desc.tokens_per_microbatch
    flops = sum((l.fwd_flops_per_token * 2 + l.bwd_flops_per_token) * tokens for l in layers)
    runs = options.rounds * options.warmup + options.reps
    logits = tokens * desc.vocab_size * 4
    peak = 2 * sum(l.params for l in layers) * 4 + desc.blocks[0].act_bytes_total + 3 * logits
    return ProfileEstimate(runs * flops / flops_per_s, peak)


# --- machine-level figures ----------------------------------------------------------------


def _cache_flusher(device: torch.device):
    """On CPU, a function that evicts the caches: in a training step, forward and backward have
    pushed the optimizer's tensors out before the update; timed warm, it was up to 2x faster."""
    buf = torch.empty(CACHE_FLUSH_BYTES, dtype=torch.uint8) if device.type == "cpu" else None
    return (lambda: buf.fill_(1)) if buf is not None else None


def _update_s(what: str, device: torch.device, numels: list[int], options: ProfileOptions) -> float:
    """Median seconds of a fused AdamW step ('adam'), clip_grad_norm_ ('clip') or a gradient
    accumulation ('accumulate', one in-place add per tensor as AccumulateGrad does) over fresh
    tensors of `numels` elements with gradients, caches flushed before each rep on CPU."""
    params = [torch.nn.Parameter(torch.randn(n, device=device)) for n in numels]
    for p in params:
        p.grad = torch.randn_like(p)
    new_grads = [torch.randn_like(p) for p in params] if what == "accumulate" else []
    if what == "adam":
        fn = torch.optim.AdamW(params, lr=1e-4, fused=True).step
    elif what == "clip":
        def fn():
            torch.nn.utils.clip_grad_norm_(params, 1.0).item()
    else:
        def fn():
            for p, g in zip(params, new_grads):
                p.grad.add_(g)
    return _median_s(fn, device, options.reps, options.warmup, _cache_flusher(device))


def _fit_update(what: str, device: torch.device, options: ProfileOptions) -> UpdateTiming:
    """Per-call, per-tensor and per-parameter costs from three shapes of tensor list: one small
    tensor (the call), many small ones (the per-tensor cost), one large one (the rate; its
    call overhead is well under 1% of its time and is left in, erring on the slow side)."""
    one_small = _update_s(what, device, [SMALL_TENSOR_NUMEL], options)
    many_small = _update_s(what, device, [SMALL_TENSOR_NUMEL] * MANY_TENSORS, options)
    one_large = _update_s(what, device, [ADAM_RATE_PARAMS], options)
    params_per_s = ADAM_RATE_PARAMS / one_large
    per_tensor_s = max(0.0, (many_small - one_small) / (MANY_TENSORS - 1) - SMALL_TENSOR_NUMEL / params_per_s)
    per_call_s = max(0.0, one_small - per_tensor_s - SMALL_TENSOR_NUMEL / params_per_s)
    return UpdateTiming(per_call_s, per_tensor_s, params_per_s)


def _copy_rates(device: torch.device, options: ProfileOptions) -> dict[str, float]:
    dev = torch.empty(COPY_BYTES, dtype=torch.uint8, device=device)
    rates = {}
    for kind, pinned in (("pinned", True), ("pageable", False)):
        host = torch.empty(COPY_BYTES, dtype=torch.uint8, pin_memory=pinned)
        for direction, dst, src in (("h2d", dev, host), ("d2h", host, dev)):
            s = _median_s(lambda: dst.copy_(src, non_blocking=pinned), device, options.reps, options.warmup)
            rates[f"{direction}_{kind}"] = COPY_BYTES / s
    return rates


def _allreduce_worker(rank: int, world: int, port: int, results, reps: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        seconds = {}
        for n_bytes in COLLECTIVE_SIZES_BYTES:
            buf = torch.ones(n_bytes // 4)
            seconds[n_bytes] = _median_s(lambda: dist.all_reduce(buf), torch.device("cpu"), reps, 2,
                                         before=dist.barrier)
        if rank == 0:
            results.put(seconds)
    finally:
        dist.destroy_process_group()


def measure_collective(options: ProfileOptions, world: int = 2) -> dict:
    """gloo all-reduce between `world` local processes; seconds by message bytes."""
    import torch.multiprocessing as mp

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:   # a free localhost port
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_allreduce_worker, args=(world, port, results, options.reps), nprocs=world, join=True)
    return {"backend": "gloo", "world_size": world, "seconds_by_bytes": results.get()}


GEMM_SIZES_GPU = (512, 1024, 2048, 4096, 8192)
GEMM_SIZES_CPU = (64, 128, 256, 512, 1024)


def measure_matmul_line(device: torch.device, dtype: torch.dtype, options: ProfileOptions) -> dict:
    """Square matmuls of several sizes timed back to back (4 per synchronisation); the least
    squares line seconds = flops * s_per_flop + overhead_s through their medians."""
    import numpy as np

    gen = torch.Generator(device=device).manual_seed(0)
    points = []
    for n in GEMM_SIZES_GPU if device.type == "cuda" else GEMM_SIZES_CPU:
        a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
        b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)

        def four():
            for _ in range(4):
                a @ b
        points.append((2.0 * n**3, _median_s(four, device, options.reps, options.warmup) / 4))
    flops, seconds = (np.array(v) for v in zip(*points))
    slope, intercept = np.polyfit(flops, seconds, 1)
    return {"dtype": str(dtype).removeprefix("torch."), "s_per_flop": float(slope),
            "overhead_s": max(0.0, float(intercept)), "points": [[f, s] for f, s in points]}


def measure_machine(profile: Profile, device: torch.device, options: ProfileOptions) -> None:
    """Fill the machine-level figures of `profile` in place (collectives: see measure_collective)."""
    before = torch.get_num_threads()
    try:
        for threads in range(1, (os.cpu_count() or 1) + 1):
            torch.set_num_threads(threads)
            profile.cpu_adam_params_per_s[threads] = ADAM_RATE_PARAMS / _update_s(
                "adam", torch.device("cpu"), [ADAM_RATE_PARAMS], options)
    finally:
        torch.set_num_threads(before)
    profile.matmul = measure_matmul_line(device, torch.bfloat16 if device.type == "cuda" else torch.float32,
                                         options)
    profile.optimizer = _fit_update("adam", device, options)
    profile.clip = _fit_update("clip", device, options)
    profile.grad_accumulate = _fit_update("accumulate", device, options)
    if device.type == "cuda":
        profile.copy_bytes_per_s = _copy_rates(device, options)
    else:
        profile.copy_bytes_per_s = dict.fromkeys(("h2d_pinned", "h2d_pageable", "d2h_pinned", "d2h_pageable"))
        profile.unmeasured.update({f"copy.{k}": "no accelerator: this machine has no host-device link to copy over"
                                   for k in profile.copy_bytes_per_s})
    profile.measured_at = time.strftime("%Y-%m-%dT%H:%M:%S")


def run_profile(spec: ModelSpec, batch: BatchShape, device: torch.device, threads: int, profile_dir: str,
                options: ProfileOptions | None = None) -> tuple[Profile, ModelProfile, Path]:
    """Measure `spec`'s model at `batch`'s micro-batch, sequence length and dtype on `device` with
    `threads` CPU threads (and the machine-level figures when the cache in `profile_dir` lacks
    them), merge into the cache, save it."""
    options = options or ProfileOptions()
    machine = machine_fingerprint()
    before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(threads)
    try:
        profile = load_profile(profile_dir, machine)
        if profile is None:
            profile = Profile(machine=machine, device="cpu" if device.type == "cpu" else machine["gpu"])
        if options.remeasure_machine or profile.grad_accumulate is None or profile.matmul is None:
            measure_machine(profile, device, options)
        if options.collectives and (options.remeasure_machine or profile.collective is None):
            profile.collective = measure_collective(options)
            profile.unmeasured.pop("collective", None)
        elif profile.collective is None:
            profile.unmeasured["collective"] = "skipped (--no-collectives)"
        if torch.cuda.device_count() < 2:
            profile.unmeasured["collective.nccl"] = (f"needs 2 GPUs, this machine has {torch.cuda.device_count()}; "
                                                     "the all-reduce figure is gloo between host processes")
        # Its own RNG stream: a profile made mid-run (a resume with --trace) leaves the run's draws as they were.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            entry = profile_model(spec, batch, device, options)
    finally:
        torch.set_num_threads(before)
    profile.models = [m for m in profile.models if not (
        m.matches(entry.model, entry.seq_len, entry.dtype, entry.threads) and m.micro_batch == entry.micro_batch)]
    profile.models.append(entry)
    return profile, entry, save_profile(profile, profile_dir)
