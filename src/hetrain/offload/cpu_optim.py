"""The CPU optimizer: fp32 master weights and Adam state on the host, updated by a worker thread.

For each layer whose optimizer the plan puts on the host, a HostLayer holds the fp32 master
flat (pinned on CUDA), a gradient accumulator of the same layout, and a
torch.optim.AdamW(fused=True) over views of the master with the trainer's two groups (weight
decay on matrices only). Backward hands it the layer's flat gradient once per micro-batch
(`accumulate`: a device-to-host copy, then fp32 accumulation on the host). The engine then
asks for the update (`submit_update`); one worker thread serves updates from a priority queue,
lowest layer first, so the next step's first layers are ready first while deeper ones are
still updating. After stepping, the worker writes the master into the compute copy that the
device reads (the streamed layer's host store, or the resident device flat) and marks it
landed; every reader waits for that landing, so no forward reads a weight before its update.
The worker never touches the autograd graph, and nothing may read a layer's master, host
store or resident flat between its `submit_update` and its landing. The AdamW construction and
the checkpoint layout of masters and Adam state are shared with the device optimizer.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hetrain.offload.weights import FlatWeights, copy_async, host_empty, slot_views
from hetrain.trace import task_name


@dataclass
class OptimConfig:
    """AdamW hyperparameters shared by the device and host optimizers (lr comes per step)."""

    weight_decay: float = 0.1
    """Decoupled weight decay, applied to matrices (dim >= 2) only."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    cpu_threads: int = 0
    """torch intra-op threads while the engine runs; torch's pool is per process, so the CPU
    optimizer and the host side of the step share it. 0 leaves the current setting."""


def make_adamw(params: list[torch.Tensor], cfg: OptimConfig, decay_flags: list[bool] | None = None
               ) -> torch.optim.AdamW:
    """Fused AdamW with the trainer's two groups, its state made now rather than at the first
    step, so the state's bytes are counted from the start and a checkpoint can load into it.
    Weight decay goes to matrices (dim >= 2), or where `decay_flags` says (pieces of a flat)."""
    flags = decay_flags if decay_flags is not None else [p.dim() >= 2 for p in params]
    decay = [p for p, f in zip(params, flags) if f]
    rest = [p for p, f in zip(params, flags) if not f]
    groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                          {"params": rest, "weight_decay": 0.0}) if g["params"]]
    opt = torch.optim.AdamW(groups, lr=0.0, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)
    for p in params:  # what AdamW's lazy init makes for fused=True
        opt.state[p].update(step=torch.zeros((), dtype=torch.float32, device=p.device),
                            exp_avg=torch.zeros_like(p, memory_format=torch.preserve_format),
                            exp_avg_sq=torch.zeros_like(p, memory_format=torch.preserve_format))
    return opt


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def adamw_group_settings(cfg: OptimConfig, lr: float) -> dict:
    """Every field of a param_group of the AdamW that make_adamw builds (amsgrad, foreach,
    fused, ...), read off a real one, so a state in training_state's layout loads into a plain
    torch.optim.AdamW (the trainer's) as well as into the engine's."""
    group = make_adamw([torch.zeros(1)], cfg).param_groups[0]
    return {**{k: v for k, v in group.items() if k != "params"}, "lr": lr}


def training_state(masters: list[tuple[str, torch.Tensor, dict]], aliases: dict[str, str],
                   cfg: OptimConfig, lr: float) -> dict:
    """{"model": {state_dict key: fp32 master}, "optim": {"state": {name: {step, exp_avg,
    exp_avg_sq}}, "param_groups": [...]}}, the layout of torch.distributed.checkpoint's
    get_state_dict, from (parameter name, master, its AdamW state) triples. The tensors are the
    live ones where the engine holds whole parameters, so loading in place restores the state."""
    model = {name: t.detach() for name, t, _ in masters}
    state = {name: dict(entries) for name, _, entries in masters}
    settings = adamw_group_settings(cfg, lr)
    groups = [{**settings, "weight_decay": wd, "params": [n for n, t in model.items() if (t.dim() >= 2) == decay]}
              for wd, decay in ((cfg.weight_decay, True), (0.0, False))]
    return {"model": {key: model[name] for key, name in aliases.items()},
            "optim": {"state": state, "param_groups": groups}}


def copy_training_state(dst: dict, src: dict) -> None:
    """Copy `src` into the live tensors of `dst` (both in `training_state`'s layout)."""
    for part in ("model", "optim"):
        if part not in src:
            raise KeyError(f"the state has no '{part}' entry; pass what OffloadEngine.state_dict() returns")
    missing = [k for k in dst["model"] if k not in src["model"]]
    missing += [f"optim.{n}" for n in dst["optim"]["state"] if n not in src["optim"]["state"]]
    if missing:
        raise KeyError(f"the state lacks {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    with torch.no_grad():
        for key, t in dst["model"].items():
            t.copy_(src["model"][key])
        for name, entries in dst["optim"]["state"].items():
            for k, t in entries.items():
                t.copy_(src["optim"]["state"][name][k])


class CpuOptimizerWorker:
    """One thread running tasks from a priority queue; a failed task is re-raised in the
    caller at its next `check()` (every wait on a landing calls it)."""

    def __init__(self, name: str = "hetrain-cpu-optim"):
        self._queue: queue.PriorityQueue = queue.PriorityQueue()
        self._seq = itertools.count()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, priority: tuple, fn: Callable[[], None]) -> None:
        self.check()
        self._queue.put((priority, next(self._seq), fn))

    def _run(self) -> None:
        while True:
            _, _, fn = self._queue.get()
            try:
                if fn is None:
                    return
                if self._error is None:  # after a failure, drain without running
                    fn()
            except BaseException as e:  # noqa: BLE001 - handed to the main thread by check()
                self._error = e
            finally:
                self._queue.task_done()

    @property
    def failed(self) -> bool:
        return self._error is not None

    def check(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"the CPU optimizer worker failed: {self._error!r}") from self._error

    def drain(self) -> None:
        """Wait until every submitted task has run."""
        self._queue.join()
        self.check()

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(((float("inf"),), next(self._seq), None))
            self._thread.join()


class HostLayer:
    """One layer's fp32 master, gradient accumulator and AdamW on the host."""

    def __init__(self, index: int, flat: FlatWeights, values: list[torch.Tensor], cfg: OptimConfig,
                 pin: bool, trace: Callable | None = None):
        self.index, self.flat, self.trace = index, flat, trace
        self.master = host_empty(flat.numel, torch.float32, pin)
        self.grad = host_empty(flat.numel, torch.float32, pin)
        self.master_views = slot_views(self.master, flat.slots)
        self.grad_views = slot_views(self.grad, flat.slots)
        with torch.no_grad():
            for view, value in zip(self.master_views, values):
                view.copy_(value)
        for view, grad in zip(self.master_views, self.grad_views):
            view.grad = grad
        self.optimizer = make_adamw(self.master_views, cfg)
        # The compute-dtype copy the device reads: the master itself when the dtypes agree.
        same = flat.dtype == torch.float32
        self.upload = self.master if same else host_empty(flat.numel, flat.dtype, pin)
        if not same:
            self.upload.copy_(self.master)
        if flat.streamed:
            flat.host_store = self.upload
        self.staging = host_empty(flat.numel, flat.dtype, pin) if pin else None
        self._init_events()

    def _init_events(self) -> None:
        self._staging_free = threading.Event()
        self._staging_free.set()
        self.norms: list[torch.Tensor] | None = None
        self.norms_ready = threading.Event()

    # --- gradients -----------------------------------------------------------------------
    def _add(self, g: torch.Tensor, first: bool, final: bool) -> None:
        with torch.no_grad():
            if first:
                self.grad[:g.numel()].copy_(g)
            else:
                self.grad[:g.numel()].add_(g)
            if final:
                self.norms = self._norms()
                self.norms_ready.set()

    def _norms(self) -> list[torch.Tensor]:
        """Per-parameter 2-norms of the accumulated gradient, in slot order."""
        return list(torch._foreach_norm(self.grad_views, 2.0))

    def _own(self, g: torch.Tensor) -> torch.Tensor:
        """The part of a full flat gradient this layer accumulates (all of it here)."""
        return g

    def _publish(self) -> None:
        """Write the updated master into the compute-dtype copy the device reads."""
        if self.upload is not self.master:
            self.upload.copy_(self.master)

    def accumulate(self, g: torch.Tensor, first: bool, final: bool, worker: CpuOptimizerWorker,
                   d2h_stream=None) -> None:
        """Add this micro-batch's flat gradient `g` (on the device) into the host accumulator.

        CPU: the copy and the sum run here. CUDA: the copy goes on `d2h_stream` into pinned
        staging (after the compute stream's work so far) and the worker sums it once the copy's
        event fires, so backward never waits for the host.
        """
        if final:
            self.norms_ready.clear()
        g = self._own(g)
        start = time.perf_counter()
        if d2h_stream is None:
            self._add(g, first, final)
            if self.trace:
                self.trace(task_name("grad_to_host", self.flat.name), "d2h", start, time.perf_counter(), "d2h")
            return
        while not self._staging_free.wait(timeout=0.05):
            worker.check()
        self._staging_free.clear()
        d2h_stream.wait_stream(torch.cuda.current_stream(g.device))
        staging = self.staging[:g.numel()]
        done = copy_async(staging, g, d2h_stream)
        g.record_stream(d2h_stream)

        def land() -> None:
            done.synchronize()
            self._add(staging, first, final)
            self._staging_free.set()

        worker.submit((self.index, 0), land)

    def wait_norms(self, worker: CpuOptimizerWorker) -> list[torch.Tensor]:
        while not self.norms_ready.wait(timeout=0.05):
            worker.check()
        return self.norms

    # --- update --------------------------------------------------------------------------
    def submit_update(self, worker: CpuOptimizerWorker, lr: float, clip_coef: torch.Tensor | None,
                      h2d_stream=None, step: int = 0) -> None:
        """Queue this layer's AdamW step (after scaling by `clip_coef`) and the refresh of the
        compute copy; readers of the copy wait on `flat.landing`.

        On CUDA two fences are taken now, in launch order: the copy stream's (fetches still
        reading the host store must finish before the worker overwrites it) and the compute
        stream's (kernels still reading the resident flat must finish before the upload)."""
        self.flat.landing.begin()
        fetches_done = reads_done = None
        if h2d_stream is not None:
            fetches_done, reads_done = torch.cuda.Event(), torch.cuda.Event()
            fetches_done.record(h2d_stream)
            reads_done.record(torch.cuda.current_stream(h2d_stream.device))

        def update() -> None:
            start = time.perf_counter()
            if fetches_done is not None:
                fetches_done.synchronize()
            with torch.no_grad():
                if clip_coef is not None:
                    self.grad.mul_(clip_coef)
                set_lr(self.optimizer, lr)
                self.optimizer.step()
                self._publish()
                event = None if self.flat.streamed else copy_async(self.flat.param.data, self.upload, h2d_stream,
                                                                   after=[reads_done])
            if self.trace:
                self.trace(task_name("update", self.flat.name), "cpu_optim", start, time.perf_counter(), "optim", step)
            self.flat.landing.land(event)

        worker.submit((self.index, 1), update)

    def refresh(self, h2d_stream=None) -> None:
        """Write the master into the compute copy now (after loading a checkpoint)."""
        with torch.no_grad():
            self._publish()
            event = None if self.flat.streamed else copy_async(self.flat.param.data, self.upload, h2d_stream)
        self.flat.landing.land(event)

    # --- state ---------------------------------------------------------------------------
    def full_state(self) -> tuple[list[torch.Tensor], list[dict]]:
        """Per parameter, in slot order: the fp32 master and its AdamW state (live tensors)."""
        return self.master_views, [self.optimizer.state[v] for v in self.master_views]

    def load_full(self, masters: list[torch.Tensor], states: list[dict]) -> None:
        """Copy whole-parameter masters and AdamW states into this layer's (then `refresh`)."""
        with torch.no_grad():
            for view, value, state in zip(self.master_views, masters, states):
                view.copy_(value)
                for k, t in self.optimizer.state[view].items():
                    t.copy_(state[k])
