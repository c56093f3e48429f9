"""The cost model: the duration and the bytes of every task of a training step.

Two sources stand behind one interface. `ProfileCost` reads this machine's profile (per
layer forward/backward/recompute times and saved bytes, the optimizer, clipping and gradient
accumulation rates, copy and collective bandwidth); `RooflineCost` derives the same figures
for a catalog device kind from its datasheet with the roofline of predict/roofline.py (each
matmul on the kind's matmul curve, attention as its own kernel, element-wise work at the
memory bandwidth), the one the cluster planner prices layers with too. Planners and the step graph ask only this interface, so a plan is costed the
same way whether the hardware was measured or looked up. The `Profile` dataclasses are
defined here too: they are the contract between what hetrain.predict.profiler measures and
what this module reads. This module only prices tasks: it must not measure (the profiler
does), build graphs or schedule (step_graph and the simulator do).

Micro-batch scaling: a profile entry measured at micro-batch m prices micro-batch m' by
multiplying its times and saved bytes by m'/m. Time is close to linear in the batch once
the matmuls are large enough to fill the device; saved bytes are linear except a few
batch-independent tensors (position ids, the loss scalar, the step's bf16 weight copies).
`hetrain profile` measures the configured micro-batch, where no scaling applies.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from dataclasses import dataclass, field

from hetrain.errors import ConfigError
from hetrain.hardware.catalog import DeviceKind, get_kind
from hetrain.model.describe import LayerDescription, ModelDescription
from hetrain.model.gpt import ModelConfig
from hetrain.model.spec import ModelSpec
from hetrain.predict.roofline import Efficiency, LayerSeconds, MatmulCurve, curve_for, layer_seconds
from hetrain.predict.state_bytes import (ACCUMULATE_TRAFFIC_BYTES_PER_PARAM, ADAM_TRAFFIC_BYTES_PER_PARAM,
                                         CLIP_TRAFFIC_BYTES_PER_PARAM, FP32_BYTES, adam_traffic_bytes,
                                         weight_copy_traffic_bytes)



# --- the profile: what the profiler measures (hetrain.predict.profiler) and ProfileCost reads ---


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

    def matches(self, model_cfg: ModelConfig | dict, seq_len: int, dtype: str, threads: int | None) -> bool:
        """Same layer shapes (a ModelConfig, or a ModelSpec.key(); any number of blocks: the profiler
        times one), sequence length and dtype, and `threads` unless it is None."""
        key = model_cfg if isinstance(model_cfg, dict) else dataclasses.asdict(model_cfg)
        return (_shape(self.model) == _shape(key) and self.seq_len == seq_len and self.dtype == dtype
                and threads in (None, self.threads))


def _shape(model: dict) -> dict:
    """A model key without what does not change one layer's timing: the preset's name and the
    number of blocks (hetrain's n_layer; a Hugging Face config's own layer count)."""
    if "hf_config" in model:
        return {"hf_config": {k: v for k, v in model["hf_config"].items()
                              if k not in ("num_hidden_layers", "n_layer", "num_layers")}}
    return {k: v for k, v in model.items() if k not in ("preset", "n_layer")}


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
    grad_accumulate: UpdateTiming | None = None
    """Adding a micro-batch's gradients into the held ones (AccumulateGrad after the first)."""
    collective: dict | None = None
    """{'backend', 'world_size', 'seconds_by_bytes': {bytes: all-reduce seconds}}."""
    matmul: dict | None = None
    """The device's GEMM time as a line, seconds = flops * s_per_flop + overhead_s, fitted to
    square matmuls of several sizes in `dtype`: {'dtype', 's_per_flop', 'overhead_s',
    'points': [[flops, seconds], ...]} (hetrain.predict.roofline turns it into a curve)."""
    unmeasured: dict[str, str] = field(default_factory=dict)
    """Figure -> why it could not be measured here."""
    models: list[ModelProfile] = field(default_factory=list)

    def find_model(self, model_cfg: ModelConfig | dict, micro_batch: int, seq_len: int, dtype: str,
                   threads: int | None) -> ModelProfile | None:
        """The entry for this shape at `micro_batch`, else the one at the nearest micro-batch."""
        same = [m for m in self.models if m.matches(model_cfg, seq_len, dtype, threads)]
        return min(same, key=lambda m: (abs(m.micro_batch - micro_batch), -m.micro_batch), default=None)


# --- the cost model ---------------------------------------------------------------------


def layer_kind(layer: LayerDescription) -> str:
    """'embedding', 'block' or 'head': the unit the profiler measures."""
    return "block" if layer.name.startswith("block.") else layer.name


class CostModel:
    """What every cost source answers. Times are seconds for one micro-batch of `desc`."""

    source: str = ""

    @property
    def on_gpu(self) -> bool:
        """Whether the priced device is a GPU: then copies have their own streams, and device
        memory is what the caching allocator holds, transients included (see
        hetrain.model.describe.head_backward_transient_bytes)."""
        raise NotImplementedError

    def fwd_s(self, layer: LayerDescription) -> float:
        raise NotImplementedError

    def bwd_s(self, layer: LayerDescription) -> float:
        raise NotImplementedError

    def recompute_s(self, layer: LayerDescription) -> float:
        raise NotImplementedError

    def act_bytes(self, layer: LayerDescription) -> int:
        """Bytes the layer saves for backward per micro-batch."""
        raise NotImplementedError

    def optimizer_s(self, params: int, tensors: int, on: str = "device") -> float:
        """AdamW update of `params` parameters in `tensors` tensors, without the per-call cost."""
        raise NotImplementedError

    def optimizer_call_s(self, on: str = "device") -> float:
        raise NotImplementedError

    def clip_s(self, params: int, tensors: int) -> float:
        """One clip_grad_norm_ call over all gradients, including its host sync."""
        raise NotImplementedError

    def weight_copy_s(self, params: int) -> float:
        """The step's compute-dtype copy of `params` fp32 weights (hetrain.precision; 0 in fp32)."""
        raise NotImplementedError

    def grad_accumulate_s(self, params: int, tensors: int) -> float:
        """Adding one micro-batch's gradients into held ones (every micro-batch after the first)."""
        raise NotImplementedError

    def copy_s(self, n_bytes: int, direction: str, pinned: bool = True) -> float:
        """Host<->device copy; direction 'h2d' or 'd2h'."""
        raise NotImplementedError

    def allreduce_s(self, n_bytes: int, world_size: int) -> float:
        raise NotImplementedError


class ProfileCost(CostModel):
    """Prices tasks from this machine's measurements."""

    def __init__(self, desc: ModelDescription, profile: Profile, entry: ModelProfile, cpu_threads: int):
        self.desc, self.profile, self.entry = desc, profile, entry
        self.scale = desc.micro_batch / entry.micro_batch
        self.cpu_threads = cpu_threads
        scaled = "" if self.scale == 1 else f", scaled from micro_batch={entry.micro_batch}"
        self.source = f"profile of {profile.machine.get('hostname')} ({profile.device}{scaled})"

    @property
    def on_gpu(self) -> bool:
        return self.profile.device != "cpu"

    def _timing(self, layer: LayerDescription) -> LayerTiming:
        return getattr(self.entry, layer_kind(layer))

    def fwd_s(self, layer):
        return self._timing(layer).fwd_s * self.scale

    def bwd_s(self, layer):
        return self._timing(layer).bwd_s * self.scale

    def recompute_s(self, layer):
        # The profiler times the whole forward again; torch's early stop skips the trailing
        # matmuls the description names: priced on this machine's measured GEMM line, or, in a
        # profile without one, at their share of the forward FLOPs.
        measured = self._timing(layer).recompute_s * self.scale
        skipped = layer.early_stop_gemms
        if not skipped:
            return measured
        line = self.profile.matmul
        if not line:
            return measured * (1.0 - layer.early_stop_flops_share)
        tokens = self.desc.tokens_per_microbatch
        skip_s = sum(2.0 * tokens * k * n * line["s_per_flop"] + line["overhead_s"] for k, n in skipped)
        return max(0.0, measured - skip_s)

    def act_bytes(self, layer):
        return round(self._timing(layer).act_bytes * self.scale)

    def optimizer_s(self, params, tensors, on="device"):
        if on == "device":
            return self.profile.optimizer.seconds(params, tensors, calls=0)
        rates = self.profile.cpu_adam_params_per_s
        threads = min(rates, key=lambda t: abs(t - self.cpu_threads))
        return params / rates[threads]

    def optimizer_call_s(self, on="device"):
        return self.profile.optimizer.per_call_s

    def weight_copy_s(self, params):
        # Not timed by the profiler: the measured AdamW's rate per byte it moves, for the copy's bytes.
        copy = weight_copy_traffic_bytes(2 if self.entry.dtype == "bf16" else FP32_BYTES)
        return self.profile.optimizer.seconds(params, 1, calls=0) * copy / ADAM_TRAFFIC_BYTES_PER_PARAM

    def clip_s(self, params, tensors):
        return self.profile.clip.seconds(params, tensors)

    def grad_accumulate_s(self, params, tensors):
        return self.profile.grad_accumulate.seconds(params, tensors, calls=0)

    def copy_s(self, n_bytes, direction, pinned=True):
        key = f"{direction}_{'pinned' if pinned else 'pageable'}"
        rate = self.profile.copy_bytes_per_s.get(key)
        if not rate:
            why = self.profile.unmeasured.get(f"copy.{key}", "absent from the profile")
            raise ConfigError(f"copy bandwidth {key} was not measured on this machine ({why}); "
                              f"predict for a GPU kind with --hardware.device_kind")
        return n_bytes / rate

    def allreduce_s(self, n_bytes, world_size):
        c = self.profile.collective
        if not c:
            raise ConfigError("collective bandwidth was not measured; run `hetrain profile` without "
                              "--no-collectives")
        sizes = sorted(c["seconds_by_bytes"])
        seconds = [c["seconds_by_bytes"][b] for b in sizes]
        # Interpolate in log(bytes); beyond the largest size extrapolate at its bandwidth.
        if n_bytes >= sizes[-1]:
            t = seconds[-1] * n_bytes / sizes[-1]
        elif n_bytes <= sizes[0]:
            t = seconds[0]
        else:
            i = bisect.bisect_right(sizes, n_bytes)
            w = (math.log(n_bytes) - math.log(sizes[i - 1])) / (math.log(sizes[i]) - math.log(sizes[i - 1]))
            t = seconds[i - 1] + w * (seconds[i] - seconds[i - 1])
        # A ring moves 2(n-1)/n of the message per rank: rescale from the measured world size.
        measured = c["world_size"]
        return t * (2 * (world_size - 1) / world_size) / (2 * (measured - 1) / measured)


class RooflineCost(CostModel):
    """Prices tasks for a catalog device kind from its datasheet peaks."""

    @property
    def on_gpu(self) -> bool:
        return self._on_gpu

    def __init__(self, desc: ModelDescription, kind: DeviceKind, dtype: str,
                 efficiency: Efficiency = Efficiency(), host: DeviceKind | None = None,
                 curve: MatmulCurve | None = None):
        self.desc, self.kind, self.eff, self.dtype = desc, kind, efficiency, dtype
        self.curve = curve or curve_for(kind)
        self.peak_flops_per_s = kind.peak_flops_per_s(dtype)
        self._on_gpu = kind.name != "cpu"
        self.autocast = dtype == "bf16"  # the trainer's bf16: one bf16 weight copy per step, under autocast
        self.host = host or get_kind("cpu")
        self._layer_s: dict[str, LayerSeconds] = {}
        self.source = f"catalog {kind.name} ({dtype} roofline)"

    def _seconds(self, layer: LayerDescription) -> LayerSeconds:
        key = layer.name if not layer.name.startswith("block.") else "block"
        if key not in self._layer_s:
            self._layer_s[key] = layer_seconds(self.desc, layer, self.kind, self.dtype, self.eff, self.curve)
        return self._layer_s[key]

    def fwd_s(self, layer):
        return self._seconds(layer).fwd_s

    def bwd_s(self, layer):
        return self._seconds(layer).bwd_s

    def recompute_s(self, layer):
        return self._seconds(layer).recompute_s

    def act_bytes(self, layer):
        return layer.act_bytes_total + (self._autocast_extra_bytes(layer) if self.autocast else 0)

    def _autocast_extra_bytes(self, layer: LayerDescription) -> int:
        """What the trainer's bf16 (hetrain.precision) saves beyond the description's layout.
        On CPU, as its memory accountant counts it: the step's bf16 copy of every weight an
        operation saves (the matmuls' and the normalisations'; embeddings save only their
        indices). On a GPU the copy is one allocation for the whole step (the step graph's
        "cast" task holds it), and what is saved beyond it are LayerNorm inputs, statistics and
        weights in fp32 (CUDA's autocast runs layer_norm in fp32; the CPU's runs it in bf16)."""
        d, tokens = self.desc, self.desc.tokens_per_microbatch
        if layer.name == "embedding":
            return 0
        n_norms = 1 if layer.name == "head" else 2
        if self._on_gpu:
            fp32_norm = tokens * d.hidden_size * 2 + tokens * 2 * 2 + d.hidden_size * 4
            return n_norms * fp32_norm if d.norm == "layernorm" else 0
        return layer.matmul_params * 2 + n_norms * d.hidden_size * 2

    def optimizer_s(self, params, tensors, on="device"):
        kind = self.kind if on == "device" else self.host
        return adam_traffic_bytes(params) / (kind.mem_bw_bytes_per_s * self.eff.memory)

    def optimizer_call_s(self, on="device"):
        return self.eff.optimizer_call_s

    def weight_copy_s(self, params):
        copy = weight_copy_traffic_bytes(2 if self.autocast else FP32_BYTES)
        return params * copy / (self.kind.mem_bw_bytes_per_s * self.eff.memory)

    def clip_s(self, params, tensors):
        return (self.eff.optimizer_call_s
                + params * CLIP_TRAFFIC_BYTES_PER_PARAM / (self.kind.mem_bw_bytes_per_s * self.eff.memory))

    def grad_accumulate_s(self, params, tensors):
        return params * ACCUMULATE_TRAFFIC_BYTES_PER_PARAM / (self.kind.mem_bw_bytes_per_s * self.eff.memory)

    def copy_s(self, n_bytes, direction, pinned=True):
        rate = self.kind.host_link_bytes_per_s * self.eff.host_link * (1.0 if pinned else self.eff.pageable)
        return n_bytes / rate

    def allreduce_s(self, n_bytes, world_size, link_bytes_per_s: float | None = None):
        """Ring all-reduce over a link of `link_bytes_per_s` per direction (default: the kind's
        host link, i.e. a host-staged path; pass the cluster file's figure for NVLink/RDMA)."""
        if world_size <= 1:
            return 0.0
        link = link_bytes_per_s or self.kind.host_link_bytes_per_s
        volume = 2 * (world_size - 1) / world_size * n_bytes
        return volume / (link * self.eff.network) + 2 * (world_size - 1) * self.eff.collective_latency_s


def cost_model(spec: ModelSpec, desc: ModelDescription, dtype: str, *, kind_name: str = "", threads: int = 1,
               profile: Profile | None = None, efficiency: Efficiency = Efficiency()) -> CostModel:
    """The cost model of `spec`'s model at `desc`'s batch: the catalog kind `kind_name` when it
    names one, else `profile` (this machine's; ConfigError when it has no entry for this model at
    `threads` threads), else the catalog kind of this machine's first GPU, or the catalog's 'cpu'
    kind on a CPU-only machine."""
    if not kind_name and profile is not None:
        # On CPU the thread count is part of the measurement; on a GPU it hardly matters.
        on_cpu = profile.device == "cpu"
        entry = profile.find_model(spec.key(), desc.micro_batch, desc.seq_len, dtype, threads if on_cpu else None)
        if entry is None:
            raise ConfigError(
                f"the profile of {profile.machine.get('hostname')} has no measurements of {spec.label()} at "
                f"seq_len={desc.seq_len}, dtype={dtype}, threads={threads if on_cpu else 'any'}; run `hetrain profile` "
                f"with the same --model.*, --train.seq_len, --train.dtype and --run.threads")
        return ProfileCost(desc, profile, entry, threads)
    curve = None
    if not kind_name:
        from hetrain.hardware.probe import probe

        kinds = [a.kind for a in probe().accelerators if a.kind]
        kind_name = kinds[0] if kinds else "cpu"
        if profile is not None and profile.matmul:  # this machine's own measured GEMM line
            curve = curve_for(get_kind(kind_name), profile.matmul, dtype)
    return RooflineCost(desc, get_kind(kind_name), dtype, efficiency, curve=curve)
