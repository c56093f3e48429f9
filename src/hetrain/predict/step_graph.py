"""The task graph of one training step, and the predictor that simulates it.

`build_step_graph` turns a model description and a cost model into simulator Tasks for the
plain plan (everything resident on the device), in the order the trainer runs a step: in
bf16 the step's copy of the weights (hetrain.precision); for each micro-batch the forward
of every layer, then the backward in reverse; then gradient
clipping, the optimizer update of every layer and zero_grad. Memory events mirror what
hetrain.memory.MemoryAccountant counts, so the simulated peak is comparable with the
trainer's `peak_device_bytes`: the base is parameters, buffers and (in the steady state,
from step 2 on) AdamW state; a layer's saved activations are allocated when its forward
starts and freed when its backward ends; its gradients are allocated right after its first
backward (a zero-duration `grad.<layer>` task) and freed by zero_grad. The graph is a `StepGraph` with named tasks so that planners
can add tasks and dependencies (weight prefetch, gradient offload, CPU Adam) to the same
graph. This module must not measure or price anything itself (the cost model does) and must
not run a model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hetrain.model import describe
from hetrain.model.describe import LayerDescription, ModelDescription, head_backward_transient_bytes
from hetrain.model.gpt import ModelConfig
from hetrain.predict.cost import CostModel, RooflineCost
from hetrain.predict.simulator import SimResult, Task, simulate
from hetrain.predict.state_bytes import GRAD_BYTES_PER_PARAM, MASTER_BYTES_PER_PARAM, adam_state_bytes
from hetrain.trace import task_name
from hetrain.units import fmt_bytes

FP32_BYTES = 4
DEVICE = "device"
HOST = "host"
COMPUTE = "compute"


def fwd_name(layer: str, micro_batch: int) -> str:
    return task_name("fwd", layer, micro_batch)


def bwd_name(layer: str, micro_batch: int) -> str:
    return task_name("bwd", layer, micro_batch)


def grad_name(layer: str) -> str:
    return task_name("grad", layer)


def optim_name(layer: str) -> str:
    return task_name("optim", layer)


@dataclass(frozen=True)
class StepGraphOptions:
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    steady_state: bool = True
    """AdamW state exists before the step (step 2 onwards). False models the first step, where
    the optimizer allocates its state during the update."""
    optimizer_param_groups: int = 2
    """torch.optim runs its update once per parameter group; the trainer's AdamW has two
    (decayed matrices, and norms/biases without decay)."""


@dataclass(frozen=True)
class StateBytes:
    """What the trainer keeps on its device besides activations (fp32 master weights)."""

    params_bytes: int
    buffers_bytes: int
    grad_bytes_by_layer: dict[str, int]
    adam_bytes_by_layer: dict[str, int]
    """exp_avg and exp_avg_sq (fp32, one element per parameter) and a 4-byte step tensor per
    parameter tensor, as fused torch.optim.AdamW keeps them."""

    @property
    def grads_bytes(self) -> int:
        return sum(self.grad_bytes_by_layer.values())

    @property
    def adam_bytes(self) -> int:
        return sum(self.adam_bytes_by_layer.values())


def param_tensors(cfg: ModelConfig) -> dict[str, int]:
    """Parameter tensors per layer kind of hetrain's GPT (a tied output matrix is the embedding's)."""
    return describe.param_tensors(cfg)


def state_bytes(desc: ModelDescription) -> StateBytes:
    layers = desc.layers()
    return StateBytes(
        params_bytes=desc.total_params * MASTER_BYTES_PER_PARAM,
        buffers_bytes=desc.buffers_bytes,
        grad_bytes_by_layer={ly.name: ly.params * GRAD_BYTES_PER_PARAM for ly in layers},
        adam_bytes_by_layer={ly.name: adam_state_bytes(ly.params, ly.tensors) for ly in layers},
    )


@dataclass
class StepGraph:
    """Tasks of one step with the pools' base bytes; tasks are found and extended by name."""

    tasks: list[Task]
    base_bytes: dict[str, int]
    state: StateBytes
    capacities: dict[str, int] = field(default_factory=dict)

    def task(self, name: str) -> Task:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"no task named {name!r} in the step graph")

    def add(self, task: Task, before: str | None = None) -> None:
        """Append `task`, or insert it before task `before` (list order breaks priority ties)."""
        if before is None:
            self.tasks.append(task)
        else:
            self.tasks.insert(self.tasks.index(self.task(before)), task)

    def add_deps(self, name: str, *deps: str) -> None:
        t = self.task(name)
        t.deps = tuple(dict.fromkeys((*t.deps, *deps)))

    def simulate(self, mem_limit: dict[str, int] | None = None) -> SimResult:
        return simulate(self.tasks, self.capacities, self.base_bytes, mem_limit)


def transient_bytes(desc: ModelDescription, cost: CostModel, layer: LayerDescription) -> int:
    """What `layer`'s backward holds only while it runs, counted where the allocator sees it:
    the head's fp32 gradients on a GPU (see head_backward_transient_bytes); 0 otherwise."""
    if layer.name != "head" or not cost.on_gpu:
        return 0
    return head_backward_transient_bytes(desc.micro_batch, desc.seq_len, desc.vocab_size)


def build_step_graph(desc: ModelDescription, cost: CostModel,
                     options: StepGraphOptions = StepGraphOptions()) -> StepGraph:
    """The plain plan's step: everything resident on the device, run in the trainer's order."""
    if options.grad_accum < 1:
        raise ValueError(f"grad_accum must be at least 1, got {options.grad_accum}")
    layers = desc.layers()
    state = state_bytes(desc)
    base = state.params_bytes + state.buffers_bytes + (state.adam_bytes if options.steady_state else 0)
    tasks: list[Task] = []
    prev: str | None = None

    def add(name: str, duration_s: float, cat: str, alloc: int = 0, free: int = 0, **args) -> None:
        nonlocal prev
        tasks.append(Task(name, COMPUTE, duration_s, deps=(prev,) if prev else (), cat=cat,
                          alloc={DEVICE: alloc} if alloc else {}, free={DEVICE: free} if free else {},
                          args=args))
        prev = name

    copy_s = cost.weight_copy_s(desc.total_params)
    # bf16: the step's one copy of the weights, made before its first forward and dropped after
    # its last backward. On a GPU it is one allocation for that whole time; on CPU the memory
    # accountant counts it where operations save it, in their layers' activations.
    copy_bytes = desc.compute_dtype_bytes * desc.total_params if copy_s > 0 and cost.on_gpu else 0
    if copy_s > 0:
        add(task_name("cast"), copy_s, "cast", alloc=copy_bytes, params=desc.total_params)
    for mb in range(options.grad_accum):
        for layer in layers:
            act = cost.act_bytes(layer)
            add(fwd_name(layer.name, mb), cost.fwd_s(layer), "fwd", alloc=act,
                layer=layer.name, micro_batch=mb, act_bytes=act)
        for layer in reversed(layers):
            act = cost.act_bytes(layer)
            # After the first micro-batch, AccumulateGrad adds into the held gradients.
            accumulate_s = cost.grad_accumulate_s(layer.params, layer.tensors) if mb else 0.0
            transient = transient_bytes(desc, cost, layer)
            add(bwd_name(layer.name, mb), cost.bwd_s(layer) + accumulate_s, "bwd", alloc=transient,
                free=act + transient, layer=layer.name, micro_batch=mb)
            if mb == 0:
                # Autograd releases a node's saved tensors as soon as it has run, before the
                # parameter's AccumulateGrad stores the new gradient: at layer granularity, the
                # gradients appear once the layer's activations are gone. Its duration is in bwd.
                grads = state.grad_bytes_by_layer[layer.name]
                add(grad_name(layer.name), 0.0, "bwd", alloc=grads, layer=layer.name, grad_bytes=grads)
    if copy_bytes:
        add(task_name("release"), 0.0, "cast", free=copy_bytes)
    total_tensors = sum(ly.tensors for ly in layers)
    # The trainer clips every step (an infinite max_norm when train.grad_clip is 0).
    add(task_name("norm"), cost.clip_s(desc.total_params, total_tensors), "sync",
        params=desc.total_params, tensors=total_tensors)
    add(task_name("optim", "call"), cost.optimizer_call_s("device") * options.optimizer_param_groups, "optim",
        param_groups=options.optimizer_param_groups)
    for layer in layers:
        adam = 0 if options.steady_state else state.adam_bytes_by_layer[layer.name]
        add(optim_name(layer.name), cost.optimizer_s(layer.params, layer.tensors, "device"),
            "optim", alloc=adam, layer=layer.name, params=layer.params)
    add(task_name("zero_grad"), 0.0, "optim", free=state.grads_bytes)
    return StepGraph(tasks, {DEVICE: base, HOST: 0}, state)


def build_step_tasks(desc: ModelDescription, cost: CostModel, grad_accum: int = 1,
                     options: StepGraphOptions | None = None) -> list[Task]:
    """The tasks of `build_step_graph`. Simulate them with the graph's base bytes: parameters,
    buffers and AdamW state of `state_bytes(desc)` in the "device" pool (see build_step_graph)."""
    options = options or StepGraphOptions(grad_accum=grad_accum)
    return build_step_graph(desc, cost, options).tasks


@dataclass
class Prediction:
    step_s: float
    peak_device_bytes: int
    """Peak of the bytes MemoryAccountant counts (on a GPU: the tensors hetrain places)."""
    peak_host_bytes: int
    """Host memory the plan holds for the device (offloaded state, pinned buffers); 0 for the
    plain plan."""
    sim: SimResult
    source: str
    """Where the durations come from: this machine's profile or a catalog kind."""
    graph: StepGraph
    tokens: int
    """Tokens of one step (micro-batch x sequence length x micro-batches)."""
    device_memory_bytes: int | None = None
    """The catalog kind's memory when predicting for one; None on the profile path."""

    def memory_breakdown(self) -> dict[str, int]:
        """The device peak split into the base (params, buffers, adam) and what the step adds
        on top at its peak instant (gradients allocated so far and activations in flight)."""
        base = self.graph.base_bytes[DEVICE]
        s = self.graph.state
        adam = base - s.params_bytes - s.buffers_bytes
        return {"params": s.params_bytes, "buffers": s.buffers_bytes, "adam": adam,
                "grads+activations": self.peak_device_bytes - base}


def predict_step(desc: ModelDescription, cost: CostModel, options: StepGraphOptions = StepGraphOptions()) -> Prediction:
    """Predicted steady-state step time and peak memory of the plain plan of `desc`'s model and
    micro-batch, priced by `cost` (a profile's or a catalog kind's, hetrain.predict.cost.cost_model)."""
    graph = build_step_graph(desc, cost, options)
    sim = graph.simulate()
    return Prediction(step_s=sim.step_s, peak_device_bytes=sim.peak_bytes[DEVICE],
                      peak_host_bytes=sim.peak_bytes.get(HOST, 0), sim=sim, source=cost.source, graph=graph,
                      tokens=desc.tokens_per_microbatch * options.grad_accum,
                      device_memory_bytes=cost.kind.memory_bytes if isinstance(cost, RooflineCost) else None)


def format_prediction(pred: Prediction) -> str:
    """Step time, critical path by category, utilisation per resource and peak memory."""
    lines = [f"predicted step: {pred.step_s * 1e3:.2f} ms ({pred.tokens / pred.step_s:,.0f} tokens/s); "
             f"durations from {pred.source}"]
    by_name = {e.name: e for e in pred.sim.events}
    path = pred.sim.critical_path
    per_cat: dict[str, float] = {}
    for name in path:
        e = by_name[name]
        per_cat[e.cat] = per_cat.get(e.cat, 0.0) + e.dur_s
    cats = ", ".join(f"{c} {s * 1e3:.2f} ms ({s / pred.step_s:.0%})" for c, s in per_cat.items()) if path else ""
    lines.append(f"critical path: {len(path)} tasks, {path[0] if path else '-'} -> {path[-1] if path else '-'}; "
                 f"{cats}")
    longest = sorted((by_name[n] for n in path), key=lambda e: -e.dur_s)[:3]
    lines.append("  longest on it: " + ", ".join(f"{e.name} {e.dur_s * 1e3:.2f} ms" for e in longest))
    lines.append("utilisation: " + ", ".join(f"{r} {u:.0%}" for r, u in pred.sim.utilisation.items()))
    parts = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in pred.memory_breakdown().items())
    lines.append(f"peak device memory: {fmt_bytes(pred.peak_device_bytes)} ({parts})")
    if pred.device_memory_bytes and pred.peak_device_bytes > pred.device_memory_bytes:
        lines.append(f"  does NOT fit: the device has {fmt_bytes(pred.device_memory_bytes)}; the plain plan "
                     f"needs checkpointing, offload or more devices")
    lines.append(f"peak host memory held by the plan: {fmt_bytes(pred.peak_host_bytes)}")
    return "\n".join(lines)
