"""The profiler: measures this machine for the performance predictor and caches the figures.

It times what a training step is made of, on the real device and the way the trainer runs
it (per layer forward, backward and recompute under the trainer's autocast and, on CPU, its
memory accountant's hooks; the device optimizer step and gradient clipping), plus the
machine-level rates the planners need (copy bandwidth per direction, pinned and pageable;
fused CPU AdamW parameters/s per thread count; collective bandwidth of the available
backend). Results live in one JSON file per machine under `hardware.profile_dir`, keyed by a
fingerprint (hostname, CPU model, cores, torch version, GPU name) and written atomically. It
must not predict or plan, and it never invents a figure: what it cannot measure on this
machine is recorded as absent, with the reason, in `Profile.unmeasured`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import socket
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hetrain.config import Config
from hetrain.errors import ConfigError
from hetrain.memory import MemoryAccountant
from hetrain.model.gpt import GPT, ModelConfig

PROFILE_VERSION = 1
ADAM_RATE_PARAMS = 1 << 21        # one tensor of 2M fp32 parameters (32 MiB of state + grad)
SMALL_TENSOR_NUMEL = 1024
MANY_TENSORS = 128
COPY_BYTES = 64 << 20
CACHE_FLUSH_BYTES = 64 << 20      # twice the 32 MiB L3 of current server CPUs
COLLECTIVE_SIZES_BYTES = (64 << 10, 1 << 20, 16 << 20)


@dataclass
class LayerTiming:
    """One layer for one micro-batch, timed as the trainer runs it (median of `reps`)."""

    fwd_s: float
    bwd_s: float
    recompute_s: float
    """The forward re-run with autograd recording, as torch.utils.checkpoint does in backward."""
    act_bytes: int
    """Bytes saved for backward, counted by hetrain.memory.MemoryAccountant."""


@dataclass
class ModelProfile:
    """Per-layer timings of one model shape at one micro-batch, sequence length, dtype, thread count."""

    model: dict
    micro_batch: int
    seq_len: int
    dtype: str
    threads: int
    embedding: LayerTiming
    block: LayerTiming
    """Every block of a hetrain GPT has the same shape, so one block stands for all."""
    head: LayerTiming
    """Final norm, output projection and cross-entropy loss."""

    def matches(self, model_cfg: ModelConfig, seq_len: int, dtype: str, threads: int | None) -> bool:
        """Same shape, sequence length and dtype, and `threads` unless it is None."""
        return (self.model == dataclasses.asdict(model_cfg) and self.seq_len == seq_len
                and self.dtype == dtype and threads in (None, self.threads))


@dataclass
class UpdateTiming:
    """Time of a call over a list of tensors: per_call_s + per_tensor_s * tensors + params / params_per_s."""

    per_call_s: float
    per_tensor_s: float
    params_per_s: float

    def seconds(self, params: int, tensors: int, calls: int = 1) -> float:
        return calls * self.per_call_s + tensors * self.per_tensor_s + params / self.params_per_s


@dataclass
class Profile:
    machine: dict
    """Fingerprint: hostname, cpu_model, cores, torch, gpu ('' on a CPU-only machine)."""
    device: str
    """Where the model runs: 'cpu' or the GPU's name."""
    measured_at: str = ""
    copy_bytes_per_s: dict[str, float | None] = field(default_factory=dict)
    """h2d_pinned, h2d_pageable, d2h_pinned, d2h_pageable; None where not measurable."""
    cpu_adam_params_per_s: dict[int, float] = field(default_factory=dict)
    """Fused torch.optim.AdamW on CPU, parameters/s by torch thread count."""
    optimizer: UpdateTiming | None = None
    """The device's fused AdamW step, at the training thread count."""
    clip: UpdateTiming | None = None
    """clip_grad_norm_ over the gradients, including its .item() host sync."""
    collective: dict | None = None
    """{'backend', 'world_size', 'seconds_by_bytes': {bytes: all-reduce seconds}}."""
    unmeasured: dict[str, str] = field(default_factory=dict)
    """Figure -> why it could not be measured here."""
    models: list[ModelProfile] = field(default_factory=list)

    def find_model(self, model_cfg: ModelConfig, micro_batch: int, seq_len: int, dtype: str,
                   threads: int | None) -> ModelProfile | None:
        """The entry for this shape at `micro_batch`, else the one at the nearest micro-batch."""
        same = [m for m in self.models if m.matches(model_cfg, seq_len, dtype, threads)]
        return min(same, key=lambda m: (abs(m.micro_batch - micro_batch), -m.micro_batch), default=None)


@dataclass
class ProfileOptions:
    reps: int = 11
    """Timed repetitions per figure; the median is kept."""
    warmup: int = 3
    collectives: bool = True
    """Measure gloo/NCCL all-reduce between 2 local processes (a few seconds)."""
    remeasure_machine: bool = False
    """Measure the machine-level figures again even when the cache has them."""


# --- machine fingerprint and the cache file ------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def machine_fingerprint() -> dict:
    return {"hostname": socket.gethostname(), "cpu_model": _cpu_model(), "cores": os.cpu_count() or 1,
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""}


def describe_machine(machine: dict) -> str:
    gpu = machine.get("gpu") or "no GPU"
    return (f"{machine.get('hostname')} ({machine.get('cpu_model')}, {machine.get('cores')} cores, "
            f"{gpu}, torch {machine.get('torch')})")


def profile_path(profile_dir: str | os.PathLike, machine: dict) -> Path:
    digest = hashlib.sha256(json.dumps(machine, sort_keys=True).encode()).hexdigest()[:12]
    return Path(os.path.expanduser(os.fspath(profile_dir))) / f"profile-{digest}.json"


def save_profile(profile: Profile, profile_dir: str | os.PathLike) -> Path:
    """Write the profile atomically (temporary file in the same folder, then rename)."""
    path = profile_path(profile_dir, profile.machine)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"version": PROFILE_VERSION, **dataclasses.asdict(profile)}
    fd, tmp = tempfile.mkstemp(prefix=".profile-", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)
    return path


def _from_dict(doc: dict) -> Profile:
    def update(d):
        return UpdateTiming(**d) if d else None

    models = [ModelProfile(**{**m, "embedding": LayerTiming(**m["embedding"]),
                              "block": LayerTiming(**m["block"]), "head": LayerTiming(**m["head"])})
              for m in doc.get("models", [])]
    collective = doc.get("collective")
    if collective:
        collective = {**collective, "seconds_by_bytes": {int(k): v for k, v in
                                                         collective["seconds_by_bytes"].items()}}
    return Profile(
        machine=doc["machine"], device=doc["device"], measured_at=doc.get("measured_at", ""),
        copy_bytes_per_s=dict(doc.get("copy_bytes_per_s", {})),
        cpu_adam_params_per_s={int(k): v for k, v in doc.get("cpu_adam_params_per_s", {}).items()},
        optimizer=update(doc.get("optimizer")), clip=update(doc.get("clip")), collective=collective,
        unmeasured=dict(doc.get("unmeasured", {})), models=models)


def read_profile(path: str | os.PathLike, machine: dict | None = None) -> Profile:
    """Load a profile file; ConfigError when it was measured on another machine than `machine`
    (default: this one), since its timings would describe the wrong hardware."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read profile '{path}': {e}; re-run `hetrain profile`") from None
    if doc.get("version") != PROFILE_VERSION:
        raise ConfigError(f"profile '{path}' has format version {doc.get('version')}, this hetrain "
                          f"reads {PROFILE_VERSION}; re-run `hetrain profile`")
    profile = _from_dict(doc)
    here = machine or machine_fingerprint()
    if profile.machine != here:
        raise ConfigError(f"profile '{path}' was measured on {describe_machine(profile.machine)}, but this "
                          f"is {describe_machine(here)}; re-run `hetrain profile` on this machine")
    return profile


def load_profile(profile_dir: str | os.PathLike, machine: dict | None = None) -> Profile | None:
    """This machine's cached profile, or None when it has none yet."""
    path = profile_path(profile_dir, machine or machine_fingerprint())
    return read_profile(path, machine) if path.is_file() else None


def require_profile(profile_dir: str | os.PathLike, machine: dict | None = None) -> Profile:
    """This machine's profile; ConfigError saying how to make one (and naming the machines whose
    profiles the folder does hold) when there is none."""
    here = machine or machine_fingerprint()
    profile = load_profile(profile_dir, here)
    if profile is not None:
        return profile
    folder = Path(os.path.expanduser(os.fspath(profile_dir)))
    others = []
    for p in sorted(folder.glob("profile-*.json")):
        with contextlib.suppress(OSError, ValueError, KeyError):
            others.append(describe_machine(json.loads(p.read_text(encoding="utf-8"))["machine"]))
    seen = f"; '{folder}' only holds profiles of {', '.join(others)}" if others else ""
    raise ConfigError(f"no profile of this machine, {describe_machine(here)}, in '{folder}'{seen}; run "
                      f"`hetrain profile` with the same --model.* and --train.* settings, or predict for a "
                      f"catalog kind with --hardware.device_kind")


# --- timing helpers ------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_s(fn, device: torch.device, reps: int, warmup: int, before=None) -> float:
    """Median seconds of fn() over `reps` runs after `warmup`; before() runs untimed before each."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if before is not None:
            before()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@dataclass
class _Bench:
    """How layers are timed: device, autocast dtype, accountant, repetitions."""

    device: torch.device
    amp_dtype: torch.dtype | None
    accountant: MemoryAccountant
    track: bool
    reps: int
    warmup: int

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def tracked(self):
        return self.accountant.track_activations() if self.track else contextlib.nullcontext()

    def time_layer(self, forward, grad_out, leaves: list[torch.Tensor], params) -> LayerTiming:
        """forward() -> output; backward with `grad_out` (None for a scalar loss)."""
        fwd, bwd, act = [], [], 0
        for rep in range(self.warmup + self.reps):
            for t in (*leaves, *params):
                t.grad = None
            self.accountant.grads_cleared()
            with self.tracked():
                _sync(self.device)
                t0 = time.perf_counter()
                with self.autocast():
                    out = forward()
                _sync(self.device)
                t1 = time.perf_counter()
                act = self.accountant.act_bytes
                out.backward(grad_out)
                _sync(self.device)
                t2 = time.perf_counter()
            del out
            if rep >= self.warmup:
                fwd.append(t1 - t0)
                bwd.append(t2 - t1)
        if not self.track:  # count the saved bytes once, outside the timed runs
            with self.accountant.track_activations(), self.autocast():
                out = forward()
                act = self.accountant.act_bytes
            del out
        with torch.enable_grad():
            def recompute():
                with self.autocast():
                    forward()
            recompute_s = _median_s(recompute, self.device, self.reps, self.warmup)
        for t in (*leaves, *params):
            t.grad = None
        return LayerTiming(statistics.median(fwd), statistics.median(bwd), recompute_s, int(act))


def profile_model(model_cfg: ModelConfig, micro_batch: int, seq_len: int, dtype: str,
                  device: torch.device, options: ProfileOptions) -> ModelProfile:
    """Time the embedding, one block and the head of `model_cfg` for one micro-batch."""
    torch.manual_seed(0)
    model = GPT(model_cfg).to(device)
    amp = torch.bfloat16 if dtype == "bf16" else None
    acct = MemoryAccountant(model)
    bench = _Bench(device, amp, acct, device.type == "cpu", options.reps, options.warmup)
    try:
        idx = torch.randint(0, model_cfg.vocab_size, (micro_batch, seq_len), device=device)
        with torch.no_grad():
            h0 = model.embed(idx).float()
        h = h0.clone().requires_grad_()   # the residual stream stays fp32 under autocast
        grad_h = torch.randn_like(h0)
        rope, block = model.rope(), model.blocks[0]
        emb_params = [*model.tok_emb.parameters(), *(model.pos_emb.parameters() if model.pos_emb else ())]
        embedding = bench.time_layer(lambda: model.embed(idx), grad_h, [], emb_params)
        block_t = bench.time_layer(lambda: block(h, rope), grad_h, [h], list(block.parameters()))
        head_params = [*model.norm_f.parameters(), model.lm_head.weight]
        head = bench.time_layer(lambda: model.head(h, idx), None, [h], head_params)
    finally:
        acct.close()
    return ModelProfile(dataclasses.asdict(model_cfg), micro_batch, seq_len, dtype, torch.get_num_threads(),
                        embedding, block_t, head)


# --- machine-level figures ----------------------------------------------------------------


def _cache_flusher(device: torch.device):
    """On CPU, a function that evicts the caches by writing CACHE_FLUSH_BYTES: in a training step,
    forward and backward have pushed the optimizer's tensors out of the caches before the
    update, and timing it warm would be up to 2x optimistic for models that fit in L3."""
    if device.type != "cpu":
        return None
    buf = torch.empty(CACHE_FLUSH_BYTES, dtype=torch.uint8)
    return lambda: buf.fill_(1)


def _adam_s(device: torch.device, numels: list[int], reps: int, warmup: int) -> float:
    params = [torch.nn.Parameter(torch.randn(n, device=device)) for n in numels]
    for p in params:
        p.grad = torch.randn_like(p)
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    return _median_s(opt.step, device, reps, warmup, _cache_flusher(device))


def _clip_s(device: torch.device, numels: list[int], reps: int, warmup: int) -> float:
    params = [torch.nn.Parameter(torch.randn(n, device=device)) for n in numels]
    for p in params:
        p.grad = torch.randn_like(p)
    return _median_s(lambda: torch.nn.utils.clip_grad_norm_(params, 1.0).item(), device, reps, warmup,
                     _cache_flusher(device))


def _fit_update(timer, device: torch.device, options: ProfileOptions) -> UpdateTiming:
    """Per-call, per-tensor and per-parameter costs from three shapes of tensor list: one small
    tensor (the call), many small ones (the per-tensor cost), one large one (the rate; its
    call overhead is well under 1% of its time and is left in, erring on the slow side)."""
    reps, warmup = options.reps, options.warmup
    one_small = timer(device, [SMALL_TENSOR_NUMEL], reps, warmup)
    many_small = timer(device, [SMALL_TENSOR_NUMEL] * MANY_TENSORS, reps, warmup)
    one_large = timer(device, [ADAM_RATE_PARAMS], reps, warmup)
    params_per_s = ADAM_RATE_PARAMS / one_large
    per_tensor_s = max(0.0, (many_small - one_small) / (MANY_TENSORS - 1) - SMALL_TENSOR_NUMEL / params_per_s)
    per_call_s = max(0.0, one_small - per_tensor_s - SMALL_TENSOR_NUMEL / params_per_s)
    return UpdateTiming(per_call_s, per_tensor_s, params_per_s)


def _cpu_adam_curve(options: ProfileOptions) -> dict[int, float]:
    before = torch.get_num_threads()
    rates = {}
    try:
        for threads in range(1, (os.cpu_count() or 1) + 1):
            torch.set_num_threads(threads)
            rates[threads] = ADAM_RATE_PARAMS / _adam_s(torch.device("cpu"), [ADAM_RATE_PARAMS],
                                                        options.reps, options.warmup)
    finally:
        torch.set_num_threads(before)
    return rates


def _copy_rates(device: torch.device, options: ProfileOptions) -> dict[str, float]:
    dev = torch.empty(COPY_BYTES, dtype=torch.uint8, device=device)
    rates = {}
    for kind, pinned in (("pinned", True), ("pageable", False)):
        host = torch.empty(COPY_BYTES, dtype=torch.uint8, pin_memory=pinned)
        for direction, dst, src in (("h2d", dev, host), ("d2h", host, dev)):
            s = _median_s(lambda: dst.copy_(src, non_blocking=pinned), device, options.reps, options.warmup)
            rates[f"{direction}_{kind}"] = COPY_BYTES / s
    return rates


def _allreduce_worker(rank: int, world: int, port: int, out_path: str, reps: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        seconds = {}
        for n_bytes in COLLECTIVE_SIZES_BYTES:
            buf = torch.ones(n_bytes // 4)
            for _ in range(2):
                dist.all_reduce(buf)
            times = []
            for _ in range(reps):
                dist.barrier()
                t0 = time.perf_counter()
                dist.all_reduce(buf)
                times.append(time.perf_counter() - t0)
            seconds[n_bytes] = statistics.median(times)
        if rank == 0:
            Path(out_path).write_text(json.dumps(seconds))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure_collective(options: ProfileOptions, world: int = 2) -> dict:
    """gloo all-reduce between `world` local processes; seconds by message bytes."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "allreduce.json")
        mp.spawn(_allreduce_worker, args=(world, _free_port(), out, options.reps), nprocs=world, join=True)
        seconds = {int(k): v for k, v in json.loads(Path(out).read_text()).items()}
    return {"backend": "gloo", "world_size": world, "seconds_by_bytes": seconds}


def measure_machine(profile: Profile, device: torch.device, options: ProfileOptions) -> None:
    """Fill the machine-level figures of `profile` in place."""
    unmeasured = {}
    profile.cpu_adam_params_per_s = _cpu_adam_curve(options)
    profile.optimizer = _fit_update(_adam_s, device, options)
    profile.clip = _fit_update(_clip_s, device, options)
    if device.type == "cuda":
        profile.copy_bytes_per_s = _copy_rates(device, options)
    else:
        profile.copy_bytes_per_s = {k: None for k in ("h2d_pinned", "h2d_pageable", "d2h_pinned", "d2h_pageable")}
        for k in profile.copy_bytes_per_s:
            unmeasured[f"copy.{k}"] = "no accelerator: this machine has no host-device link to copy over"
    if options.collectives:
        profile.collective = measure_collective(options)
    elif profile.collective is None:
        unmeasured["collective"] = "skipped (--no-collectives)"
    if device.type == "cuda":
        unmeasured["collective.nccl"] = "one GPU per node here; the gloo figure is host-to-host only"
    profile.unmeasured = unmeasured
    profile.measured_at = time.strftime("%Y-%m-%dT%H:%M:%S")


def run_profile(cfg: Config, options: ProfileOptions | None = None) -> tuple[Profile, ModelProfile, Path]:
    """Measure `cfg`'s model at its micro-batch, sequence length and dtype on this machine (and the
    machine-level figures when the cache lacks them), merge into the cache, save it."""
    from hetrain.train.trainer import pick_device

    options = options or ProfileOptions()
    device = pick_device(cfg.run.device)
    machine = machine_fingerprint()
    before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(cfg.run.threads or os.cpu_count() or 1)
    try:
        profile = load_profile(cfg.hardware.profile_dir, machine)
        if profile is None:
            profile = Profile(machine=machine, device="cpu" if device.type == "cpu" else machine["gpu"])
        if options.remeasure_machine or profile.optimizer is None or (options.collectives and not profile.collective):
            measure_machine(profile, device, options)
        entry = profile_model(cfg.model, cfg.train.micro_batch, cfg.train.seq_len, cfg.train.dtype, device, options)
    finally:
        torch.set_num_threads(before)
    profile.models = [m for m in profile.models if not (
        m.matches(cfg.model, entry.seq_len, entry.dtype, entry.threads) and m.micro_batch == entry.micro_batch)]
    profile.models.append(entry)
    return profile, entry, save_profile(profile, cfg.hardware.profile_dir)


def format_profile(profile: Profile, entry: ModelProfile | None = None) -> str:
    """A table of the figures, and a list of what could not be measured and why."""
    lines = [f"machine: {describe_machine(profile.machine)}; measured {profile.measured_at}"]
    if entry is not None:
        lines += [f"model {entry.model['preset']} (n_layer={entry.model['n_layer']}, d_model="
                  f"{entry.model['d_model']}), micro_batch={entry.micro_batch}, seq_len={entry.seq_len}, "
                  f"dtype={entry.dtype}, threads={entry.threads}",
                  f"  {'layer':<10} {'fwd ms':>9} {'bwd ms':>9} {'recompute ms':>13} {'saved MiB':>10}"]
        for name, t in (("embedding", entry.embedding), ("block", entry.block), ("head+loss", entry.head)):
            lines.append(f"  {name:<10} {t.fwd_s * 1e3:9.3f} {t.bwd_s * 1e3:9.3f} {t.recompute_s * 1e3:13.3f} "
                         f"{t.act_bytes / 2**20:10.2f}")
    for label, u in (("device AdamW step", profile.optimizer), ("clip_grad_norm_", profile.clip)):
        if u is not None:
            lines.append(f"{label}: {u.params_per_s / 1e6:.1f} M params/s, {u.per_tensor_s * 1e6:.1f} us/tensor, "
                         f"{u.per_call_s * 1e6:.1f} us/call")
    if profile.cpu_adam_params_per_s:
        curve = ", ".join(f"{t} thr {r / 1e6:.0f}M/s" for t, r in sorted(profile.cpu_adam_params_per_s.items()))
        lines.append(f"CPU fused AdamW: {curve}")
    for name, rate in profile.copy_bytes_per_s.items():
        lines.append(f"copy {name}: " + (f"{rate / 1e9:.2f} GB/s" if rate else "not measured"))
    if profile.collective:
        c = profile.collective
        sizes = ", ".join(f"{b / 2**20:g} MiB {b / s / 1e9:.2f} GB/s"
                          for b, s in sorted(c["seconds_by_bytes"].items()))
        lines.append(f"all-reduce ({c['backend']}, {c['world_size']} processes, algorithm bandwidth): {sizes}")
    if profile.unmeasured:
        lines.append("not measured on this machine:")
        lines += [f"  {k}: {why}" for k, why in profile.unmeasured.items()]
    return "\n".join(lines)
