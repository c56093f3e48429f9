"""The offload engine: runs training steps of a language model under an OffloadPlan on one device.

`apply_plan(model, plan, optim_cfg, device)` takes a freshly built fp32 model (hetrain's GPT or
a transformers causal LM: anything with hetrain.model.stack's block interface) and returns an
OffloadEngine that owns it until `close()`. Per layer, the parameters become either plain fp32
device parameters (a "native" layer: weights and optimizer on the device, fp32 compute, no
extra work) or a flat compute-dtype copy, resident or streamed (weights.py), with fp32 masters
and Adam state on the device or on the host (cpu_optim.py); chosen blocks recompute their
activations (checkpointing.py). The plan is resolved into per-layer records (layers.py) and
its static bytes checked before anything moves (footprint.py); the state of record is read,
loaded and given back to the model at close by state.py. `train_step(batches, lr, grad_clip)`
is one optimizer step with gradient accumulation and global-norm clipping, giving the losses
and parameters of the textbook loop (fused AdamW, weight decay on matrices only,
clip_grad_norm_). Every byte held on the device is counted (checkpointing.DeviceLedger) and
the plan's budget is enforced. The engine drives the layers itself through the block interface
(`model.embed_inputs`, `model.block_forward` on each of `model.blocks`, `model.head`): it must
not know a model's class, and nothing else may call the model meanwhile.

Global-norm clipping needs every gradient before any update. The norms of host-optimised
layers are taken on the host as their last gradient lands, the others' when backward ends;
with grad_clip > 0 the CPU updates start once the global norm is known, lowest layer first.
The cost: no CPU update overlaps the backward of its own step (the next step's forward still
overlaps the updates of deeper layers). With grad_clip <= 0 a layer's CPU update starts the
moment its last gradient lands, during backward. Either way the arithmetic is
clip_grad_norm_'s, so results do not depend on the choice.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from hetrain.model.stack import check_stack
from hetrain.offload.checkpointing import DeviceLedger, LayerActivations, apply_recompute
from hetrain.offload.cpu_optim import CpuOptimizerWorker, HostLayer, OptimConfig, make_adamw, set_lr
from hetrain.offload.footprint import check_footprint, check_weight_buffers
from hetrain.offload.layers import Layer, resolve_layers
from hetrain.offload.sharded import DataParallel, ShardedHostLayer
from hetrain.offload.state import gather_state, give_back_model, load_state
from hetrain.offload.weights import Binding, DeviceMaster, FlatWeights, WeightStreamer, host_empty, install, uninstall
from hetrain.plan.offload.plan import OffloadPlan
from hetrain.trace import TraceEvent, task_name


@dataclass
class StepStats:
    loss: float
    """Sum over micro-batches of loss / n_micro (the trainer's logged loss)."""
    grad_norm: float
    """Global gradient norm before clipping."""
    peak_device_bytes: int
    """Peak accounted device bytes during this step."""
    step_s: float
    weight_wait_s: float
    """Time spent waiting for weights: updates of the previous step to land and, where
    copies are synchronous (CPU), fetches of streamed weights."""


def apply_plan(model: nn.Module, plan: OffloadPlan, optim_cfg: OptimConfig, device: torch.device | str,
               compute_dtype: torch.dtype = torch.float32, trace: bool = False,
               data_parallel: DataParallel | None = None) -> "OffloadEngine":
    """Apply `plan` to `model` (fp32, unmodified, with the block interface) and return the engine
    that trains it.

    The order is fixed, each step relying on the one before:
    1. check the plan against the model, the device budget and host RAM, before anything is
       allocated or moved, so a plan that cannot run leaves the model untouched;
    2. placement: native parameters move to the device; managed layers get their flat compute
       copy, fp32 masters and host stores, and their module attributes become views; every
       later step refers to parameters where they finally live;
    3. optimizers: fused AdamW on the device over native parameters and device masters, one per
       host-optimised layer on the host, and the worker thread that runs those;
    4. gradient hooks on the flat compute copies (native parameters need none: their
       gradients are counted from the start of their layer's backward);
    5. recomputation, last and innermost: it wraps only the block's own forward, so a
       recompute re-runs the block's math and none of the engine's fetch or release work,
       which the backward hooks do once per layer.
    Activations are counted per micro-batch in `train_step` (checkpointing.LayerActivations).
    `trace=True` records what ran as TraceEvents in `engine.trace` (lanes compute, h2d, d2h, cpu_optim).
    With `data_parallel` (DataParallel.create() on every rank) gradients are averaged across
    ranks and host optimizer state is sharded (sharded.py); every rank must apply the same plan
    to the same initial model, and call train_step, state_dict and close together.
    """
    return OffloadEngine(model, plan, optim_cfg, torch.device(device), compute_dtype, trace, data_parallel)


class OffloadEngine:
    """Runs training steps of one model under one plan; see `apply_plan`."""

    def __init__(self, model, plan, optim_cfg, device, compute_dtype, trace, data_parallel=None):
        check_stack(model, "the offload engine")
        if compute_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"compute dtype {compute_dtype} is not supported: use torch.float32 or torch.bfloat16 "
                             f"(fp16 would need loss scaling, which the engine does not do)")
        plan.validate(len(model.blocks))
        self.model, self.plan, self.optim_cfg, self.device, self.dtype = model, plan, optim_cfg, device, compute_dtype
        self.dp = data_parallel
        self.cuda = device.type == "cuda"
        self.streams = {"h2d": torch.cuda.Stream(device), "d2h": torch.cuda.Stream(device)} if self.cuda else {}
        self.trace: list[TraceEvent] | None = [] if trace else None
        self._t0 = time.perf_counter()
        self.step, self._lr, self._wait_s, self._first_micro, self._last_micro = 0, 0.0, 0.0, True, True
        self._micro, self._bwd_start = 0, {}
        self._closed, self._broken, self._handles = False, None, []
        self.layout, self.layers = resolve_layers(model, plan, compute_dtype)
        check_weight_buffers(plan, self.layout, self.layers)  # 1
        self.static_device_bytes = check_footprint(model, plan, self.layers, compute_dtype, device, data_parallel)
        self._place()  # 2
        device_params = [p for l in self.layers if l.native for _, p in l.owned]
        device_params += [v for l in self.layers if l.dev is not None for v in l.dev.views]
        self.device_optimizer = make_adamw(device_params, optim_cfg) if device_params else None  # 3
        self.worker = CpuOptimizerWorker() if any(l.host is not None for l in self.layers) else None
        for layer in self.layers:  # 4
            if not layer.native:
                self._handles.append(layer.flat.param.register_post_accumulate_grad_hook(
                    functools.partial(self._flat_grad, layer)))
        # A native layer's fp32 gradients, counted from its backward's start to the update. A tied
        # matrix is the embedding's: counted from the embedding's backward, though the head's part
        # of its gradient is buffered by autograd from the head's backward on (not counted).
        self._native_grad_bytes = [sum(p.numel() * p.element_size() for _, p in l.owned) if l.native else 0
                                   for l in self.layers]
        self._native_grads_held = 0
        self._recompute = apply_recompute(model.blocks, [l.index - 1 for l in self.layers if l.recompute],
                                          self._on_recompute if trace else None)  # 5
        self._count_device_state()
        self.activations = LayerActivations(self.ledger, len(self.layers), per_tensor=bool(self.streamer.flats))
        # Uses of streamed weights in a micro-batch: forward in order, then backward in reverse
        # (the embedding's backward reads no weights); prefetch walks this list, cyclically.
        self.streamer.schedule = [(("fwd", l.index), l.streamed) for l in self.layers if l.streamed] + \
                                 [(("bwd", l.index), l.streamed) for l in reversed(self.layers[1:]) if l.streamed]
        self._act_bytes: dict[tuple[int, int], int] = {}
        self._threads_before = torch.get_num_threads()
        if optim_cfg.cpu_threads > 0:
            torch.set_num_threads(optim_cfg.cpu_threads)

    # --- setup -------------------------------------------------------------------------------
    def _place(self) -> None:
        """Parameters to their homes: native ones to the device, managed layers into flats."""
        for module in self.model.modules():
            for name, b in module._buffers.items():
                if b is not None:
                    module._buffers[name] = b.to(self.device)
        flats = {}
        for layer in self.layers:
            if layer.native:
                for _, p in layer.owned:
                    p.data = p.data.to(self.device)
                continue
            streamed = layer.plan.weights == "host"
            layer.flat = flat = FlatWeights(layer.name, layer.owned, self.dtype, self.device, streamed)
            values = [p.detach() for _, p in layer.owned]
            if layer.plan.optim == "host":
                layer.host = (ShardedHostLayer(layer.index, flat, values, self.optim_cfg, self.cuda, self.dp, self._record)
                              if self.dp else HostLayer(layer.index, flat, values, self.optim_cfg, self.cuda,
                                                        self._record))
                source = layer.host.upload
            else:
                layer.dev = DeviceMaster(flat, values, self.device)
                source = layer.dev.master
                if streamed:
                    flat.host_store = host_empty(flat.numel, self.dtype, self.cuda)
            with torch.no_grad():
                (flat.host_store if streamed else flat.param.data).copy_(source)
            for j, (_, p) in enumerate(layer.owned):
                flats[id(p)] = (flat, j)
                self.layout.take(p)
                p.data = torch.empty(0)  # the values live in the masters now
        for layer in self.layers:  # every attribute a layer's compute reads from a flat
            layer.bindings = tuple(Binding(module, attr, *flats[pid]) for pid, module, attr in
                                   self.layout.read_by(layer.index) if pid in flats)
            layer.reads = tuple({id(b.flat): b.flat for b in layer.bindings}.values())
            layer.streamed = tuple(f for f in layer.reads if f.streamed)
        streamed = [l.flat for l in self.layers if l.flat is not None and l.flat.streamed]
        self.streamer = WeightStreamer(streamed, self.plan.weight_buffers, self.device, self.streams.get("h2d"),
                                       poll=self._poll, on_copy=self._on_copy)

    def _count_device_state(self) -> None:
        """The ledger starts with everything that now lives on the device for good."""
        self.ledger = DeviceLedger(self.plan.device_budget_bytes, self.device, self.streamer)
        resident = list(self.model.buffers())
        for layer in self.layers:
            resident += [p for _, p in layer.owned] if layer.native else []
            resident += [layer.dev.master] if layer.dev is not None else []
            resident += [layer.flat.param] if layer.flat is not None and not layer.flat.streamed else []
        for t in resident:
            self.ledger.state_ptrs.add(t.untyped_storage().data_ptr())
            self.ledger.add("params", t.untyped_storage().nbytes(), "placing the weights")
        self.ledger.add("weight_buffers", self.streamer.total_bytes, "allocating weight buffers")
        if self.device_optimizer is not None:
            state = sum(t.nbytes for s in self.device_optimizer.state.values() for t in s.values())
            self.ledger.add("optimizer", state, "allocating Adam state on the device")
        self.overall_peak_bytes = self.ledger.peak_bytes

    def _poll(self) -> None:
        if self.worker is not None:
            self.worker.check()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this OffloadEngine is closed; apply the plan again to train")
        if self._broken is not None:
            raise RuntimeError(f"an earlier step failed ({self._broken!r}) and left the engine mid-step; close() it "
                               f"and apply the plan again") from self._broken

    # --- tracing -----------------------------------------------------------------------------
    def _record(self, name: str, lane: str, start_s: float, end_s: float, cat: str, step: int | None = None) -> None:
        if self.trace is not None:
            step = self.step if step is None else step
            self.trace.append(TraceEvent(name, lane, start_s - self._t0, end_s - self._t0, cat, {"step": step}))

    def _on_copy(self, flat: FlatWeights, start_s: float, end_s: float) -> None:
        self._record(task_name("fetch", flat.name), "h2d", start_s, end_s, "h2d")

    def _on_recompute(self, block: int, start_s: float, end_s: float) -> None:
        self._record(task_name("recompute", f"block.{block}", self._micro), "compute", start_s, end_s, "recompute")
        self._bwd_start[block + 1] = end_s  # the layer's backward proper starts after its recomputation

    def _record_bwd(self, index: int) -> None:
        start = self._bwd_start.pop(index, None)
        if start is not None:
            self._record(task_name("bwd", self.layers[index].name, self._micro), "compute", start,
                         time.perf_counter(), "bwd")

    # --- one layer, forward ------------------------------------------------------------------
    def _compute_stream(self):
        return torch.cuda.current_stream(self.device) if self.cuda else None

    def _copy_fences(self) -> tuple:
        return (self._compute_stream(), self.streams["h2d"]) if self.cuda else ()

    def _acquire(self, layer: Layer, phase: str) -> None:
        """Wait for the layer's weights (updates landed, streamed copies fetched), fetch ahead."""
        start = time.perf_counter()
        for flat in layer.reads:
            if not flat.streamed:
                flat.landing.wait(self._compute_stream(), self._poll)
        self.streamer.acquire(layer.streamed, self._compute_stream())
        self._wait_s += time.perf_counter() - start
        self.streamer.prefetch_after((phase, layer.index), self.plan.prefetch_depth, wrap=not self._last_micro)

    def _run(self, index: int, fn, *args):
        """Layer `index`'s forward, fn(*args), with its weights installed; returns what fn does
        (the embedding stage returns the hidden states and the blocks' extras)."""
        layer = self.layers[index]
        self._acquire(layer, "fwd")
        start = time.perf_counter()
        install(layer.bindings)
        out = fn(*args)
        uninstall(layer.bindings)
        self.streamer.release(layer.streamed, self._compute_stream())
        self._record(task_name("fwd", layer.name, self._micro), "compute", start, time.perf_counter(), "fwd")
        h = out[0] if isinstance(out, tuple) else out
        if h.requires_grad:
            self.activations.forward_done(index, layer.name)
            # The node that made the output runs first in this layer's backward (a tensor hook
            # would do the same through ~20 us more of Python per layer).
            h.grad_fn.register_prehook(functools.partial(self._backward_begins, index))
        return out

    # --- one layer, backward (pre-hooks on the node of each layer's output) ------------------
    def _backward_begins(self, index: int, grad_outputs: tuple) -> None:
        if index + 1 < len(self.layers):
            self._backward_ends(index + 1)  # this output is the next layer's input: its backward is over
        if self.trace is not None:
            self._bwd_start[index] = time.perf_counter()
        layer = self.layers[index]
        if self._first_micro and self._native_grad_bytes[index]:
            self._native_grads_held += self._native_grad_bytes[index]
            self.ledger.add("grads", self._native_grad_bytes[index], f"backward of {layer.name}")
        if index == 0:
            return  # the embedding's backward reads token ids, not weights
        if layer.recompute:
            self.ledger.add("recompute", self._recompute_bytes, f"recomputing {layer.name}")
        self._acquire(layer, "bwd")
        if layer.recompute:
            install(layer.bindings)  # the recomputation reads the module's attributes

    def _backward_ends(self, index: int) -> None:
        self._record_bwd(index)
        layer = self.layers[index]
        self.activations.backward_done(index)
        if layer.recompute:
            uninstall(layer.bindings)
            self.ledger.sub("recompute", self._recompute_bytes)
        self.streamer.release(layer.streamed, self._compute_stream())

    # --- gradients ---------------------------------------------------------------------------
    def _flat_grad(self, layer: Layer, leaf: torch.Tensor) -> None:
        """A managed layer's gradient for one micro-batch: into its fp32 accumulator (host or
        device); on the last micro-batch without clipping, its CPU update starts right away."""
        g, leaf.grad = leaf.grad, None
        if self.dp:
            self.dp.average_(g)
        layer.grads_seen += 1
        first, final = layer.grads_seen == 1, layer.grads_seen == self._n_micro
        self.ledger.add("grads", g.nbytes, f"backward of {layer.name}")
        if layer.host is not None:
            layer.host.accumulate(g, first, final, self.worker, self.streams.get("d2h"))
            if final and not self._clip and not self.dp:  # ranks queue their updates in one order: _update
                self._submit_host_update(layer, None)
        else:
            self.ledger.add("grads", layer.dev.accumulate(g, first), f"backward of {layer.name}")
        self.ledger.sub("grads", g.nbytes)

    def _submit_host_update(self, layer: Layer, clip_coef: torch.Tensor | None) -> None:
        layer.host.submit_update(self.worker, self._lr, clip_coef, self.streams.get("h2d"), self.step)

    def _device_grads(self) -> dict[str, torch.Tensor]:
        grads = {}
        for layer in self.layers:
            if layer.native:
                grads.update((name, p.grad) for name, p in layer.owned if p.grad is not None)
            elif layer.dev is not None:
                grads.update((name, v.grad) for (name, _), v in zip(layer.owned, layer.dev.views))
        return grads

    def _global_norm(self, device_grads: dict[str, torch.Tensor]) -> torch.Tensor:
        """clip_grad_norm_'s total: per-parameter 2-norms, stacked in model order, normed."""
        norms = dict(zip(device_grads, torch._foreach_norm(list(device_grads.values()), 2.0))) if device_grads else {}
        host = {}
        for layer in self.layers:
            if layer.host is not None:
                host.update(zip((name for name, _ in layer.owned), layer.host.wait_norms(self.worker)))
        if self.dp and host:  # partial squared norms of each rank's chunks
            squares = torch.stack(list(host.values())).to(self.device)
            dist.all_reduce(squares, group=self.dp.group)
            host = dict(zip(host, squares.sqrt()))
        norms.update(host)
        return torch.linalg.vector_norm(torch.stack([norms[n].to(self.device) for n in self.layout.params
                                                     if n in norms]), 2.0)

    # --- the step ----------------------------------------------------------------------------
    def train_step(self, batches: list[tuple[torch.Tensor, torch.Tensor]], lr: float, grad_clip: float) -> StepStats:
        """One optimizer step over `batches` (micro-batches of token ids and targets, any device).

        Returns after the device update; the CPU updates may still run (plan.overlap), and the
        next step's forward waits for each layer's own update.
        """
        self._check_open()
        if not batches:
            raise ValueError("train_step needs at least one micro-batch")
        start = time.perf_counter()
        self._n_micro, self._lr, self._clip, self._wait_s = len(batches), lr, grad_clip > 0, 0.0
        for layer in self.layers:
            layer.grads_seen = 0
        self.ledger.reset_peak()
        losses = []
        try:
            for m, (x, y) in enumerate(batches):
                self._first_micro, self._last_micro, self._micro = m == 0, m == len(batches) - 1, m
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
                with self.activations.micro_batch(self.activations.key(x, y)):
                    loss = self._forward(x, y) / len(batches)
                    self.activations.backward_starts()
                    loss.backward()
                    self._record_bwd(0)  # the embedding's backward ends with backward()
                self.activations.micro_batch_done()
                losses.append(loss.detach())
            grad_norm = self._update(grad_clip)
            if not self.plan.overlap:
                self.synchronize()
        except BaseException as e:
            self._broken = e  # buffers, hooks and gradients are mid-step: no further step is safe
            raise
        self.step += 1
        self.overall_peak_bytes = max(self.overall_peak_bytes, self.ledger.peak_bytes)
        return StepStats(loss=sum(loss.item() for loss in losses), grad_norm=grad_norm.item(),
                         peak_device_bytes=self.ledger.peak_bytes, step_s=time.perf_counter() - start,
                         weight_wait_s=self._wait_s)

    def _forward(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        B, T = x.shape
        limit = self.model.max_seq_len
        if limit is not None and T > limit:
            raise ValueError(f"sequence length {T} exceeds the model's maximum of {limit} (model.max_seq_len, or "
                             f"max_position_embeddings of a Hugging Face config)")
        if (B, T) not in self._act_bytes:  # what a recomputed block saves again during its backward
            self._act_bytes[(B, T)] = self.model.describe(B, T, self.dtype.itemsize).blocks[0].act_bytes_total
        self._recompute_bytes = self._act_bytes[(B, T)]
        model = self.model
        h, extras = self._run(0, model.embed_inputs, x)
        for i, block in enumerate(model.blocks):
            h = self._run(i + 1, model.block_forward, block, h, extras)
        return self._run(len(self.layers) - 1, model.head, h, y)

    def _update(self, grad_clip: float) -> torch.Tensor:
        """Clip, queue the CPU updates (lowest layer first), step the device optimizer."""
        self.streamer.invalidate()
        device_grads = self._device_grads()
        if self.dp:  # managed layers' gradients were averaged as they came
            for layer in self.layers:
                if layer.native:
                    for _, p in layer.owned:
                        if p.grad is not None:
                            self.dp.average_(p.grad)
        total = self._global_norm(device_grads)
        coef = torch.clamp(grad_clip / (total + 1e-6), max=1.0) if self._clip else None
        if coef is not None or self.dp:
            coef_host = coef.to("cpu") if coef is not None else None
            for layer in self.layers:
                if layer.host is not None:
                    self._submit_host_update(layer, coef_host)
        if self.device_optimizer is not None:
            start = time.perf_counter()
            with torch.no_grad():
                if coef is not None and device_grads:
                    torch._foreach_mul_(list(device_grads.values()), coef)
                set_lr(self.device_optimizer, self._lr)
                self.device_optimizer.step()
                for layer in self.layers:
                    if layer.dev is not None:
                        layer.dev.refresh(self.streams.get("d2h"), self._copy_fences())
            self._record(task_name("optim"), "compute", start, time.perf_counter(), "optim")
        for layer in self.layers:  # zero_grad(set_to_none=True) of the device side
            if layer.native:
                for _, p in layer.owned:
                    p.grad = None
            elif layer.dev is not None:
                self.ledger.sub("grads", layer.dev.zero_grad())
        self.ledger.sub("grads", self._native_grads_held)
        self._native_grads_held = 0
        return total

    # --- outside the step --------------------------------------------------------------------
    @property
    def peak_device_bytes(self) -> int:
        """Peak accounted device bytes since the engine was made."""
        return max(self.overall_peak_bytes, self.ledger.peak_bytes)

    def synchronize(self) -> None:
        """Wait until every queued CPU update and device copy has landed."""
        if self.worker is not None:
            self.worker.drain()
        if self.cuda:
            torch.cuda.synchronize(self.device)

    @torch.no_grad()
    def evaluate(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """Mean loss over `batches` with the current weights (waits for pending updates per layer)."""
        self._check_open()
        self._last_micro, self._wait_s, total = True, 0.0, 0.0
        was_training = self.model.training
        self.model.eval()  # as plain evaluation does: no dropout, and no draws from the RNG
        try:
            for x, y in batches:
                total += self._forward(x.to(self.device), y.to(self.device)).item()
        finally:
            self.model.train(was_training)
        return total / len(batches)

    def state_dict(self) -> dict:
        """The full fp32 model and AdamW state by parameter name, after pending updates land,
        in the layout of torch.distributed.checkpoint's get_state_dict (cpu_optim.training_state).
        The tensors are the engine's own: load into them in place (e.g. dcp.load), then call
        load_state_dict to refresh the compute copies."""
        self._check_open()
        self.synchronize()
        return gather_state(self.layers, self.layout, self.device_optimizer, self.optim_cfg, self._lr)

    def load_state_dict(self, state: dict) -> None:
        """Copy a state_dict() (from this engine, another plan, or plain training) into the
        masters and Adam state, and refresh every compute copy."""
        load_state(self.layers, self.layout, self.state_dict(), state, self.dp)
        for layer in self.layers:
            if layer.host is not None:
                layer.host.refresh(self.streams.get("h2d"))
            elif layer.dev is not None:
                layer.dev.refresh(self.streams.get("d2h"), self._copy_fences())
        self.streamer.invalidate()
        self.synchronize()

    def close(self) -> None:
        """Wait for pending updates, stop the worker, remove hooks and wrappers, and give the
        model back as plain fp32 parameters on the CPU holding the trained values."""
        if self._closed:
            return
        self._closed = True
        failure = None
        try:
            self.synchronize()
        except RuntimeError as e:
            failure = e
        if self.worker is not None:
            self.worker.close()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._recompute.remove()
        give_back_model(self.model, self.layers, self.layout, self.device_optimizer)
        if torch.get_num_threads() != self._threads_before:
            torch.set_num_threads(self._threads_before)
        if failure is not None and not (self.worker is not None and self.worker.failed):
            raise failure  # a failed worker was already reported by the step that met it

    def __enter__(self) -> "OffloadEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
