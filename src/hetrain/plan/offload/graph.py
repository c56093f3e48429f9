"""An offload plan's training step as a simulator task graph, and the per-layer prices behind it.

`layer_terms` prices every layer once (bytes held on the device and the host under each
placement, seconds of each task) from the model description and the cost model; the offload
planner's MILP (offload_milp.py) and `build_offload_graph` both read these same terms, so the
linear model and the simulator cannot drift apart on a coefficient. The byte rules are the
offload engine's own (footprint.check_footprint, predict/state_bytes.py, the DeviceLedger
categories). `build_offload_graph` replays what the engine does for two consecutive steps, on
the resources "compute", "h2d", "d2h" and "cpu_optim": forward and backward per micro-batch,
weight fetches through the engine's buffer pool with its prefetch rule (replayed on task
names by `_Buffers`), recomputation before a recomputed block's backward, gradient offload
and host accumulation, the CPU updates served lowest layer first, uploads of updated weights,
and the next step's forward waiting for each layer's update (cross-iteration overlap). The
steady-state step time is the time between the two steps' returns. This module prices and
builds graphs; it must not choose placements (the planner does) or run a model.
"""

from __future__ import annotations

from dataclasses import dataclass

from hetrain.errors import ConfigError
from hetrain.model.describe import ModelDescription
from hetrain.plan.offload.plan import OffloadPlan
from hetrain.predict.cost import CostModel
from hetrain.predict.simulator import SimResult, Task
from hetrain.predict.state_bytes import (ACCUMULATE_TRAFFIC_BYTES_PER_PARAM, ADAM_TRAFFIC_BYTES_PER_PARAM,
                                         GRAD_BYTES_PER_PARAM, MASTER_BYTES_PER_PARAM, adam_state_bytes,
                                         device_optimizer_bytes, host_layer_bytes)
from hetrain.predict.step_graph import DEVICE, HOST, StateBytes, StepGraph, state_bytes, transient_bytes
from hetrain.trace import task_name

FP32_BYTES = 4
ALIGN_SLACK_ELEMENTS = 15
"""hetrain.offload.weights packs a layer's parameters into one flat with each parameter starting
on a 16-element boundary (ALIGN_ELEMENTS), so a flat holds at most 15 padding elements per
parameter tensor; the terms use that bound."""
COMPUTE, H2D, D2H, CPU_OPTIM = "compute", "h2d", "d2h", "cpu_optim"

Choice = tuple[tuple[int, int, int], ...]
"""Per layer (recompute, stream weights, CPU optimizer) as 0/1, embedding first, head last."""


@dataclass(frozen=True)
class StepSettings:
    """How the engine runs a step, as far as its time and memory depend on it."""

    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    clip: bool = True
    """Global-norm clipping: CPU updates wait for every gradient (engine docstring)."""
    overlap: bool = True
    """Cross-iteration overlap: a step returns before the CPU updates have landed."""
    async_copies: bool = True
    """Copies on their own streams (a GPU). False on a CPU device: a copy runs on the thread
    that asks for it (fetches and gradient offload on the main thread, uploads in the worker)."""
    weight_buffers: int = 2
    prefetch_depth: int = 1
    compute_dtype_bytes: int = 2
    tied_embeddings: bool = False

    @property
    def fp32(self) -> bool:
        return self.compute_dtype_bytes == FP32_BYTES

    @property
    def pinned(self) -> bool:
        """The engine pins host stores and gradient staging on CUDA only."""
        return self.async_copies


@dataclass(frozen=True)
class LayerTerms:
    """One layer's bytes and seconds; times are per micro-batch unless they say otherwise."""

    name: str
    params: int
    tensors: int
    flat_numel: int
    """Upper bound of the engine's flat length (parameters plus alignment padding)."""
    saved_keep_bytes: int
    """Saved for backward per micro-batch when activations are kept."""
    saved_recompute_bytes: int
    """Held per micro-batch when recomputed: the block's input (the engine's ledger counts
    nothing here; the input is real device memory, so the planner counts it)."""
    recompute_bytes: int
    """What a recomputed block saves again while its backward runs."""
    fwd_s: float
    bwd_s: float
    recompute_s: float
    optim_device_s: float
    """AdamW on the device, per step (without the per-call cost)."""
    optim_host_s: float
    """Fused AdamW on the CPU plus the layer's own optimizer call, per step."""
    host_accumulate_s: float
    """Adding one micro-batch's gradient into the fp32 host accumulator (and its norms)."""
    device_accumulate_s: float
    """Adding a later micro-batch's gradient into the held device gradient."""
    h2d_s: float
    """Copying the compute-dtype weights host to device (a fetch or an upload)."""
    d2h_s: float
    """Copying a compute-dtype gradient (or refreshed weights) device to host."""
    compute_bytes: int
    fetches_per_microbatch: int
    """Fetches a streamed layer costs per micro-batch (the planner's conservative count)."""
    transient_bytes: int = 0
    """Held only while the layer's backward runs, beyond what it saved (the head's fp32
    gradients on a GPU: hetrain.predict.step_graph.transient_bytes)."""

    @property
    def is_block(self) -> bool:
        return self.name.startswith("block.")

    @property
    def adam_bytes(self) -> int:
        """exp_avg, exp_avg_sq and a step counter per tensor (fused AdamW's state)."""
        return adam_state_bytes(self.params, self.tensors)

    @property
    def grad_bytes(self) -> int:
        """The fp32 gradient a device-optimised layer holds from its backward to the update."""
        return GRAD_BYTES_PER_PARAM * self.flat_numel

    def host_optim_bytes(self, settings: StepSettings) -> int:
        """The HostLayer's bytes (predict/state_bytes.host_layer_bytes, one process)."""
        return host_layer_bytes(self.flat_numel, self.tensors, settings.compute_dtype_bytes, settings.pinned)

    def device_state_bytes(self, stream: int, cpu_optim: int, settings: StepSettings) -> int:
        """Device bytes held for good (footprint.check_footprint): fp32 masters and Adam state of a
        device-optimised layer, the compute copy of a resident one (in fp32 the master is it)."""
        device_optim = 1 - cpu_optim
        if settings.fp32:
            return (MASTER_BYTES_PER_PARAM * self.flat_numel * (1 - stream * cpu_optim)
                    + device_optim * self.adam_bytes)
        return (device_optim * device_optimizer_bytes(self.flat_numel, self.params, self.tensors)
                + (1 - stream) * self.compute_bytes)

    def host_state_bytes(self, stream: int, cpu_optim: int, settings: StepSettings) -> int:
        """Host bytes: the weight store of a streamed device-optimised layer, or the HostLayer."""
        return stream * (1 - cpu_optim) * self.compute_bytes + cpu_optim * self.host_optim_bytes(settings)

    def grad_transient_bytes(self, stream: int, cpu_optim: int, settings: StepSettings) -> int:
        """A managed layer's compute-dtype gradient, held while its hook moves it."""
        managed = 1 if not settings.fp32 else stream + cpu_optim - stream * cpu_optim
        return managed * self.compute_bytes


def _copy_s(cost: CostModel, n_bytes: int, direction: str, async_copies: bool) -> float:
    """A pinned copy's time. On a CPU device, where no link was measured, a copy is a memcpy
    priced from the CPU Adam rate: Adam moves ADAM_TRAFFIC_BYTES_PER_PARAM per parameter, a copy reads
    and writes each byte once."""
    try:
        return cost.copy_s(n_bytes, direction, pinned=True)
    except ConfigError:
        if async_copies:
            raise
        return cost.optimizer_s(round(2 * n_bytes / ADAM_TRAFFIC_BYTES_PER_PARAM), 1, "host")


def layer_terms(desc: ModelDescription, cost: CostModel, settings: StepSettings) -> list[LayerTerms]:
    """Prices of every layer (embedding, blocks, head) of `desc` under `cost`."""
    b = desc.compute_dtype_bytes
    terms = []
    for layer in desc.layers():
        kind = "block" if layer.name.startswith("block.") else layer.name
        tensors = layer.tensors
        flat = layer.params + ALIGN_SLACK_ELEMENTS * tensors
        optim_host_s = cost.optimizer_s(layer.params, tensors, "host")
        fetches = {"block": 2, "head": 1, "embedding": 2 if settings.tied_embeddings else 1}[kind]
        terms.append(LayerTerms(
            name=layer.name, params=layer.params, tensors=tensors, flat_numel=flat,
            saved_keep_bytes=layer.act_bytes_total,
            saved_recompute_bytes=desc.embedding.boundary_bytes if kind == "block" else layer.act_bytes_total,
            recompute_bytes=layer.act_bytes_total if kind == "block" else 0,
            fwd_s=cost.fwd_s(layer), bwd_s=cost.bwd_s(layer),
            recompute_s=cost.recompute_s(layer) if kind == "block" else 0.0,
            optim_device_s=cost.optimizer_s(layer.params, tensors, "device"),
            optim_host_s=optim_host_s + cost.optimizer_call_s("host"),
            host_accumulate_s=optim_host_s * ACCUMULATE_TRAFFIC_BYTES_PER_PARAM / ADAM_TRAFFIC_BYTES_PER_PARAM,
            device_accumulate_s=cost.grad_accumulate_s(layer.params, tensors),
            h2d_s=_copy_s(cost, flat * b, "h2d", settings.async_copies),
            d2h_s=_copy_s(cost, flat * b, "d2h", settings.async_copies),
            compute_bytes=flat * b, fetches_per_microbatch=fetches,
            transient_bytes=transient_bytes(desc, cost, layer)))
    return terms


def choice_of(plan: OffloadPlan) -> Choice:
    return tuple((int(l.act == "recompute"), int(l.weights == "host"), int(l.optim == "host")) for l in plan.layers)


def plan_of(choice: Choice, **settings) -> OffloadPlan:
    plan = OffloadPlan.resident(len(choice) - 2, **settings)
    for layer, (r, s, c) in zip(plan.layers, choice):
        layer.act = "recompute" if r else "keep"
        layer.weights = "host" if s else "device"
        layer.optim = "host" if c else "device"
    return plan


# --- the graph ------------------------------------------------------------------------------


class _Buffers:
    """The engine's WeightStreamer replayed on task names: which use fetches which layer into
    which buffer, and which compute task last released that buffer (the copy waits for it)."""

    def __init__(self, n_buffers: int):
        self.occupant: list[int | None] = [None] * n_buffers
        self.holds = [0] * n_buffers
        self.pending = [False] * n_buffers
        self.last_use = [0] * n_buffers
        self.released_by: list[str | None] = [None] * n_buffers
        self.clock = 0

    def where(self, layer: int) -> int | None:
        for i, occupant in enumerate(self.occupant):
            if occupant == layer:
                return i
        return None

    def victim(self, demand: bool) -> int | None:
        free = [i for i in range(len(self.occupant)) if self.holds[i] == 0 and (demand or not self.pending[i])]
        if not free:
            return None
        return min(free, key=lambda i: (self.pending[i], self.occupant[i] is not None, self.last_use[i]))

    def take(self, i: int, layer: int) -> None:
        self.occupant[i] = layer

    def hold(self, i: int) -> None:
        self.holds[i] += 1
        self.pending[i] = False
        self.clock += 1
        self.last_use[i] = self.clock

    def release(self, layer: int, by: str) -> None:
        i = self.where(layer)
        self.holds[i] -= 1
        if self.holds[i] == 0:
            self.released_by[i] = by

    def invalidate(self) -> None:
        for i in range(len(self.occupant)):
            if self.holds[i] == 0:
                self.occupant[i], self.pending[i] = None, False


class _Builder:
    """Emits the tasks of consecutive steps in the engine's program order."""

    def __init__(self, prices: OffloadPrices, choice: Choice):
        self.prices, self.terms, self.choice, self.settings = prices, prices.terms, choice, prices.settings
        terms, settings = self.terms, self.settings
        self.tasks: list[Task] = []
        self.prev: str | None = None  # the main thread's last compute task
        self.k = 0  # the step being built
        self.buffers = _Buffers(settings.weight_buffers)
        self.fetched_by: dict[int, str] = {}
        self.landing: dict[int, str] = {}  # layer -> task after which its weights are current
        # On a CPU device the worker thread shares the cores with the main thread.
        self.worker = CPU_OPTIM if settings.async_copies else COMPUTE
        self.fetches = 0
        self.order = 0.0  # copy priority: issue order, so the h2d queue serves the next use first
        last = len(terms) - 1
        self.reads = [[l] for l in range(len(terms))]
        if settings.tied_embeddings:
            self.reads[last].append(0)  # the head multiplies by the embedding matrix
        # The streamer's schedule: uses of streamed weights in forward, then backward in reverse
        # (the embedding's backward reads no weights).
        self.streamed_reads = [[r for r in reads if choice[r][1]] for reads in self.reads]
        self.uses = ([("fwd", l) for l in range(len(terms)) if self.streamed_reads[l]]
                     + [("bwd", l) for l in range(last, 0, -1) if self.streamed_reads[l]])
        self.use_index = {use: i for i, use in enumerate(self.uses)}

    def compute(self, name: str, duration_s: float, cat: str, deps=(), alloc: int = 0, free: int = 0,
                layer: int | None = None) -> str:
        chain = (self.prev,) if self.prev else ()
        args = {"step": self.k} if layer is None else {"layer": self.terms[layer].name, "step": self.k}
        self.tasks.append(Task(name, COMPUTE, duration_s, tuple(d for d in (*chain, *deps) if d), cat=cat,
                               alloc={DEVICE: alloc} if alloc else {}, free={DEVICE: free} if free else {},
                               args=args))
        self.prev = name
        return name

    def copy(self, name: str, duration_s: float, lane: str, deps, layer: int) -> str:
        """A copy on its own stream (async), else on the main thread's chain."""
        if not self.settings.async_copies:
            return self.compute(name, duration_s, lane, deps, layer=layer)
        self.order += 1
        chain = (self.prev,) if self.prev else ()
        self.tasks.append(Task(name, lane, duration_s, tuple(d for d in (*chain, *deps) if d), priority=self.order,
                               cat=lane, args={"layer": self.terms[layer].name, "step": self.k}))
        return name

    # --- streamed weights ------------------------------------------------------------------
    def _fetch(self, layer: int, i: int, tag: str) -> None:
        old = self.buffers.occupant[i]
        if old is not None:
            self.fetched_by.pop(old, None)
        self.buffers.take(i, layer)
        deps = (self.buffers.released_by[i], self.landing.get(layer))
        self.fetches += 1
        self.fetched_by[layer] = self.copy(f"{task_name('fetch', self.terms[layer].name)} @{tag}.{self.fetches}",
                                           self.terms[layer].h2d_s, H2D, deps, layer)

    def acquire(self, phase: str, layer: int, tag: str, wrap: bool) -> list[str]:
        """Demand fetches, holds, then the prefetch of the next uses; the fetch tasks to wait for."""
        streamed = self.streamed_reads[layer]
        for flat in streamed:
            i = self.buffers.where(flat)
            if i is None:
                i = self.buffers.victim(demand=True)
                self._fetch(flat, i, tag)
            self.buffers.hold(i)
        waits = [self.fetched_by[flat] for flat in streamed]
        if streamed and self.settings.prefetch_depth:
            pos = self.use_index[(phase, layer)]
            for j in range(pos + 1, pos + 1 + self.settings.prefetch_depth):
                if j >= len(self.uses) and not wrap:
                    break
                ahead = self.streamed_reads[self.uses[j % len(self.uses)][1]]
                if not all(self._prefetch(flat, tag) for flat in ahead):
                    break
        return waits

    def _prefetch(self, flat: int, tag: str) -> bool:
        if self.buffers.where(flat) is not None:
            return True
        i = self.buffers.victim(demand=False)
        if i is None:
            return False
        self._fetch(flat, i, f"{tag}.pre")
        self.buffers.pending[i] = True
        return True

    def release(self, layer: int, by: str) -> None:
        for flat in self.streamed_reads[layer]:
            self.buffers.release(flat, by)

    # --- one step ----------------------------------------------------------------------------
    def step(self, k: int) -> str:
        self.k = k  # every task of this step carries it in its args
        t, ch, st = self.terms, self.choice, self.settings
        last = len(t) - 1
        grads_held = 0
        host_done: dict[int, str] = {}
        for mb in range(st.grad_accum):
            tag, wrap = f"{k}.mb{mb}", mb < st.grad_accum - 1
            for l in range(len(t)):
                waits = self.acquire("fwd", l, f"{tag}.fwd", wrap)
                if mb == 0:
                    waits += [self.landing[r] for r in self.reads[l] if not ch[r][1] and r in self.landing]
                r = ch[l][0]
                saved = t[l].saved_recompute_bytes if r else t[l].saved_keep_bytes
                name = self.compute(task_name("fwd", t[l].name, mb, step=k), t[l].fwd_s, "fwd", waits, alloc=saved, layer=l)
                self.release(l, name)
            for l in range(last, -1, -1):
                r, s, c = ch[l]
                if l < last:
                    self.release(l + 1, self.prev)
                waits = self.acquire("bwd", l, f"{tag}.bwd", wrap) if l > 0 else []
                if r:
                    self.compute(task_name("recompute", t[l].name, mb, step=k), t[l].recompute_s, "recompute", waits,
                                 alloc=t[l].recompute_bytes, layer=l)
                saved = (t[l].saved_recompute_bytes + t[l].recompute_bytes) if r else t[l].saved_keep_bytes
                accumulate = t[l].device_accumulate_s if mb and not c else 0.0
                # A device-optimised layer's gradient is held from the start of its first backward
                # (the engine's count), while its saved tensors are freed only as the backward ends.
                grad = t[l].grad_bytes if not c and mb == 0 else 0
                grads_held += grad
                bwd = self.compute(task_name("bwd", t[l].name, mb, step=k), t[l].bwd_s + accumulate, "bwd", waits,
                                   alloc=grad + t[l].transient_bytes, free=saved + t[l].transient_bytes, layer=l)
                if c:
                    host_done[l] = self._offload_grad(k, mb, l, bwd)
                    if not st.clip and mb == st.grad_accum - 1:
                        self._update(k, l, (host_done[l],))
        # The global norm needs every host layer's last gradient; the clipped updates start after it.
        norm = self.compute(task_name("norm", step=k), self.prices.norm_s, "sync", tuple(host_done.values()))
        self.buffers.invalidate()
        if st.clip:
            for l in sorted(host_done):
                self._update(k, l, (norm,))
        device_optim_s = self.prices.device_optim_call_s + sum(t[l].optim_device_s for l in range(len(t))
                                                               if not ch[l][2])
        optim = self.compute(task_name("optim", step=k), device_optim_s, "optim")
        for l in range(len(t)):
            if ch[l][1] and not ch[l][2]:  # the updated master goes back into the host store
                self.landing[l] = self.copy(task_name("refresh", t[l].name, step=k), t[l].d2h_s, D2H, (optim,), l)
        self.compute(task_name("zero_grad", step=k), 0.0, "optim", free=grads_held)
        pending = [] if st.overlap else [n for l, n in self.landing.items() if ch[l][1] or ch[l][2]]
        return self.compute(task_name("end", step=k), 0.0, "sync", tuple(pending))

    def _offload_grad(self, k: int, mb: int, l: int, bwd: str) -> str:
        """The gradient to the host and into its fp32 accumulator: a copy stream then the worker
        (GPU), or both on the main thread (CPU device)."""
        t = self.terms[l]
        if not self.settings.async_copies:
            return self.compute(task_name("grad_to_host", t.name, mb, step=k), t.host_accumulate_s, "d2h", layer=l)
        copy = self.copy(task_name("grad_to_host", t.name, mb, step=k), t.d2h_s, D2H, (bwd,), l)
        name = task_name("accumulate", t.name, mb, step=k)
        self.tasks.append(Task(name, self.worker, t.host_accumulate_s, (copy,), priority=2 * l, cat="accumulate",
                               args={"layer": t.name, "step": k}))
        return name

    def _update(self, k: int, l: int, deps: tuple[str, ...]) -> None:
        """The layer's CPU update (worker, lowest layer first), then the upload of a resident copy."""
        t, s = self.terms[l], self.choice[l][1]
        sync_upload = 0.0 if s or self.settings.async_copies else t.h2d_s
        name = task_name("update", t.name, step=k)
        self.tasks.append(Task(name, self.worker, t.optim_host_s + sync_upload, deps, priority=2 * l + 1,
                               cat="optim", args={"layer": t.name, "step": k}))
        self.landing[l] = name
        if not s and self.settings.async_copies:  # uploads go first on the copy stream
            self.landing[l] = task_name("upload", t.name, step=k)
            self.tasks.append(Task(self.landing[l], H2D, t.h2d_s, (name,), priority=-1e9 + l, cat="h2d",
                                   args={"layer": t.name, "step": k}))


@dataclass(frozen=True)
class OffloadPrices:
    """Everything the planner and the step graph price a plan with, for one model and batch."""

    terms: list[LayerTerms]
    settings: StepSettings
    norm_s: float
    """The global gradient norm (clip_grad_norm_'s cost), every step."""
    device_optim_call_s: float
    """The device AdamW's per-call overhead (two parameter groups), every step."""
    model_buffers_bytes: int
    """The model's own buffers (rotary tables), kept on the device."""
    state: StateBytes
    """The plain plan's state, carried by the StepGraph for reading."""

    def static_device_bytes(self, choice: Choice) -> int:
        """Bytes on the device before any activation: layer state plus the weight buffer pool."""
        largest = max((t.compute_bytes for t, (_, s, _) in zip(self.terms, choice) if s), default=0)
        return (self.model_buffers_bytes + self.settings.weight_buffers * largest
                + sum(t.device_state_bytes(s, c, self.settings) for t, (_, s, c) in zip(self.terms, choice)))

    def host_bytes(self, choice: Choice) -> int:
        return sum(t.host_state_bytes(s, c, self.settings) for t, (_, s, c) in zip(self.terms, choice))


def offload_prices(desc: ModelDescription, cost: CostModel, settings: StepSettings) -> OffloadPrices:
    """Price every layer of `desc` and the step's fixed work under `cost`."""
    terms = layer_terms(desc, cost, settings)
    state = state_bytes(desc)
    return OffloadPrices(terms, settings, norm_s=cost.clip_s(desc.total_params, sum(t.tensors for t in terms)),
                         device_optim_call_s=2 * cost.optimizer_call_s("device"),
                         model_buffers_bytes=state.buffers_bytes, state=state)


@dataclass
class OffloadSimulation:
    step_s: float
    """Steady-state step time: from the first step's return to the second's."""
    peak_device_bytes: int
    host_bytes: int
    layer_compute_s: dict[str, float]
    """Seconds of main-thread work per layer in the second step."""
    sim: SimResult
    graph: StepGraph


def build_offload_graph(prices: OffloadPrices, choice: Choice, steps: int = 2) -> StepGraph:
    """`steps` consecutive training steps of the plan `choice`, starting with every weight current."""
    builder = _Builder(prices, choice)
    for k in range(steps):
        builder.step(k)
    base = {DEVICE: prices.static_device_bytes(choice), HOST: prices.host_bytes(choice)}
    return StepGraph(builder.tasks, base, prices.state)


def simulate_offload(prices: OffloadPrices, choice: Choice) -> OffloadSimulation:
    """Simulate two steps of the plan and return the steady-state figures."""
    graph = build_offload_graph(prices, choice)
    sim = graph.simulate()
    end = {e.name: e.end_s for e in sim.events}
    per_layer: dict[str, float] = {}
    for e in sim.events:
        if e.lane == COMPUTE and e.args.get("step") == 1 and "layer" in e.args:
            per_layer[e.args["layer"]] = per_layer.get(e.args["layer"], 0.0) + e.dur_s
    return OffloadSimulation(step_s=end[task_name("end", step=1)] - end[task_name("end", step=0)], peak_device_bytes=sim.peak_bytes[DEVICE],
                             host_bytes=graph.base_bytes[HOST], layer_compute_s=per_layer, sim=sim, graph=graph)
